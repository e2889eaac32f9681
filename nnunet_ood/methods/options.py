"""Method options: dataclasses whose fields carry their command-line flag and help text.

A method's ``config`` (fit time) or ``predict_config`` (inference time) is a dataclass with two class
attributes, ``key`` (how :class:`nnunet_ood.fitting.FitOptions` and the predictor find it) and
``title`` (the heading of its group in ``--help``), and fields made with :func:`option`. The command
lines derive their flags from these fields, so a flag is declared once, next to what it sets.

A numeric flag declares the values it takes with a :class:`Range`: argparse parses it with
:meth:`Range.parser` (a one-line error naming the flag, the range and the value, before anything heavy is
imported), ``--help`` shows the range, and :func:`check_ranges` applies it to options made in code (a trainer's
``FitOptions``). Ranges bound what a new fit may ask for; a stored state is checked by its own loader, so that
a range tightened later does not lock anyone out of a model fitted before.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nnunet_ood.errors import OODInputError


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag takes: finite numbers from ``low`` to ``high`` (``None``: unbounded), the ends
    included unless ``open_low``/``open_high``; only integers when ``integer``."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    open_low: bool = False
    open_high: bool = False

    def __str__(self) -> str:
        """How the help and the errors name it: "an integer in 2..100", "in (0, 1]", "an integer >= 0", "> 0"."""
        what = "an integer " if self.integer else ""
        low, high = (self._shown(end) for end in (self.low, self.high))
        if self.low is not None and self.high is not None:
            if self.integer:
                return f"{what}in {low}..{high}"
            return f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{what}{'>' if self.open_low else '>='} {low}"
        if self.high is not None:
            return f"{what}{'<' if self.open_high else '<='} {high}"
        return "an integer" if self.integer else "a finite number"

    def _shown(self, end: float | None) -> str:
        return "" if end is None else str(int(end)) if self.integer else f"{end:g}"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (already a number) lies in the range; NaN, infinities and booleans never do."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def check(self, value: Any, flag: str) -> Any:
        """``value`` if it lies in the range; else a one-line error naming ``flag``, the range and the value."""
        if not self.contains(value):
            raise OODInputError(f"{flag} must be {self}, got {value!r}")
        return value

    def parser(self, flag: str) -> Callable[[str], int | float]:
        """An argparse ``type`` reading ``flag``'s text. It raises :class:`OODInputError`, which argparse does not
        catch (it catches ValueError, TypeError and ArgumentTypeError only): the commands' one-line error
        handler reports it, instead of argparse's usage lines."""

        def parse(text: str) -> int | float:
            try:
                value: int | float = int(text) if self.integer else float(text)
            except ValueError:
                value = math.nan  # not a number: refused below
            if not self.contains(value):  # the value as typed, e.g. 1e308 (not 1e+308)
                raise OODInputError(f"{flag} must be {self}, got {text}")
            return value

        parse.__name__ = flag.lstrip("-")  # what argparse would name in its own messages
        return parse


def option(default: Any, flag: str | None, help: str, *, type: Any = None, nargs: str | None = None,
           metavar: str | None = None, default_text: str | None = None, choices: tuple | None = None,
           range: Range | None = None) -> Any:
    """A dataclass field that is also the command-line flag ``flag`` (``None``: no flag, set in code only).

    ``type`` is the argparse type (``bool`` makes a ``store_true`` switch); ``default_text`` replaces the
    default shown in the help when the default is computed later (e.g. "the configuration's batch size");
    ``range``: the values a numeric flag takes (its argparse type, shown in the help, checked by
    :func:`check_ranges`).
    """
    return dataclasses.field(default=default, metadata={
        "flag": flag, "help": help, "type": type, "nargs": nargs, "metavar": metavar, "default_text": default_text,
        "choices": choices, "range": range})


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
        allowed = f"; {meta['range']}" if meta.get("range") is not None else ""
        help_text = f"{meta['help']} (default: {shown}{allowed})"
        if meta["type"] is bool:
            group.add_argument(meta["flag"], dest=_dest(config_class, f), action="store_true", help=meta["help"])
            continue
        kwargs = {k: meta[k] for k in ("type", "nargs", "metavar", "choices") if meta.get(k) is not None}
        if meta.get("range") is not None:
            kwargs["type"] = meta["range"].parser(meta["flag"])
        group.add_argument(meta["flag"], dest=_dest(config_class, f), default=f.default, help=help_text, **kwargs)


def check_ranges(config: Any) -> None:
    """Every flagged field of an options instance within its :class:`Range` (each element of a list; ``None``, a
    default computed later, is not checked): what the command line checks when parsing, for options made in code."""
    for f in flag_fields(type(config)):
        allowed, value = f.metadata.get("range"), getattr(config, f.name)
        if allowed is None or value is None:
            continue
        for element in value if isinstance(value, (list, tuple)) else (value,):
            allowed.check(element, f.metadata["flag"])


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
