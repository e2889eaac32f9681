"""Method options: dataclasses whose fields carry their command-line flag and help text.

A method's ``config`` (fit time) or ``predict_config`` (inference time) is a dataclass with two class
attributes, ``key`` (how :class:`nnunet_ood.fitting.FitOptions` and the predictor find it) and
``title`` (the heading of its group in ``--help``), and fields made with :func:`option`. The command
lines derive their flags from these fields, so a flag is declared once, next to what it sets.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def option(default: Any, flag: str | None, help: str, *, type: Any = None, nargs: str | None = None,
           metavar: str | None = None, default_text: str | None = None, choices: tuple | None = None) -> Any:
    """A dataclass field that is also the command-line flag ``flag`` (``None``: no flag, set in code only).

    ``type`` is the argparse type (``bool`` makes a ``store_true`` switch); ``default_text`` replaces the
    default shown in the help when the default is computed later (e.g. "the configuration's batch size").
    """
    return dataclasses.field(default=default, metadata={
        "flag": flag, "help": help, "type": type, "nargs": nargs, "metavar": metavar, "default_text": default_text,
        "choices": choices})


def _dest(config_class: type, field: dataclasses.Field) -> str:
    return f"{config_class.key}__{field.name}"


def flag_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of an options dataclass that have a command-line flag."""
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("flag")]


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, title: str) -> None:
    """One argument group with a flag per field of ``config_class``."""
    group = parser.add_argument_group(title)
    for f in flag_fields(config_class):
        meta = f.metadata
        shown = meta["default_text"] if meta["default_text"] is not None else f.default
        help_text = f"{meta['help']} (default: {shown})"
        if meta["type"] is bool:
            group.add_argument(meta["flag"], dest=_dest(config_class, f), action="store_true", help=meta["help"])
            continue
        kwargs = {k: meta[k] for k in ("type", "nargs", "metavar", "choices") if meta.get(k) is not None}
        group.add_argument(meta["flag"], dest=_dest(config_class, f), default=f.default, help=help_text, **kwargs)


def config_from_args(args: argparse.Namespace, config_class: type, **fixed: Any) -> Any:
    """An instance of ``config_class`` from parsed arguments (its own validation runs); ``fixed`` sets
    fields that have no flag (e.g. the seed)."""
    values = {f.name: getattr(args, _dest(config_class, f)) for f in flag_fields(config_class)
              if hasattr(args, _dest(config_class, f))}
    if "seed" in {f.name for f in dataclasses.fields(config_class)} and "seed" not in fixed and hasattr(args, "seed"):
        fixed = {**fixed, "seed": args.seed}
    return config_class(**{**values, **fixed})


def config_to_json(config: Any) -> dict[str, Any]:
    """A JSON-able dict of an options instance (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_json(config_class: type, values: Mapping[str, Any] | None) -> Any:
    """An options instance from stored values; unknown keys are ignored, missing ones take defaults."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in (values or {}).items() if k in names})


def distinct(config_classes: Iterable[type | None]) -> list[type]:
    """Config classes without repeats and ``None``, in first-seen order."""
    return list(dict.fromkeys(c for c in config_classes if c is not None))
