"""What every OOD method is: one object that says what it needs and provides, and how it is fitted and computed.

A method has a name, a kind (where its numbers come from, :class:`MethodKind`), its requirements, an
optional options dataclass (see :mod:`nnunet_ood.methods.options`) and the computations of its kind.
The case scorer (:mod:`nnunet_ood.inference.case_scorer`), the fit (:mod:`nnunet_ood.fitting`) and
the state files (:mod:`nnunet_ood.fold_state`) only ever call these; none of them knows a method by name.

Method modules are imported to build the command lines before anything heavy is loaded, so they must
not import torch or nnU-Net at module level: computations import what they need inside the function
that runs them, and heavy machinery (hooks on the network, detectors) is named by an import path
(``"module:Class"``) and loaded when a method is used.
"""

from __future__ import annotations

import enum
import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.calibration import MethodCalibration
    from nnunet_ood.detectors.base import FeatureDetector
    from nnunet_ood.io.site_calibration import SiteCalibration
    from nnunet_ood.methods.context import FitContext
    from nnunet_ood.quality.decision import DecisionRule


#: the command that fits a fold's state (named in error messages)
FIT_COMMAND = "nnUNetv2_fit_ood -d DATASET -c CONFIGURATION -f FOLD -tr TRAINER"
#: ``Method.score_range`` of scores that can take any value, of distances, spreads and entropies, and of 1 - a
#: probability
ANY_SCORE: tuple[float, float] = (-math.inf, math.inf)
NON_NEGATIVE: tuple[float, float] = (0.0, math.inf)
UNIT_INTERVAL: tuple[float, float] = (0.0, 1.0)


class MethodKind(enum.Enum):
    """Where a method's numbers come from; decides how the case scorer runs it."""

    PATCH_FEATURES = "patch features"  # a fitted detector scores one feature vector per sliding-window patch
    PATCH_MAP = "voxel map from a hook"  # a hook on the network gives a voxel map per patch
    LOGITS = "final logits"  # a voxel map from the case's final (fold- and mirror-averaged) logits
    FOLD_ENSEMBLE = "fold ensemble"  # compares the predictions of the folds in use
    DERIVED = "derived from other methods' case scores"  # a case score computed from other case scores


class SharedModel:
    """A model fitted once per fold for every method that names it in ``Requirements.shared``.

    The family that owns it subclasses this (one instance, named by its methods' requirements): the fit trains it
    before any other pass, the fold's state writes it into the fold's folder and reads it back before the methods
    read their own entries; the methods find it in ``FoldModels.shared[name]``. Methods sharing one are always
    fitted together. Like methods, a subclass must not import torch or nnU-Net at module level.

    Class attributes:
        name: its key in ``FoldModels.shared``.
        provenance_key: the provenance entry holding its training history.
        description: what it is, in help texts ("... share one <description> and are always fitted together").
    """

    name: ClassVar[str]
    provenance_key: ClassVar[str]
    description: ClassVar[str]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def train(self, context: FitContext) -> tuple[Any, dict[str, Any]]:
        """The fold's model, trained (``(model, training history)``, the history JSON-able for the provenance)."""
        raise NotImplementedError

    def save(self, model: Any, folder: str, history: Mapping[str, Any] | None) -> None:
        """Write ``model`` (with its training ``history``, if known) into the fold's state ``folder``."""
        raise NotImplementedError

    def load(self, folder: str, device: Any) -> Any:
        """The model written by :meth:`save` into ``folder``, on ``device``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Requirements:
    """What a method needs beyond a trained model."""

    mirroring: bool = False  # nnU-Net's mirrored passes (test-time mirroring on, a model with mirror axes)
    several_folds: bool = False  # predictions of several folds (-f 0 1 2 3 4)
    shared: tuple[SharedModel, ...] = ()  # models fitted once per fold for every method naming them
    methods: tuple[str, ...] = ()  # other methods whose case scores it uses (derived methods)


def load_object(path: str) -> Any:
    """The object named ``"package.module:attribute"``, imported on first use."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass
class FoldModels:
    """What the methods of one fold have fitted: feature detectors, shared models, parameters.

    The fit builds it step by step; :class:`nnunet_ood.fold_state.FoldOODState` adds calibration,
    fingerprint and provenance. The case scorer reads it, one per fold in use.
    """

    detectors: dict[str, FeatureDetector] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # by SharedModel.name
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)


