"""``quality``: the predicted risk 1 - Dice of a case, and the accept/review decision with a stated risk.

Fitted on the fold's failure table (:mod:`nnunet_ood.fitting.failure_table`: the validation cases, clean and
corrupted, with their Dice and every other fitted method's score), the quality model
(:class:`nnunet_ood.quality.model.QualityModel`) predicts a case's risk from those scores and from simple
properties of its predicted segmentation (relative volume per class, connected components). Its case score
is that risk; ``1 - score`` is the predicted Dice. The ``ood`` flag of this method is the decision
(:mod:`nnunet_ood.quality.decision`): a case is sent to review, with a reason, when its predicted risk is above
the threshold of the rule in force (:mod:`nnunet_ood.quality.risk_control`; by default Learn then Test: with
``--confidence``, at most ``--max_silent_failures`` of the accepted cases fail, Dice below ``--fail_below``, for
cases exchangeable with the calibration cases), or when the gate finds it unlike the in-distribution calibration
cases (:mod:`nnunet_ood.quality.gate`), or when it could not be scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.methods.base import UNIT_INTERVAL, DerivedMethod, FoldModels
from nnunet_ood.methods.options import Range, option
from nnunet_ood.quality.stored_folds import TABLE_ROWS, clean_validation_scores, pooled_threshold, recorded_rows

if TYPE_CHECKING:
    from nnunet_ood.calibration import MethodCalibration
    from nnunet_ood.io.site_calibration import SiteCalibration
    from nnunet_ood.methods.context import FitContext
    from nnunet_ood.quality.decision import DecisionRule
    from nnunet_ood.quality.risk_control import RiskThreshold
    from nnunet_ood.quality.table import FailureTable

MODEL_FILE = "quality_model.json"
#: members of the corruption family (nnunet_ood.quality.corruptions.CORRUPTIONS; not imported: it needs torch)
FAMILY_SIZE = 12
#: what --fail_below takes (a Dice) and what --max_silent_failures and --confidence take (a rate, a probability);
#: nnUNetv2_calibrate_ood's flags of the same names take the same
FAIL_BELOW = Range(0, 1, open_low=True)
RATE = Range(0, 1, open_low=True, open_high=True)
#: what --unusual_level takes: the gate's level, 0 = no gate
UNUSUAL_LEVEL = Range(0, 1, open_high=True)
#: the rule's parameters stored with a fit, and the values they can take (checked when the state is loaded)
STORED_RULE = {"fail_below": FAIL_BELOW, "max_silent_failures": RATE, "confidence": RATE,
               "unusual_level": UNUSUAL_LEVEL}
#: the manifest key of the number of rows the fit wrote into the failure table
#: keys of the fitted parameters that live in files of their own rather than in the manifest
_IN_FILES = ("model", "table_csv", "_model", "_table_file")


@dataclass
class QualityConfig:
    """What a failure is, how many silent failures are tolerated, and how many failure examples to make."""

    key: ClassVar[str] = "quality"
    title: ClassVar[str] = "quality model and accept/review decision"

    fail_below: float = option(0.6, "--fail_below", "a segmentation with Dice below this is a failure", type=float,
                               metavar="DICE", range=FAIL_BELOW)
    max_silent_failures: float = option(
        0.05, "--max_silent_failures", "tolerated share of the accepted cases that fail (ltt, at --confidence; "
        "with no failure it takes ln(1 - confidence) / ln(1 - rate) accepted calibration cases, 22 at 0.1 and 0.9); "
        "with --risk_control crc: the tolerated expected share of all cases accepted and failed", type=float,
        metavar="RATE", range=RATE)
    confidence: float = option(
        0.9, "--confidence", "ltt: the probability over the calibration cases with which the rate among accepted "
        "cases holds", type=float, metavar="1-DELTA", range=RATE)
    risk_control: str = option(
        "ltt", "--risk_control", "ltt: Learn then Test, a bound on the failures among accepted cases with stated "
        "confidence; crc: conformal risk control, a bound on the expected share of all cases accepted and failed",
        choices=("ltt", "crc"))
    unusual_level: float = option(
        0.05, "--unusual_level", "gate: a case whose conformal p-value against the in-distribution calibration cases "
        "(feature distances and predicted risk combined) is at most this goes to review as unusual; 0 = no gate",
        type=float, metavar="P", range=UNUSUAL_LEVEL)
    corruptions_per_case: int = option(
        2, "--corruptions_per_case", "corrupted versions of each validation case in the failure table (each costs "
        "one more prediction of the validation cases)", type=int, metavar="N",
        range=Range(0, FAMILY_SIZE, integer=True))
    corruptions_per_version: int = option(
        2, "--corruptions_per_version", "corruptions of the family applied one after the other in each version (a "
        "scanner rarely differs in one way only); per case at most 12 corruptions in all", type=int, metavar="N",
        range=Range(1, FAMILY_SIZE, integer=True))
    seed: int = option(0, None, "seed of the corruptions and the grouped cross-validation (nnUNetv2_fit_ood --seed)")

    def __post_init__(self) -> None:
        if not 0 < self.fail_below <= 1:
            raise OODInputError(f"--fail_below must be a Dice in (0, 1], got {self.fail_below}")
        if not 0 < self.max_silent_failures < 1:
            raise OODInputError(f"--max_silent_failures must be a rate in (0, 1), got {self.max_silent_failures}")
        if not 0 < self.confidence < 1:
            raise OODInputError(f"--confidence must be in (0, 1), got {self.confidence}; pass e.g. 0.9")
        if self.risk_control not in ("ltt", "crc"):
            raise OODInputError(f"--risk_control must be ltt or crc, got {self.risk_control!r}")
        if not 0 <= self.unusual_level < 1:
            raise OODInputError(f"--unusual_level must be in [0, 1) (0 = no gate), got {self.unusual_level}")
        if self.corruptions_per_case < 0 or self.corruptions_per_version < 1:
            raise OODInputError(f"--corruptions_per_case must be 0 or more and --corruptions_per_version 1 or more, "
                                f"got {self.corruptions_per_case} and {self.corruptions_per_version}")
        if self.corruptions_per_case * self.corruptions_per_version > FAMILY_SIZE:
            raise OODInputError(f"--corruptions_per_case x --corruptions_per_version must be at most {FAMILY_SIZE} "
                                "(the corruption family; a case never gets one corruption twice), got "
                                f"{self.corruptions_per_case} x {self.corruptions_per_version}")


class Quality(DerivedMethod):
    name = "quality"
    score_range = UNIT_INTERVAL  # a predicted risk 1 - Dice, clipped to [0, 1]
    special_thresholds = (-1.0,)  # nnunet_ood.quality.risk_control.NOTHING: accept nothing
    summary = ("predicted risk 1 - Dice of the case from the other methods' scores and the segmentation's volume "
               "and pieces; flag = sent to review (risk above the Learn-then-Test threshold, unusual, or unscored)")
    config = QualityConfig
    predicts_dice = True
    needs_failure_table = True
    averages_fold_thresholds = False

    # ------------------------------------------------------------------ fit
    def fit_on_failure_table(self, context: FitContext, models: FoldModels, table: FailureTable,
                             inputs: Sequence[str], setup: Mapping[str, Any],
                             reference: Mapping[str, float]) -> dict[str, float]:
        """Fit the model and the threshold into ``models``; return the clean validation cases' predicted risks."""
        from nnunet_ood.quality.model import QualityModel
        from nnunet_ood.quality.risk_control import choose_threshold
        from nnunet_ood.quality.table import OOF_RISK

        config: QualityConfig = context.options.config(QualityConfig)
        model = QualityModel(table.features, seed=context.seed).fit(table.matrix(), table.dice, table.groups)
        risk = model.oof_risk_
        threshold = choose_threshold(config.risk_control, risk, table.dice, config.fail_below,
                                     config.max_silent_failures, config.confidence, table.groups)
        context.log(f"quality: {model.cv_report_.get('chosen')} chosen by cross-validation grouped by case on "
                    f"{len(table)} versions of {len(set(table.groups))} validation cases; accept below a predicted "
                    f"risk of {threshold.threshold:.3g} (covers {threshold.coverage:.0%} of them, "
                    f"{threshold.accepted_failure_rate:.1%} of those accepted fail; {config.risk_control})")
        if not threshold.accepts_anything:
            context.log(f"quality: no threshold meets --max_silent_failures {config.max_silent_failures:g} on "
                        f"{threshold.n_rows} rows of the failure table (it takes at least {threshold.n_needed} "
                        "accepted without a failure): every case goes to review; calibrate on a site's labelled "
                        "cases (nnUNetv2_calibrate_ood -l) or allow a larger rate")
        params = {"inputs": list(inputs), "features": list(table.features), "label_setup": dict(setup),
                  "reference_volumes": dict(reference), "fail_below": config.fail_below,
                  "max_silent_failures": config.max_silent_failures, "risk_control": config.risk_control,
                  "confidence": config.confidence, "unusual_level": config.unusual_level,
                  "corruptions_per_case": config.corruptions_per_case,
                  "corruptions_per_version": config.corruptions_per_version, "risk_threshold": threshold.to_json(),
                  "cross_validation": model.cv_report_, "model": model.to_json(),
                  "table_csv": table.to_csv({OOF_RISK: list(risk)})}
        models.method_params[self.name] = params
        # the validation cases' scores as a prediction gives them (the refitted model; risk control used the
        # out-of-fold ones, in the table)
        clean = [i for i, r in enumerate(table.rows) if r["version"] == 0]
        in_sample = model.predict_risk(table.matrix()[clean])
        return {table.rows[i]["case"]: float(v) for i, v in zip(clean, in_sample)}

    def fold_calibration(self, params: Mapping[str, Any]) -> MethodCalibration:
        """Risk on [0, 1] as it is; the threshold from conformal risk control."""
        from nnunet_ood.quality.risk_control import RiskThreshold

        return _risk_calibration(RiskThreshold.from_json(params["risk_threshold"],
                                                         "the quality method's risk threshold"))

    def combine_fold_calibrations(self, calibrations: Sequence[MethodCalibration],
                                  fold_params: Sequence[Mapping[str, Any]]) -> MethodCalibration:
        """One fold: its own threshold. Several: the rule re-run on every fold's validation cases pooled
        (:func:`nnunet_ood.quality.stored_folds.pooled_threshold`). Five folds of 12 validation cases are 60
        calibration rows: enough for rates that none of the folds alone supports; averaging five thresholds would
        not be."""
        if len(fold_params) == 1:
            return calibrations[0]
        return _risk_calibration(pooled_threshold(fold_params))

    def decision_rule(self, fold_params: Sequence[Mapping[str, Any]], methods_in_use: Sequence[str],
                      site: SiteCalibration | None = None, site_name: str | None = None) -> DecisionRule:
        """The rule in force: the threshold of a labelled site calibration, or of the fit (one fold, or the folds
        pooled); the gate on the feature distances in use and the predicted risk, calibrated on the site's cases
        when a named calibration has them, else on the folds' clean validation cases."""
        from nnunet_ood.quality.decision import DecisionRule
        from nnunet_ood.quality.gate import GATE_LEVEL, ConformalGate
        from nnunet_ood.quality.risk_control import RiskThreshold

        from . import REGISTRY, MethodKind

        labelled = site is not None and self.name in site.labelled
        if labelled:
            threshold = RiskThreshold.from_json(site.labelled[self.name].get("risk_threshold"),
                                                f"calibration {site_name}")
            origin = f"calibration {site_name}"
        elif len(fold_params) == 1:
            threshold = RiskThreshold.from_json(fold_params[0]["risk_threshold"], "the quality method's threshold")
            origin = "fit"
        else:
            threshold, origin = pooled_threshold(fold_params), f"fit, {len(fold_params)} folds pooled"
        names = [m for m in methods_in_use if m in fold_params[0].get("inputs", ()) and
                 REGISTRY.get(m).kind is MethodKind.PATCH_FEATURES] + [self.name]
        level = float(fold_params[0].get("unusual_level", GATE_LEVEL))
        if site is not None and all(m in site.case_scores for m in names):
            cases = sorted(set.intersection(*(set(site.case_scores[m]) for m in names)))
            scores = {m: [site.case_scores[m][c] for c in cases] for m in names}
            source = f"calibration {site_name}"
        else:
            scores, source = clean_validation_scores(fold_params, names, self.name), "validation"
        return DecisionRule(threshold, origin, labelled, ConformalGate(scores, level, source))

    def add_labelled_calibration_arguments(self, parser: Any) -> list[str]:
        """``nnUNetv2_calibrate_ood``'s flags of the rule, with the ranges of ``nnUNetv2_fit_ood``'s flags of the
        same names (:class:`QualityConfig`); not given, the fit's value holds."""
        parser.add_argument("--fail_below", type=FAIL_BELOW.parser("--fail_below"), default=None, metavar="DICE",
                            help=f"with -l: a segmentation with Dice below this is a failure (default: the fit's; "
                                 f"{FAIL_BELOW})")
        parser.add_argument("--max_silent_failures", type=RATE.parser("--max_silent_failures"), default=None,
                            metavar="RATE",
                            help="with -l: tolerated share of the accepted cases that fail, with --confidence "
                                 "(--risk_control crc: tolerated expected share of all cases accepted and failed) "
                                 f"(default: the fit's; {RATE})")
        parser.add_argument("--confidence", type=RATE.parser("--confidence"), default=None, metavar="1-DELTA",
                            help="with -l: the probability over the labelled cases with which the rate among accepted "
                                 f"cases holds (default: the fit's, 0.9; {RATE})")
        parser.add_argument("--risk_control", default=None, choices=("ltt", "crc"),
                            help="with -l: ltt (Learn then Test: failures among accepted cases, with --confidence) "
                                 "or crc (conformal risk control: expected share of all cases accepted and failed) "
                                 "(default: the fit's)")
        return ["fail_below", "max_silent_failures", "confidence", "risk_control"]

    def labelled_calibration(self, fold_params: Sequence[Mapping[str, Any]], risks: Mapping[str, float],
                             dice: Mapping[str, float], settings: Mapping[str, Any],
                             log: Callable[[str], None] = print) -> tuple[MethodCalibration, dict[str, Any]]:
        """The threshold chosen by the rule (:func:`nnunet_ood.quality.risk_control.choose_threshold`, the fit's
        function) on the site's labelled cases; each setting is the flag's value if given, else the fit's (first
        fold; the folds share one rule), else :class:`QualityConfig`'s default. The record: the rule's settings,
        the threshold (``risk_threshold``, which :meth:`decision_rule` reads) and the cases' Dice."""
        from nnunet_ood.calibration import MethodCalibration
        from nnunet_ood.quality.risk_control import CONFIDENCE, RiskThreshold, choose_threshold

        fitted = fold_params[0] if fold_params else {}
        recorded = RiskThreshold.from_json(fitted["risk_threshold"], f"the fitted {self.name} threshold") \
            if "risk_threshold" in fitted else None

        def setting(name: str, fitted_value: Any, default: Any) -> Any:
            given = settings.get(name)
            return given if given is not None else (fitted_value if fitted_value is not None else default)

        defaults = QualityConfig()
        fail_below = float(setting("fail_below", fitted.get("fail_below"), defaults.fail_below))
        alpha = float(setting("max_silent_failures", fitted.get("max_silent_failures"),
                              defaults.max_silent_failures))
        rule = setting("risk_control", recorded.rule if recorded else None, defaults.risk_control)
        confidence = float(setting("confidence", recorded.confidence if recorded else None, CONFIDENCE))
        cases = sorted(risks)
        threshold = choose_threshold(rule, [risks[c] for c in cases], [dice[c] for c in cases], fail_below, alpha,
                                     confidence)
        log(f"{self.name}: accept below a predicted risk of {threshold.threshold:.4g} ({rule}); on these "
            f"{len(cases)} labelled cases {threshold.coverage:.0%} accepted, {threshold.accepted_failure_rate:.1%} "
            f"of those with Dice < {fail_below:g}")
        calibration = MethodCalibration(0.0, 1.0, threshold.threshold, len(cases), len(cases), "mean", alpha)
        return calibration, {"fail_below": fail_below, "max_silent_failures": alpha, "risk_control": rule,
                             "confidence": confidence if rule == "ltt" else None,
                             "risk_threshold": threshold.to_json(), "dice": {c: dice[c] for c in cases}}

    def failure_table_versions(self, options: Any) -> tuple[int, int]:
        config = options.config(QualityConfig)
        return config.corruptions_per_case, config.corruptions_per_version

    def inputs_of(self, params: Mapping[str, Any]) -> list[str]:
        return list(params.get("inputs", []))

    # ------------------------------------------------------------------ state
    def state_entry(self, models: FoldModels, folder: str) -> dict[str, Any]:
        from nnunet_ood.io.atomic import atomic_write_bytes, atomic_write_text
        from nnunet_ood.quality.model import QualityModel
        from nnunet_ood.quality.table import CSV_NAME, OOF_RISK, PLOT_NAME, dice_by_severity_png, read_failure_table

        params = models.method_params[self.name]
        QualityModel.from_json(params["model"], "the fitted quality model").save(os.path.join(folder, MODEL_FILE))
        atomic_write_text(os.path.join(folder, CSV_NAME), params["table_csv"])
        table = read_failure_table(params["table_csv"], extra=(OOF_RISK,))
        atomic_write_bytes(os.path.join(folder, PLOT_NAME), dice_by_severity_png(table))
        # the row count makes a table cut at a line end detectable (check_table_complete)
        return {"file": MODEL_FILE, "class": "QualityModel",
                "config": {**{k: v for k, v in params.items() if k not in _IN_FILES}, TABLE_ROWS: len(table)}}

    def load_state(self, entry: Mapping[str, Any], folder: str, models: FoldModels, device: Any) -> None:
        from nnunet_ood.quality.model import QualityModel
        from nnunet_ood.quality.risk_control import RiskThreshold
        from nnunet_ood.quality.table import CSV_NAME, check_table_complete

        config = entry.get("config")
        if not isinstance(config, dict) or entry.get("file") != MODEL_FILE or \
                any(k not in config for k in ("inputs", "features", "label_setup", "reference_volumes",
                                              "risk_threshold")):
            raise OODStateError(f"the quality entry in {folder} lacks its model file or parameters")
        manifest = os.path.join(folder, "ood_state.json")
        for key, allowed in STORED_RULE.items():  # unusual_level 1e308 sent every case to review, silently
            if config.get(key) is not None and not allowed.contains(config[key]):
                raise OODStateError(f"corrupted quality entry in {manifest}: {key} = {config[key]!r} is not "
                                    f"{allowed}; re-fit with nnUNetv2_fit_ood")
        RiskThreshold.from_json(config["risk_threshold"], manifest)  # checked here too: where it is used, no file
        model = QualityModel.load(os.path.join(folder, MODEL_FILE))
        if list(model.feature_names) != list(config["features"]):
            raise OODStateError(f"the quality model in {folder} reads other features than its manifest names")
        try:
            with open(os.path.join(folder, CSV_NAME)) as f:
                table_csv = f.read()
        except OSError:
            table_csv = ""  # missing: refused where the decision needs it (stored_folds.table_csv_of)
        except UnicodeDecodeError:
            table_csv = "\0"  # not text: refused as not a failure table
        if table_csv:
            check_table_complete(table_csv, os.path.join(folder, CSV_NAME),
                                 recorded_rows(config, os.path.join(folder, "ood_state.json")))
        models.method_params[self.name] = {**config, "model": model.to_json(), "table_csv": table_csv,
                                           "_model": model, "_table_file": os.path.join(folder, CSV_NAME)}

    # ------------------------------------------------------------------ score
    def derived_score(self, case_scores: Mapping[str, float], fold_params: Sequence[Mapping[str, Any]],
                      view: Any = None) -> float:
        """Mean over the folds of each fold model's predicted risk (NaN when an input is missing or NaN)."""
        import numpy as np

        from nnunet_ood.quality.model import QualityModel
        from nnunet_ood.quality.properties import StoredLabelManager, segmentation_properties

        if view is None or view.logits is None:
            return math.nan
        risks = []
        for params in fold_params:
            model = params.get("_model") or QualityModel.from_json(params["model"], "the quality model")
            properties = segmentation_properties(view.logits, StoredLabelManager(params["label_setup"]),
                                                 params["reference_volumes"])
            values = {**{m: case_scores.get(m, math.nan) for m in params["inputs"]}, **properties}
            x = np.array([[values.get(f, math.nan) for f in params["features"]]], dtype=np.float64)
            risks.append(float(model.predict_risk(x)[0]))
        return float(np.mean(risks)) if risks else math.nan


def _risk_calibration(threshold: RiskThreshold) -> MethodCalibration:
    """The calibration of a risk in [0, 1] with the rule's threshold (:class:`RiskThreshold`)."""
    from nnunet_ood.calibration import MethodCalibration

    return MethodCalibration(low=0.0, high=1.0, threshold=threshold.threshold, n_train_cases=0,
                             n_val_cases=threshold.n_groups, aggregation="mean", false_alarm_rate=threshold.alpha)
