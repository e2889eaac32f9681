"""Evaluation metrics with one definition each (METHODS.md section 4).

Convention throughout: a score is an uncertainty, higher = more likely OOD / less trustworthy. Ranks and
Spearman's correlation are defined in :mod:`nnunet_ood.ranks` (the quality model uses them too) and re-exported.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from nnunet_ood.ranks import average_ranks, nan_free_pairs, spearman  # noqa: F401 (spearman is re-exported)


def auroc(negative_scores: ArrayLike, positive_scores: ArrayLike) -> float:
    """Area under the ROC curve for separating positives (OOD) from negatives (ID).

    Higher scores mean more OOD. Computed as the Mann-Whitney U statistic from average ranks,
    so a positive-negative tie counts 1/2. A NaN score means the case could not be scored; it
    must be flagged, so it is treated as maximally uncertain (+inf). Returns NaN when either
    side is empty.
    """
    neg = np.asarray(negative_scores, dtype=np.float64).ravel()
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    both = np.concatenate([neg, pos])
    both[np.isnan(both)] = np.inf
    ranks = average_ranks(both)
    n_neg, n_pos = neg.size, pos.size
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_neg * n_pos))


def _finite_1d(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def threshold_metrics(id_val: ArrayLike, id_test: ArrayLike, ood: ArrayLike,
                      percentile: float = 95.0) -> dict[str, float]:
    """González et al.'s threshold metrics, ID as the "positive" class (METHODS.md §4).

    t = ``percentile``-th percentile (numpy's linear interpolation) of the ID validation
    uncertainties; TPR = share of ID test cases with u <= t; FPR = share of OOD cases with u <= t
    (accepted although OOD); detection error = 0.5 (1 - TPR) + 0.5 FPR. A NaN uncertainty (a case
    that could not be scored) is rejected: it is never "<= t", in either group, so it stays in the
    denominators. The threshold comes from the finite validation values. Empty groups give NaN.
    """
    id_val = _finite_1d(id_val, "id_val")
    id_test, ood = (np.asarray(v, dtype=np.float64).ravel() for v in (id_test, ood))
    if id_val.size == 0:
        nan = float("nan")
        return {"threshold": nan, "tpr": nan, "fpr": nan, "detection_error": nan}
    t = float(np.percentile(id_val, percentile))
    tpr = float(np.mean(id_test <= t)) if id_test.size else float("nan")  # NaN <= t is False: rejected
    fpr = float(np.mean(ood <= t)) if ood.size else float("nan")
    return {"threshold": t, "tpr": tpr, "fpr": fpr, "detection_error": 0.5 * (1 - tpr) + 0.5 * fpr}


def esce(normalized_uncertainty: ArrayLike, dice: ArrayLike, n_bins: int = 10) -> float:
    """Expected segmentation calibration error (González et al. eq. 5).

    ``n_bins`` equal-width bins over [0, 1] of the normalised uncertainty u (u = 1 falls in the
    last bin); sum over bins of |B|/n * |mean Dice(B) - (1 - mean u(B))|.
    """
    u, d = _finite_1d(normalized_uncertainty, "uncertainty"), _finite_1d(dice, "dice")
    if u.shape != d.shape or u.size == 0:
        raise ValueError("esce needs equally many (at least one) uncertainties and Dice values")
    if (u < 0).any() or (u > 1).any():
        raise ValueError("esce needs normalised uncertainties in [0, 1]")
    bins = np.minimum((u * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    sum_u = np.bincount(bins, weights=u, minlength=n_bins)
    sum_d = np.bincount(bins, weights=d, minlength=n_bins)
    used = count > 0
    gap = np.abs(sum_d[used] / count[used] - (1.0 - sum_u[used] / count[used]))
    return float(np.sum(count[used] / u.size * gap))


def risk_coverage_curve(uncertainty: ArrayLike, risk: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The selective-risk-vs-coverage curve (Jaeger et al.) whose area is :func:`aurc`.

    Cases are accepted from the least to the most uncertain; cases with equal uncertainty are accepted
    together (a selection rule cannot tell them apart). Returns one point per distinct uncertainty: the
    coverage n_j / n after accepting the j-th group and the mean risk r_j of the n_j accepted cases. The curve
    is a step function: r_j holds on the coverage interval (n_{j-1} / n, n_j / n].
    """
    u, r = _finite_1d(uncertainty, "uncertainty"), _finite_1d(risk, "risk")
    if u.shape != r.shape or u.size == 0:
        raise ValueError("the risk-coverage curve needs equally many (at least one) uncertainties and risks")
    order = np.argsort(u, kind="stable")
    u, r = u[order], r[order]
    last_of_group = np.r_[u[1:] != u[:-1], True]  # the last case of each run of equal uncertainty
    accepted = np.arange(1, u.size + 1)[last_of_group]
    return accepted / u.size, np.cumsum(r)[last_of_group] / accepted


def oracle_risk_coverage_curve(risk: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's curve: coverage k / n and mean of the k smallest risks, k = 1..n (area: :func:`oracle_aurc`)."""
    r = np.sort(_finite_1d(risk, "risk"))
    if r.size == 0:
        raise ValueError("the oracle curve needs at least one risk")
    k = np.arange(1, r.size + 1)
    return k / r.size, np.cumsum(r) / k


def aurc(uncertainty: ArrayLike, risk: ArrayLike) -> float:
    """Area under the selective-risk-vs-coverage curve (Jaeger et al.), ties handled.

    The area of the step curve of :func:`risk_coverage_curve`: with n_j cases accepted at the j-th distinct
    uncertainty and r_j their mean risk, AURC = sum_j (n_j - n_{j-1}) / n * r_j. Without ties this is the mean
    over k = 1..n of the mean risk of the k least uncertain cases.
    """
    coverage, selective_risk = risk_coverage_curve(uncertainty, risk)
    return float(np.sum(np.diff(np.r_[0.0, coverage]) * selective_risk))


def oracle_aurc(risk: ArrayLike) -> float:
    """AURC of the oracle that accepts cases from the lowest to the highest risk, one at a time.

    Cases of equal risk are interchangeable for the oracle, so they are not grouped: at every coverage
    k/n its selective risk is the mean of the k smallest risks, the lowest any ranking can reach.
    """
    r = np.sort(_finite_1d(risk, "risk"))
    if r.size == 0:
        raise ValueError("oracle_aurc needs at least one risk")
    return float(np.mean(np.cumsum(r) / np.arange(1, r.size + 1)))


def e_aurc(uncertainty: ArrayLike, risk: ArrayLike) -> float:
    """Excess AURC: :func:`aurc` minus :func:`oracle_aurc` (never negative)."""
    return aurc(uncertainty, risk) - oracle_aurc(risk)


def selective_outcomes(accepted: ArrayLike, dice: ArrayLike, fail_below: float) -> dict[str, float]:
    """What an accept/review decision did: ``coverage`` (share accepted), ``silent_rate`` (share of all cases
    accepted and failed, i.e. Dice below ``fail_below``) and ``silent_rate_accepted`` (share of the accepted
    cases that failed; NaN when none is accepted). All NaN for no cases."""
    a = np.asarray(accepted, dtype=bool).ravel()
    d = _finite_1d(dice, "dice")
    if a.shape != d.shape:
        raise ValueError(f"selective_outcomes needs equal lengths, got {a.size} and {d.size}")
    nan = float("nan")
    if a.size == 0:
        return {"coverage": nan, "silent_rate": nan, "silent_rate_accepted": nan}
    silent = int(np.sum(a & (d < fail_below)))
    n_accepted = int(a.sum())
    return {"coverage": n_accepted / a.size, "silent_rate": silent / a.size,
            "silent_rate_accepted": silent / n_accepted if n_accepted else nan}


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; pairs with a NaN dropped; NaN for fewer than two pairs or a constant side."""
    x, y = nan_free_pairs(x, y, "pearson")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):  # exactly constant: rounding in the mean must not
        return float("nan")                                     # leave a spurious tiny variance
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def dice_prediction_errors(predicted_dice: ArrayLike, dice: ArrayLike) -> dict[str, float]:
    """How well a predicted Dice matches the true one: ``dice_mae`` (mean absolute error) and ``dice_pearson``
    (:func:`pearson`), over the pairs whose prediction is not NaN; NaN when there are none."""
    p = np.asarray(predicted_dice, dtype=np.float64).ravel()
    d = _finite_1d(dice, "dice")
    if p.shape != d.shape:
        raise ValueError(f"dice_prediction_errors needs equal lengths, got {p.size} and {d.size}")
    keep = ~np.isnan(p)
    mae = float(np.mean(np.abs(p[keep] - d[keep]))) if keep.any() else float("nan")
    return {"dice_mae": mae, "dice_pearson": pearson(p[keep], d[keep])}


def failure_rate_upper_bound(failures: int, accepted: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound (Clopper–Pearson) of a failure rate among ``accepted`` cases, of which
    ``failures`` failed: the rate p at which seeing ``failures`` or fewer has probability 1 - ``confidence``, i.e.
    the ``confidence`` quantile of Beta(failures + 1, accepted - failures); 1 when every accepted case failed, NaN
    when none is accepted."""
    if accepted <= 0:
        return float("nan")
    if not 0 <= failures <= accepted:
        raise ValueError(f"failures must be between 0 and accepted ({accepted}), got {failures}")
    if failures == accepted:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, failures + 1, accepted - failures))