class Method:
    """Base class of every method. Subclass one of the kind classes below, set the class attributes.

    Class attributes:
        name: identifier in ``--ood``, the score tables and the state.
        kind: a :class:`MethodKind`.
        summary: one line, what it measures (shown in ``--help`` and the docs).
        requires: :class:`Requirements`.
        fit_by_default: fitted when ``--ood`` is not given (False for costly methods).
        config: an options dataclass (:mod:`nnunet_ood.methods.options`) whose fields become
            command-line flags of ``nnUNetv2_fit_ood`` (fit time) or ``nnUNetv2_predict_ood``
            (``predict_config``, inference time); methods may share one.
        tap: ``"module:Class"`` of the :class:`PatchTap` that listens to the network's forward passes
            of each patch for this method; methods naming the same tap share one instance.
        score_range: the values its case scores take by construction (a Gaussian-weighted mean of a
            non-negative map is never negative); a stored lower bound or threshold outside it is refused as
            corrupt when the state is loaded. Leave it ``ANY_SCORE`` unless it holds up to the last bit of
            floating point (``kl_uniform``, entropy - log C, may round to slightly above 0).
        special_thresholds: stored thresholds with a meaning of their own outside ``score_range``.
    """

    name: ClassVar[str]
    kind: ClassVar[MethodKind]
    summary: ClassVar[str]
    requires: ClassVar[Requirements] = Requirements()
    fit_by_default: ClassVar[bool] = True
    config: ClassVar[type | None] = None
    predict_config: ClassVar[type | None] = None
    tap: ClassVar[str | None] = None
    score_range: ClassVar[tuple[float, float]] = ANY_SCORE
    special_thresholds: ClassVar[tuple[float, ...]] = ()
    #: its parameters are fitted on the validation cases' final logits (after the fit's validation pass)
    needs_validation_logits: ClassVar[bool] = False
    #: its case score is a predicted risk 1 - Dice (so 1 - score is a predicted Dice); the evaluation reports
    #: the error of that prediction
    predicts_dice: ClassVar[bool] = False
    #: fitted on the fold's failure table (validation cases, clean and corrupted, with Dice and scores) by
    #: ``fit_on_failure_table``, after every other method of the fit
    needs_failure_table: ClassVar[bool] = False
    #: with several folds, its threshold is the folds' thresholds averaged (the prediction says this is only
    #: approximate); False when :meth:`combine_fold_calibrations` chooses one for the folds together
    averages_fold_thresholds: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @property
    def fittable(self) -> bool:
        """Fitted and calibrated per fold. Fold ensembles are not: they exist only for several folds."""
        return self.kind is not MethodKind.FOLD_ENSEMBLE

    # ------------------------------------------------------------------ fitting (one fold)
    def fit_parameters(self, context: FitContext) -> dict[str, Any]:
        """Fitted parameters, JSON-able, stored in the fold's manifest (none by default)."""
        return {}

    def fit_report(self, context: FitContext, models: FoldModels) -> dict[str, Any]:
        """Provenance entries recorded after the fit (e.g. checks a user should read); none by default."""
        return {}

    def fold_calibration(self, params: Mapping[str, Any]) -> MethodCalibration | None:
        """Its calibration from its own fitted parameters, if not from the validation cases' scores (``None``)."""
        return None

    def combine_fold_calibrations(self, calibrations: Sequence[MethodCalibration],
                                  fold_params: Sequence[Mapping[str, Any]]) -> MethodCalibration:
        """The calibration of the score several folds predict, from each fold's calibration and fitted
        parameters (default: bounds and threshold averaged, as the folds average their scores)."""
        from nnunet_ood.calibration import combine_calibrations

        return combine_calibrations(calibrations)

    def decision_rule(self, fold_params: Sequence[Mapping[str, Any]], methods_in_use: Sequence[str],
                      site: SiteCalibration | None = None, site_name: str | None = None) -> DecisionRule | None:
        """For a method that ``predicts_dice``: the accept/review rule in force (threshold, where it was set, the
        gate for unusual cases), from the folds' fitted parameters and a named calibration ``site`` if given."""
        return None

    def add_labelled_calibration_arguments(self, parser: Any) -> list[str]:
        """For a method that ``predicts_dice``: add to ``parser`` (argparse's) the flags of
        ``nnUNetv2_calibrate_ood -l`` that set its accept/review rule (default ``None``: the fit's value); return
        their destinations, the keys of the ``settings`` that :meth:`labelled_calibration` is given. None by
        default."""
        return []

    def labelled_calibration(self, fold_params: Sequence[Mapping[str, Any]], risks: Mapping[str, float],
                             dice: Mapping[str, float], settings: Mapping[str, Any],
                             log: Callable[[str], None] = print) -> tuple[MethodCalibration, dict[str, Any]]:
        """For a method that ``predicts_dice``: ``(calibration, what the site calibration records)``, its
        accept/review threshold chosen on a site's labelled cases (``nnUNetv2_calibrate_ood -l``) from their case
        scores ``risks`` and the Dice of their segmentations ``dice`` (by case), the folds' fitted parameters and
        the flags it added (``settings``, ``None`` where not given); ``log`` prints what was chosen."""
        raise NotImplementedError(f"{self.name} predicts no Dice: it has no threshold chosen on labelled cases")

    def failure_table_versions(self, options: Any) -> tuple[int, int]:
        """``(versions per validation case, corruptions chained per version)`` it needs in the failure table
        (``needs_failure_table``)."""
        return 0, 1

    def inputs_of(self, params: Mapping[str, Any]) -> list[str]:
        """The methods whose case scores it reads, given its fitted parameters (derived methods)."""
        return list(self.requires.methods)

    # ------------------------------------------------------------------ state (one fold)
    def state_entry(self, models: FoldModels, folder: str) -> dict[str, Any]:
        """Write this method's files into ``folder``; return its manifest entry (without calibration)."""
        return {"file": None, "class": "OutputScore", "config": models.method_params.get(self.name, {})}

    def load_state(self, entry: Mapping[str, Any], folder: str, models: FoldModels, device: Any) -> None:
        """Read this method's fitted state (files in ``folder``, manifest ``entry``) into ``models``."""
        config = entry.get("config")
        if config:
            models.method_params[self.name] = dict(config)

    # ------------------------------------------------------------------ case score
    def case_score(self, voxel_map: Tensor, case: Any) -> float | None:
        """The case score, if not the aggregation of the voxel map chosen at fit time (``None``)."""
        return None

    def case_record(self, case: Any) -> Mapping[str, Any] | None:
        """What its :meth:`fit_report` reads of a validation case, collected by its tap in the fit's validation pass
        (``TapContext.record_fit_reports``), so that the report needs no pass of its own; ``None``: nothing."""
        return None


