"""Fitting the OOD methods of a trained fold: :class:`FitOptions` and :func:`fit_fold`.

``FitOptions`` is importable without torch (the command line builds it before the heavy imports);
``fit_fold`` and ``fold_split`` are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from nnunet_ood.fitting.options import FitOptions

__all__ = ["FitOptions", "fit_fold", "fold_split"]


def __getattr__(name: str) -> Any:
    if name == "fit_fold":
        from nnunet_ood.fitting.pipeline import fit_fold

        return fit_fold
    if name == "fold_split":
        from nnunet_ood.fitting.split import fold_split

        return fold_split
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
