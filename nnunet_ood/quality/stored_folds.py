"""What the quality method reads back from its folds' stored parameters: the failure table of each fold, the rows
the fit recorded, the rule the folds share run on their pooled validation cases, and the gate's calibration scores
from their clean validation cases."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from nnunet_ood.errors import OODStateError
from nnunet_ood.quality.risk_control import CONFIDENCE, RiskThreshold, choose_threshold

#: the manifest entry with the failure table's row count (a table cut at a line end is detected by it)
TABLE_ROWS = "table_rows"


def pooled_threshold(fold_params: Sequence[Mapping[str, Any]]) -> RiskThreshold:
    """The rule the folds share, run on every fold's validation cases pooled (each case with the out-of-fold risk
    of its own fold's model, from the fold's failure table; a case is a unit within its fold)."""
    import numpy as np

    from nnunet_ood.quality.table import read_out_of_fold_risks

    def rule_of(params: Mapping[str, Any]) -> tuple:
        rule = params.get("risk_control", "crc")  # a fit from before the rule was recorded used crc
        return (params.get("fail_below"), params.get("max_silent_failures"), rule,
                params.get("confidence") if rule == "ltt" else None)

    rules = {rule_of(params) for params in fold_params}
    if len(rules) > 1:
        shown = "; ".join(f"--fail_below {f} --max_silent_failures {a} --risk_control {r}"
                          + (f" --confidence {c}" if c is not None else "") for f, a, r, c in sorted(rules, key=str))
        raise OODStateError(f"the folds' quality models were fitted with different rules ({shown}); re-fit them "
                            "with one rule (nnUNetv2_fit_ood --fail_below D --max_silent_failures R), or leave "
                            "quality out (--ood METHOD ...)")
    risk, dice, groups = [], [], []
    for k, params in enumerate(fold_params):
        cases, fold_risk, fold_dice = read_out_of_fold_risks(table_csv_of(params, k, len(fold_params)))
        risk.append(fold_risk)
        dice.append(fold_dice)
        groups += [f"{k}/{case}" for case in cases]  # a case is a unit within its fold
    fail_below, alpha, rule, confidence = rules.pop()
    return choose_threshold(rule, np.concatenate(risk), np.concatenate(dice), fail_below, alpha,
                            confidence or CONFIDENCE, groups)


def recorded_rows(config: Mapping[str, Any], where: str) -> int | None:
    """The rows the fit wrote into the failure table: ``table_rows``; for a fit from before it was recorded, the rows
    its threshold was chosen on (``risk_threshold.n_rows``, one per table row); None for a fit from before either
    (a legacy table: only its form is checked)."""
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if TABLE_ROWS in config:
        if not count(config[TABLE_ROWS]):
            raise OODStateError(f"corrupted quality entry in {where}: {TABLE_ROWS} = {config[TABLE_ROWS]!r} is not a "
                                "positive integer; re-fit with nnUNetv2_fit_ood")
        return config[TABLE_ROWS]
    threshold = config.get("risk_threshold")  # its fields are checked where it is read; n_rows 0 before recorded
    n_rows = threshold.get("n_rows") if isinstance(threshold, dict) else None
    return n_rows if count(n_rows) else None


def table_csv_of(params: Mapping[str, Any], k: int, n_folds: int) -> str:
    """A fold's stored failure table; a one-line error when it is lost."""
    if not params.get("table_csv"):
        where = params.get("_table_file", f"fold {k + 1} of {n_folds} in use")
        raise OODStateError(f"the quality method's failure table ({where}) is missing or empty: the decision reads "
                            "the folds' validation cases from it; restore it, re-fit with nnUNetv2_fit_ood, or leave "
                            "quality out (--ood METHOD ...)")
    return params["table_csv"]


def clean_validation_scores(fold_params: Sequence[Mapping[str, Any]], names: Sequence[str],
                             risk_name: str) -> dict[str, list[float]]:
    """The gate's calibration from the fit: every fold's clean validation cases (failure table, version 0), their
    scores of ``names`` (``risk_name``: the out-of-fold predicted risk)."""
    import csv
    import io

    from nnunet_ood.quality.table import OOF_RISK

    columns = {m: (OOF_RISK if m == risk_name else m) for m in names}
    scores: dict[str, list[float]] = {m: [] for m in names}
    for k, params in enumerate(fold_params):
        for row in csv.DictReader(io.StringIO(table_csv_of(params, k, len(fold_params)))):
            if row.get("version") == "0":
                for m, column in columns.items():
                    value = row.get(column, "")
                    scores[m].append(float(value) if value else math.nan)
    return scores