class PatchFeatureMethod(Method):
    """A detector fitted per fold scores one feature vector per sliding-window patch.

    The patch scores (averaged over folds) are spread over each patch with nnU-Net's Gaussian
    weighting into a voxel map. ``features`` turns the bottleneck activations of a batch of patches
    into feature vectors; methods with the same ``feature_source`` share them.
    """

    kind = MethodKind.PATCH_FEATURES
    tap = "nnunet_ood.methods.base:BottleneckTap"
    feature_source: ClassVar[str]
    detector: ClassVar[str]  # "module:Class" of its FeatureDetector

    def features(self, bottleneck: Tensor, models: FoldModels) -> Tensor:
        """``(B, D)`` feature vectors of bottleneck activations ``(B, C, *spatial)``."""
        raise NotImplementedError

    def new_detector(self, options: Any, device: Any) -> FeatureDetector:
        """A fresh, unfitted detector configured from the fit options."""
        return load_object(self.detector)(device=device)

    def can_score(self, detector: FeatureDetector) -> bool:
        """Whether a (possibly held-out) detector has seen enough to score."""
        return detector.is_fitted

    def state_entry(self, models: FoldModels, folder: str) -> dict[str, Any]:
        import os

        detector = models.detectors[self.name]
        return {"file": os.path.basename(detector.save(folder, self.name)), "class": type(detector).__name__,
                "config": detector.get_config()}

    def load_state(self, entry: Mapping[str, Any], folder: str, models: FoldModels, device: Any) -> None:
        models.detectors[self.name] = load_object(self.detector).load(folder, device=device, state_name=self.name)


class PatchMapMethod(Method):
    """A hook (``tap``) gives a voxel map per patch; maps are Gaussian-weighted like nnU-Net's logits."""

    kind = MethodKind.PATCH_MAP

    def patch_map(self, tap: Any) -> Tensor:
        """``(B, *patch)`` map of the patches the tap has just seen."""
        raise NotImplementedError


