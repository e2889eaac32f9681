"""The registry of OOD methods: every method is one object, listed once here.

Everything that depends on the set of methods is derived from :data:`REGISTRY`: the fittable and the
default lists, the help texts and the options flags of the command lines, the checks of what a method
needs, the order of the score tables and the classes that load a fold's state. To add a method, write
its module (see ``docs/architecture.md``) and add one line to ``_METHODS``.

Importing this package imports the method modules but neither torch nor nnU-Net (the command lines
parse their arguments first).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.methods.base import (
    FIT_COMMAND,
    DerivedMethod,
    FoldEnsembleMethod,
    FoldModels,
    LogitMethod,
    Method,
    MethodKind,
    PatchFeatureMethod,
    PatchMapMethod,
    PatchTap,
    Requirements,
    SharedModel,
    TapContext,
    load_object,
)
from nnunet_ood.methods.options import add_config_arguments, config_from_args, distinct
from nnunet_ood.methods.shared import required_shared_models, shares_with

__all__ = ["DEFAULT_FIT_METHODS", "FITTABLE_METHODS", "FIT_COMMAND", "REGISTRY", "DerivedMethod",
           "FoldEnsembleMethod", "FoldModels", "LogitMethod", "Method", "MethodKind", "MethodRegistry",
           "PatchFeatureMethod", "PatchMapMethod", "PatchTap", "Requirements", "SharedModel", "TapContext",
           "get_method", "resolve_fit_methods"]

#: every method, in the order of the score tables: "module:Class", one line each
_METHODS: tuple[str, ...] = (
    "nnunet_ood.methods.features:Mahalanobis",
    "nnunet_ood.methods.features:KNN",
    "nnunet_ood.methods.sd.method:SegmentationDistortion",
    "nnunet_ood.methods.sd.method:LatentMahalanobis",
    "nnunet_ood.methods.logits:MaxSoftmax",
    "nnunet_ood.methods.logits:Entropy",
    "nnunet_ood.methods.logits:Energy",
    "nnunet_ood.methods.logits:KLUniform",
    "nnunet_ood.methods.logits:Temperature",
    "nnunet_ood.methods.tta:TTA",
    "nnunet_ood.methods.tta_dice:TTADice",
    "nnunet_ood.methods.mc_dropout:MCDropout",
    "nnunet_ood.methods.ensemble:EnsembleEntropy",
    "nnunet_ood.methods.ensemble:EnsembleMI",
    "nnunet_ood.methods.ensemble:PairwiseDice",
    "nnunet_ood.methods.quality:Quality",
)


def _names(methods: Iterable[Method]) -> str:
    return ", ".join(m.name for m in methods)


class MethodRegistry:
    """An ordered collection of method objects with the checks and derived lists the plugin needs."""

    def __init__(self, methods: Iterable[Method]) -> None:
        self._methods: dict[str, Method] = {}
        for method in methods:
            if method.name in self._methods:
                raise ValueError(f"two methods are named {method.name!r}")
            self._methods[method.name] = method

    @classmethod
    def from_paths(cls, paths: Iterable[str]) -> MethodRegistry:
        return cls(load_object(path)() for path in paths)

    def __iter__(self) -> Iterator[Method]:
        return iter(self._methods.values())

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __getitem__(self, name: str) -> Method:
        return self.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._methods)

    def get(self, name: str) -> Method:
        """The method called ``name``; a one-line error listing the known ones otherwise."""
        if name not in self._methods:
            raise OODInputError(f"unknown OOD method {name!r}; the known methods are {', '.join(self._methods)}")
        return self._methods[name]

    def in_order(self, names: Iterable[str]) -> list[Method]:
        """The named methods in table order."""
        wanted = set(names)
        return [m for m in self if m.name in wanted]

    @property
    def fittable(self) -> list[Method]:
        return [m for m in self if m.fittable]

    @property
    def default_fit(self) -> list[Method]:
        return [m for m in self if m.fittable and m.fit_by_default]

    # ------------------------------------------------------------------ fitting
    def resolve_fit(self, names: Iterable[str]) -> list[Method]:
        """Check method names for fitting and add partners: methods requiring the same shared model are fitted
        together (it is trained once for all of them), so asking for one fits all of them."""
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self._methods or not self._methods[n].fittable]
        if unknown:
            raise OODInputError(f"unknown OOD method(s) {', '.join(unknown)}; choose from "
                                f"{_names(self.fittable)}")
        methods = [self._methods[n] for n in names]
        if all(m.kind is MethodKind.DERIVED for m in methods):  # a derived method alone: from the default scores
            methods += [m for m in self.default_fit if m not in methods]
        partners = [m for m in self.fittable if m not in methods and shares_with(m, methods)]
        while partners:
            methods += partners
            partners = [m for m in self.fittable if m not in methods and shares_with(m, methods)]
        missing = {d for m in methods for d in m.requires.methods} - {m.name for m in methods}
        methods += [self.get(d) for d in missing]
        return self.in_order(m.name for m in methods)

    # ------------------------------------------------------------------ prediction
    def check_requested(self, requested: Sequence[str] | None, n_folds: int, mirroring: bool) -> list[str] | None:
        """Check ``--ood`` before anything is loaded; return the fitted methods to load (``None``: all).

        Methods named explicitly whose requirements cannot be met are an error with the fix.
        """
        if requested is None:
            return None
        methods = [self.get(n) for n in dict.fromkeys(requested)]
        several = [m for m in methods if m.requires.several_folds]
        if several and n_folds < 2:
            raise OODStateError(f"{_names(several)} compare the members of a fold ensemble; predict with several "
                                "folds (-f 0 1 2 3 4) or leave them out of --ood")
        mirrored = [m for m in methods if m.requires.mirroring]
        if mirrored and not mirroring:
            raise OODStateError(f"{_names(mirrored)} measure{'s' if len(mirrored) == 1 else ''} the disagreement of "
                                "nnU-Net's mirrored passes, but mirroring is off (--disable_tta, or a model without "
                                f"mirror axes); drop {_names(mirrored)} from --ood or enable mirroring")
        wanted = [m.name for m in methods if m.fittable]
        wanted += [d for m in methods for d in m.requires.methods if d not in wanted]
        return wanted

    def with_inputs(self, requested: Sequence[str] | None, entries: Mapping[str, Any]) -> list[str] | None:
        """``requested`` plus the methods that requested derived methods read, from their fitted manifest
        ``entries`` (a derived method is computed from their case scores, so they are computed too)."""
        if requested is None:
            return None
        wanted = list(dict.fromkeys(requested))
        for name in list(wanted):
            method, entry = self.get(name), entries.get(name)
            if method.kind is MethodKind.DERIVED and isinstance(entry, Mapping):
                wanted += [d for d in method.inputs_of(entry.get("config") or {}) if d not in wanted]
        return [m.name for m in self if m.name in wanted]  # table order

    def methods_in_use(self, requested: Sequence[str] | None, fitted: Sequence[str], n_folds: int,
                       mirroring: bool) -> tuple[list[Method], list[str]]:
        """Methods a prediction computes and notes for the user: the fitted ones (in the state's order), then
        fold ensembles; methods not asked for whose requirements are unmet are left out with a note."""
        fitted_methods = [self.get(n) for n in fitted]
        ensembles = [m for m in self if m.kind is MethodKind.FOLD_ENSEMBLE
                     and (requested is None or m.name in requested)]
        methods = fitted_methods + (ensembles if n_folds >= 2 else [])
        if requested is not None:
            methods = [m for m in methods if m.name in requested]
        notes = []
        unmirrored = [m for m in methods if m.requires.mirroring and not mirroring]
        if unmirrored:
            verb = "scores are" if len(unmirrored) > 1 else "score is"
            notes.append(f"note: mirroring is off, so the {_names(unmirrored)} {verb} not computed")
            methods = [m for m in methods if m not in unmirrored]
        return methods, notes

    def with_maps(self, requested: Sequence[str] | None, in_use: Sequence[str]) -> list[str]:
        """Methods whose voxel maps are written (``--save_ood_maps [METHOD ...]``), in table order: every method
        in use with a map when ``requested`` is empty or None, else the named ones, each checked (in use, has a
        map: derived scores such as ``quality`` have none)."""
        mapped = [m for m in in_use if self.get(m).kind is not MethodKind.DERIVED]
        if not requested:
            return mapped
        for name in requested:
            method = self.get(name)
            if method.kind is MethodKind.DERIVED:
                raise OODInputError(f"--save_ood_maps {name}: {name} is a case score without a voxel map; name "
                                    f"methods with maps ({', '.join(mapped)}) or none for all")
            if name not in in_use:
                raise OODInputError(f"--save_ood_maps {name}: {name} is not among the methods of this prediction "
                                    f"({', '.join(in_use)}); add it to --ood, fit it with nnUNetv2_fit_ood, or name "
                                    "another")
        return [m for m in mapped if m in requested]

    # ------------------------------------------------------------------ command lines
    def config_classes(self, stage: str = "fit") -> list[type]:
        """Options dataclasses of the methods, without repeats: ``stage`` is "fit" or "predict"."""
        attribute = "config" if stage == "fit" else "predict_config"
        return distinct(getattr(m, attribute) for m in self)

    def add_config_arguments(self, parser: argparse.ArgumentParser, stage: str = "fit") -> None:
        """One argument group per options dataclass, titled with the methods that use it."""
        attribute = "config" if stage == "fit" else "predict_config"
        for config_class in self.config_classes(stage):
            users = [m for m in self if getattr(m, attribute) is config_class]
            add_config_arguments(parser, config_class, f"{config_class.title} ({_names(users)})")

    def configs_from_args(self, args: argparse.Namespace, stage: str = "fit") -> dict[str, object]:
        """Options instances by key from parsed arguments (each validates itself)."""
        return {c.key: config_from_args(args, c) for c in self.config_classes(stage)}

    def fit_help(self) -> str:
        """Help of ``nnUNetv2_fit_ood --ood``."""
        optional = [m for m in self.fittable if not m.fit_by_default]
        sharing = ""
        for shared in required_shared_models(self.fittable):
            users = [m.name for m in self.fittable if shared.name in {s.name for s in m.requires.shared}]
            if len(users) > 1:
                sharing += f"; {' and '.join(users)} share one {shared.description} and are always fitted together"
        return (f"methods to fit (default: {' '.join(m.name for m in self.default_fit)}"
                + (f"; {' '.join(m.name for m in optional)} only when named" if optional else "") + ")"
                + sharing + ". Methods fitted earlier and not named here are kept")


REGISTRY = MethodRegistry.from_paths(_METHODS)
#: every method nnUNetv2_fit_ood can fit, in table order
FITTABLE_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY.fittable)
#: what is fitted unless asked otherwise
DEFAULT_FIT_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY.default_fit)


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    return REGISTRY.get(name)


def resolve_fit_methods(names: Iterable[str]) -> list[str]:
    """Names of the methods to fit, checked and with their partners, in table order."""
    return [m.name for m in REGISTRY.resolve_fit(names)]
