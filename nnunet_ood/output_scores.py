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

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from nnunet_ood.errors import OODInputError
from nnunet_ood.methods import LOGIT_METHODS

_EPS = 1e-12


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    q = 1 - p
    return -(p * torch.log(p.clamp_min(_EPS)) + q * torch.log(q.clamp_min(_EPS)))


def logit_uncertainty(method: str, logits: torch.Tensor, region_based: bool, temperature: float = 1.0) \
        -> torch.Tensor:
    """Per-voxel uncertainty ``(*spatial)`` float32 of one method from logits ``(C, *spatial)``."""
    if method not in LOGIT_METHODS:
        raise OODInputError(f"unknown output-based method {method!r}; choose from {', '.join(LOGIT_METHODS)}")
    t = temperature if method == "temperature" else 1.0
    z = logits.float() / t
    if region_based:
        p = torch.sigmoid(z)
        if method in ("max_softmax", "temperature"):
            out = 1 - torch.maximum(p, 1 - p).mean(0)
        elif method == "entropy":
            out = _binary_entropy(p).mean(0)
        elif method == "kl_uniform":
            out = (_binary_entropy(p) - math.log(2)).mean(0)
        else:  # energy of the two-class logits (z/2, -z/2)
            out = (-t * torch.logaddexp(z / 2, -z / 2)).mean(0)
        return out.float()
    if method == "energy":
        return (-t * torch.logsumexp(z, dim=0)).float()
    log_p = torch.log_softmax(z, dim=0)
    p = log_p.exp()
    if method in ("max_softmax", "temperature"):
        return (1 - p.max(0).values).float()
    entropy = -(p * log_p).sum(0)
    if method == "entropy":
        return entropy.float()
    return (entropy - math.log(logits.shape[0])).float()  # kl_uniform


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, region_based: bool,
                            temperature: float) -> float:
    """Mean NLL of voxels ``logits (N, C)`` with ``targets``: class indices (N,) or region masks (N, C)."""
    z = logits.double() / temperature
    if region_based:
        return float(F.binary_cross_entropy_with_logits(z, targets.double()))
    return float(F.cross_entropy(z, targets.long()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, region_based: bool,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> tuple[float, float, float]:
    """Temperature minimising the validation NLL (bounded 1-D search over log T).

    Returns ``(T, nll at T = 1, nll at T)``. ``logits`` are voxel rows ``(N, C)``.
    """
    if logits.shape[0] == 0:
        raise OODInputError("no validation voxels to fit the temperature on; the fold needs validation cases")
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, targets, region_based, float(np.exp(log_t))),
                             bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(result.x))
    return t, negative_log_likelihood(logits, targets, region_based, 1.0), \
        negative_log_likelihood(logits, targets, region_based, t)