def coverage_at_risk(uncertainty: ArrayLike, failed: ArrayLike, alpha: float) -> float:
    """The largest share of the cases that a threshold t on ``uncertainty`` can accept (u <= t, the least uncertain
    first; equal uncertainties accepted together) with at most ``alpha`` of the accepted cases failed.

    A ranking measure for decisions: the best any threshold of this score could do at risk ``alpha``, whatever
    threshold the prediction used. Cases with a NaN uncertainty (not scored) are never accepted but count in the
    denominator. Accepting nothing is always allowed (0). NaN for no cases.
    """
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    f = np.asarray(failed, dtype=bool).ravel()
    if u.shape != f.shape:
        raise ValueError(f"coverage_at_risk needs equal lengths, got {u.size} and {f.size}")
    if u.size == 0:
        return float("nan")
    keep = ~np.isnan(u)
    order = np.argsort(u[keep], kind="stable")
    su, sf = u[keep][order], f[keep][order]
    if su.size == 0:
        return 0.0
    last_of_group = np.r_[su[1:] != su[:-1], True]
    accepted = np.arange(1, su.size + 1)[last_of_group]
    failures = np.cumsum(sf)[last_of_group]
    ok = failures / accepted <= alpha
    return float(accepted[ok].max() / u.size) if ok.any() else 0.0