class LogitMethod(Method):
    """A voxel map computed from the case's final logits; no extra forward pass."""

    kind = MethodKind.LOGITS
    #: each voxel's value depends on that voxel's logits alone, so the scorer may compute the map in slabs (its
    #: C x voxels temporaries then stay small at clinical sizes); False for a map that looks at neighbours
    voxelwise: bool = True

    def voxel_map(self, logits: Tensor, region_based: bool, fold_params: Sequence[Mapping[str, Any]]) -> Tensor:
        """``(*spatial)`` float32 map from logits ``(C, *spatial)``; ``fold_params``: fitted parameters per fold."""
        raise NotImplementedError


class FoldEnsembleMethod(Method):
    """Compares the folds' predictions of a case (:class:`nnunet_ood.methods.ensemble.FoldEnsemble`)."""

    kind = MethodKind.FOLD_ENSEMBLE
    requires = Requirements(several_folds=True)

    def voxel_map(self, ensemble: Any) -> Tensor:
        raise NotImplementedError


class DerivedMethod(Method):
    """A case score computed from the case scores of the methods in ``requires.methods``; no voxel map."""

    kind = MethodKind.DERIVED

    def derived_score(self, case_scores: Mapping[str, float], fold_params: Sequence[Mapping[str, Any]],
                      view: Any = None) -> float:
        """The case score from the other methods' ``case_scores``; ``view`` (a ``CaseView``) has the final logits."""
        raise NotImplementedError


class PatchTap:
    """Listens to nnU-Net's forward passes of one batch of patches; shared by the methods naming it.

    The case scorer creates one per distinct ``Method.tap`` with a :class:`TapContext`, calls
    :meth:`before_patch` before nnU-Net's passes of a patch and :meth:`after_patch` after them (taps that
    run passes of their own, ``runs_extra_passes``, after every other tap), and :meth:`remove` at the end.
    """

    runs_extra_passes: ClassVar[bool] = False

    def __init__(self, context: TapContext) -> None:
        self.context = context

    def begin_window(self, layout: Any, weights: Tensor) -> None:
        """A sliding window begins: its ``layout`` (:class:`~nnunet_ood.sliding_window.SlidingWindowLayout`) and
        nnU-Net's importance ``weights`` of a patch, for taps that assemble what they see over the window."""

    def before_patch(self, fold_index: int) -> None:
        """Arm the hooks for the next forward passes."""

    def after_patch(self, x: Tensor, patch_index: int) -> None:
        """Collect what the passes of the patches ``x`` produced."""

    def remove(self) -> None:
        """Detach every hook from the network."""


@dataclass
class TapContext:
    """What a tap may need: the network, the folds' fitted models, the prediction settings."""

    network: Any
    folds: Sequence[FoldModels]
    fold_names: Sequence[str]
    region_based: bool
    mirror_axes: tuple[int, ...]  # nnU-Net's mirror axes (spatial), empty when mirroring is off
    device: Any
    method_params: Mapping[str, Mapping[str, Any]]  # fitted parameters of the methods in use (first fold)
    predict_options: Mapping[str, Any]  # inference-time options by config key (Method.predict_config)
    shape_of_bottleneck: Callable[[], tuple[int, ...]]  # (C, *spatial) of one patch's bottleneck
    #: the fit's validation pass: taps also collect what their methods' fit reports read (Method.case_record)
    record_fit_reports: bool = False

    @functools.cached_property
    def bottleneck_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of the bottleneck of one patch (a dry run of the encoder, once)."""
        return tuple(self.shape_of_bottleneck())


class BottleneckTap(PatchTap):
    """Keeps the bottleneck activations of the un-mirrored pass of each patch (feature methods)."""

    def __init__(self, context: TapContext) -> None:
        from nnunet_ood.features import BottleneckCapture

        super().__init__(context)
        self._capture = BottleneckCapture(context.network)
        self.bottleneck: Tensor | None = None

    def before_patch(self, fold_index: int) -> None:
        self._capture.arm()  # the first network call of a patch is nnU-Net's un-mirrored one

    def after_patch(self, x: Tensor, patch_index: int) -> None:
        self.bottleneck = self._capture.take()

    def remove(self) -> None:
        self._capture.remove()
