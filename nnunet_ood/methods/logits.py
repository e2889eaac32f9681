"""Output-based uncertainties from the logits nnU-Net already computes (METHODS.md §3).

Each is a per-voxel map, higher = less trustworthy; confidences are turned into uncertainties. For
multi-class datasets the class probabilities are the softmax; for region-based datasets (nnU-Net's
sigmoid outputs, one channel per region) every region is a binary problem and the per-region values
are averaged. No forward pass is added: the maps are computed from the final (fold- and
mirror-averaged) logits of the case.

* ``max_softmax``: 1 - max_c p_c (Hendrycks & Gimpel); regions: 1 - mean_r max(p_r, 1 - p_r).
* ``entropy``: -sum_c p_c log p_c; regions: mean binary entropy.
* ``energy``: -T logsumexp(logits / T) with T = 1 (Liu et al.); regions: the two-class energy of the
  symmetric logits (l/2, -l/2), so that confident voxels of either side have low energy.
* ``kl_uniform``: -KL(p || uniform) = H(p) - log C. Per voxel an affine function of the entropy, so
  its mean over voxels ranks cases exactly like ``entropy``; listed because both papers compare it.
* ``temperature``: ``max_softmax`` after dividing the logits by a temperature T fitted on the fold's
  validation cases by negative log-likelihood (:func:`fit_temperature`), instead of the paper's grid
  {1, 10, 100}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nnunet_ood.errors import OODInputError
from nnunet_ood.methods.base import NON_NEGATIVE, UNIT_INTERVAL, FoldModels, LogitMethod
from nnunet_ood.segmentation import binary_entropy, entropy, max_entropy

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.methods.context import FitContext


def _log_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    log_p = logits.log_softmax(dim=0)
    return log_p.exp(), log_p


def max_probability_uncertainty(logits: Tensor, region_based: bool, temperature: float = 1.0) -> Tensor:
    """1 - the largest class probability of ``logits / temperature`` (regions: of each binary problem)."""
    z = logits.float() / temperature
    if region_based:
        p = z.sigmoid()
        return (1 - p.maximum(1 - p).mean(0)).float()
    p, _ = _log_softmax(z)
    return (1 - p.amax(0)).float()  # amax: the values of max(0) without its indices (several times faster)


class MaxSoftmax(LogitMethod):
    name = "max_softmax"
    score_range = UNIT_INTERVAL  # 1 - a probability
    summary = "1 - the largest class probability, per voxel (Hendrycks & Gimpel)"

    def voxel_map(self, logits: Tensor, region_based: bool, fold_params: Sequence[Mapping[str, Any]]) -> Tensor:
        return max_probability_uncertainty(logits, region_based)


class Entropy(LogitMethod):
    name = "entropy"
    score_range = NON_NEGATIVE
    summary = "predictive entropy of the softmax, per voxel"

    def voxel_map(self, logits: Tensor, region_based: bool, fold_params: Sequence[Mapping[str, Any]]) -> Tensor:
        if region_based:
            return entropy(logits.float().sigmoid(), True).float()
        p, log_p = _log_softmax(logits.float())
        return entropy(p, False, log_p=log_p).float()


class Energy(LogitMethod):
    name = "energy"
    summary = "-logsumexp of the logits (Liu et al.), per voxel"

    def voxel_map(self, logits: Tensor, region_based: bool, fold_params: Sequence[Mapping[str, Any]]) -> Tensor:
        z = logits.float()
        if region_based:  # energy of the two-class logits (z/2, -z/2)
            return (-(z / 2).logaddexp(-z / 2)).mean(0).float()
        return (-z.logsumexp(dim=0)).float()


class KLUniform(LogitMethod):
    name = "kl_uniform"
    summary = "-KL divergence of the softmax from the uniform distribution; per voxel entropy - log C"

    def voxel_map(self, logits: Tensor, region_based: bool, fold_params: Sequence[Mapping[str, Any]]) -> Tensor:
        if region_based:
            return (binary_entropy(logits.float().sigmoid()) - max_entropy(2, True)).mean(0).float()
        p, log_p = _log_softmax(logits.float())
        return (entropy(p, False, log_p=log_p) - max_entropy(logits.shape[0], False)).float()


#: at most this many validation voxels (a seeded random subset) enter the temperature fit
TEMPERATURE_VOXELS = 1_000_000
#: the temperatures the fit searches (and a stored one must lie in, up to rounding)
TEMPERATURE_BOUNDS = (0.05, 20.0)


class Temperature(LogitMethod):
    name = "temperature"
    score_range = UNIT_INTERVAL
    summary = ("max_softmax after dividing the logits by a temperature fitted on the fold's validation voxels by "
               "negative log-likelihood")
    needs_validation_logits = True

    def voxel_map(self, logits: Tensor, region_based: bool, fold_params: Sequence[Mapping[str, Any]]) -> Tensor:
        return max_probability_uncertainty(logits, region_based, self.temperature(fold_params))

    @staticmethod
    def temperature(fold_params: Sequence[Mapping[str, Any]]) -> float:
        """The fitted temperature, averaged over the folds in use (1 without any)."""
        values = [float(p.get("temperature", 1.0)) for p in fold_params]
        return sum(values) / len(values) if values else 1.0

    def fit_parameters(self, context: FitContext) -> dict[str, Any]:
        """T minimising the NLL on (a seeded subset of) the fold's validation voxels.

        Logits come from nnU-Net's own prediction (sliding window, mirroring as at default inference).
        Voxels outside nnU-Net's nonzero region (label -1) and the ignore label are left out.
        """
        import numpy as np
        import torch

        rng = np.random.default_rng(context.seed)
        labels = context.label_manager
        per_case = max(1, TEMPERATURE_VOXELS // max(1, len(context.val_keys)))
        rows, targets = [], []
        for key in context.val_keys:
            _, seg = context.load_case_with_labels(key)
            logits = context.validation_logits(key).float().cpu()
            seg = np.asarray(seg[0]).ravel()
            valid = seg >= 0
            if labels.ignore_label is not None:
                valid &= seg != labels.ignore_label
            index = np.flatnonzero(valid)
            index = rng.choice(index, min(per_case, index.size), replace=False) if index.size else index
            rows.append(logits.reshape(logits.shape[0], -1)[:, torch.from_numpy(index)].T)
            if labels.has_regions:
                regions = [np.atleast_1d(r) for r in labels.foreground_regions]
                targets.append(torch.from_numpy(np.stack([np.isin(seg[index], r) for r in regions], 1)))
            else:
                targets.append(torch.from_numpy(seg[index].astype(np.int64)))
        t, nll_1, nll_t = fit_temperature(torch.cat(rows), torch.cat(targets), labels.has_regions)
        n_voxels = int(sum(r.shape[0] for r in rows))
        context.log(f"temperature: T = {t:.3f} lowers the validation NLL from {nll_1:.4f} to {nll_t:.4f} "
                    f"({n_voxels} voxels)")
        return {"temperature": t, "val_nll_at_1": nll_1, "val_nll": nll_t, "n_voxels": n_voxels}

    def fit_report(self, context: FitContext, models: FoldModels) -> dict[str, Any]:
        return {self.name: models.method_params[self.name]}

    def load_state(self, entry: Mapping[str, Any], folder: str, models: FoldModels, device: Any) -> None:
        super().load_state(entry, folder, models, device)
        t = models.method_params.get(self.name, {}).get("temperature")
        low, high = TEMPERATURE_BOUNDS
        # 1e308 made every probability uniform (the score a constant), silently
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not low * (1 - 1e-6) <= t <= high * (1 + 1e-6):
            raise ValueError(f"the fitted temperature must be a number in [{low:g}, {high:g}] (the fit's search "
                             f"range), got {t!r}")


def negative_log_likelihood(logits: Tensor, targets: Tensor, region_based: bool, temperature: float) -> float:
    """Mean NLL of voxels ``logits (N, C)`` with ``targets``: class indices (N,) or region masks (N, C)."""
    import torch.nn.functional as F

    z = logits.double() / temperature
    if region_based:
        return float(F.binary_cross_entropy_with_logits(z, targets.double()))
    return float(F.cross_entropy(z, targets.long()))


def fit_temperature(logits: Tensor, targets: Tensor, region_based: bool,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> tuple[float, float, float]:
    """Temperature minimising the validation NLL (bounded 1-D search over log T).

    Returns ``(T, nll at T = 1, nll at T)``. ``logits`` are voxel rows ``(N, C)``.
    """
    import numpy as np
    from scipy.optimize import minimize_scalar

    if logits.shape[0] == 0:
        raise OODInputError("no validation voxels to fit the temperature on; the fold needs validation cases")
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, targets, region_based, float(np.exp(log_t))),
                             bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(result.x))
    return t, negative_log_likelihood(logits, targets, region_based, 1.0), \
        negative_log_likelihood(logits, targets, region_based, t)
