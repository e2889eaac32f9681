"""``FitOptions``: everything a fit can be told, built in one place for the CLI and the trainer.

``nnUNetv2_fit_ood`` builds it from its arguments (:meth:`FitOptions.from_args`); ``nnUNetTrainerOOD``
holds one as the class attribute ``ood_fit_options``, so a trainer subclass can set every option the
command line has. Importing this module imports neither torch nor nnU-Net.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nnunet_ood.calibration import CASE_AGGREGATIONS
from nnunet_ood.errors import OODInputError
from nnunet_ood.methods import DEFAULT_FIT_METHODS, REGISTRY
from nnunet_ood.methods.options import Range, check_ranges

#: parts of the training cases for cross-fitted (out-of-sample) training scores
CALIBRATION_PARTS = 5
#: the largest seed NumPy's legacy ``np.random.seed`` takes (the fit seeds NumPy and torch with it)
MAX_SEED = 2**32 - 1
#: at most this many training patches (a seeded sample) enter the feature statistics
MAX_PATCHES = 100_000
#: training cases (a seeded sample) scored, cross-fitted, for the feature methods' normalisation bounds;
#: 0: the bounds come from the validation cases, like every threshold
NORMALIZATION_CASES = 0

# What a fit may ask for (checked when nnUNetv2_fit_ood parses its flags, and for FitOptions made in code). Every
# part keeps a detector's D x D statistics in memory (D = 8192 features: 0.5 GB each); the caps (patches and
# cases, "at most") are bounded by the data as well, their upper ends only catch typing errors.
CALIBRATION_PARTS_RANGE = Range(1, 20, integer=True)
MAX_PATCHES_RANGE = Range(1, 100_000_000, integer=True)
NORMALIZATION_CASES_RANGE = Range(0, 100_000, integer=True)
SEED_RANGE = Range(0, MAX_SEED, integer=True)


@dataclass(frozen=True)
class FitOptions:
    """What and how to fit (see ``nnUNetv2_fit_ood --help`` for each option).

    Args:
        methods: methods to fit; partners are added (methods sharing a shared model), the order is the
            registry's. Methods fitted earlier and not named are kept.
        checkpoint: the checkpoint to fit on (predict later with the same ``-chk``).
        device: ``cpu``, ``cuda`` or ``mps`` (or a ``torch.device``).
        seed: seeds the AE training, the cross-fitting parts, the samplers and the dropout masks.
        progress: show progress bars.
        batch_size: patches per encoder pass when collecting features.
        max_patches: at most this many training patches, a seeded uniform sample, enter the feature statistics.
        normalization_cases: 0 (default): every method's normalisation bounds come from the validation cases
            (out of sample, no extra cost); N > 0: the feature methods' bounds come from N training cases (a
            seeded sample), scored by detectors fitted without them (cross-fitting over ``calibration_parts``
            parts; costs one more D x D factorisation per part, and the N cases' features in memory).
        calibration_parts: parts of the cross-fitting (1 = in-sample training scores, as in the paper).
        aggregations: method -> how its voxel map becomes its case score (``mean``, ``foreground_mean``,
            ``max_patch``).
        method_configs: options dataclass instances of the methods, by their ``key`` (e.g.
            ``{"sd": SDTrainingConfig(max_epochs=20)}``); the defaults for those not given.
    """

    methods: tuple[str, ...] = DEFAULT_FIT_METHODS
    checkpoint: str = "checkpoint_final.pth"
    device: Any = "cpu"
    seed: int = 0
    progress: bool = True
    batch_size: int = 4
    calibration_parts: int = CALIBRATION_PARTS
    max_patches: int = MAX_PATCHES
    normalization_cases: int = NORMALIZATION_CASES
    aggregations: Mapping[str, str] = field(default_factory=dict)
    method_configs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        methods = tuple(m.name for m in REGISTRY.resolve_fit(self.methods))
        object.__setattr__(self, "methods", methods)
        bad = {m: a for m, a in self.aggregations.items() if m not in methods or a not in CASE_AGGREGATIONS}
        if bad:
            raise OODInputError(f"cannot aggregate {bad}: methods must be among those fitted ({', '.join(methods)}) "
                                f"and aggregations one of {', '.join(CASE_AGGREGATIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise OODInputError(f"--seed must be an integer in 0..{MAX_SEED} (NumPy's seeds), got {self.seed!r}")
        CALIBRATION_PARTS_RANGE.check(self.calibration_parts, "--calibration_parts")
        MAX_PATCHES_RANGE.check(self.max_patches, "--max_patches")
        NORMALIZATION_CASES_RANGE.check(self.normalization_cases, "--normalization_cases")
        if self.batch_size < 1:
            raise OODInputError(f"the fit's batch size must be at least 1, got {self.batch_size}")
        classes = {c.key: c for c in REGISTRY.config_classes("fit")}
        for key, config in self.method_configs.items():
            if key not in classes or not isinstance(config, classes[key]):
                expected = classes[key].__name__ if key in classes else "known key"
                raise OODInputError(f"method_configs[{key!r}] must be a {expected}; known keys: {', '.join(classes)}")
        for config_class in classes.values():  # the ranges of the flags, for options made in code too
            check_ranges(self.config(config_class))

    def config(self, config_class: type) -> Any:
        """The options instance of ``config_class`` (its defaults unless given)."""
        return self.method_configs.get(config_class.key) or config_class()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The fit's flags: ``--ood``, ``--seed``, aggregation, cross-fitting and every method's options."""
        parser.add_argument("--ood", nargs="+", default=None, metavar="METHOD", help=REGISTRY.fit_help())
        parser.add_argument("--normalization_cases", type=NORMALIZATION_CASES_RANGE.parser("--normalization_cases"),
                            default=NORMALIZATION_CASES,
                            help="0 (default): normalisation bounds from the validation cases; N > 0: the feature "
                                 "methods' bounds from N training cases (a seeded sample; at most the fold's), "
                                 f"cross-fitted; {NORMALIZATION_CASES_RANGE}")
        parser.add_argument("--calibration_parts", type=CALIBRATION_PARTS_RANGE.parser("--calibration_parts"),
                            default=CALIBRATION_PARTS,
                            help="with --normalization_cases: the training cases are scored by detectors fitted "
                                 f"without their part, of this many (default: {CALIBRATION_PARTS}; 1 = in-sample, as "
                                 f"in the paper; memory and time grow with it; {CALIBRATION_PARTS_RANGE})")
        parser.add_argument("--max_patches", type=MAX_PATCHES_RANGE.parser("--max_patches"), default=MAX_PATCHES,
                            help="at most this many training patches, a seeded uniform sample, are read for the "
                                 f"feature statistics (default: {MAX_PATCHES}; {MAX_PATCHES_RANGE})")
        parser.add_argument("--ood_aggregation", nargs="+", default=[], metavar="METHOD=HOW",
                            help="how a method's voxel map becomes its case score: mean (default, METHODS.md), "
                                 "foreground_mean (over nnU-Net's predicted foreground) or max_patch (largest patch "
                                 "mean), e.g. entropy=foreground_mean mahalanobis=max_patch; fixed at fit time")
        parser.add_argument("--seed", type=SEED_RANGE.parser("--seed"), default=0,
                            help=f"random seed (default: 0; {SEED_RANGE}, NumPy's seeds)")
        REGISTRY.add_config_arguments(parser, "fit")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> FitOptions:
        """Options from parsed ``nnUNetv2_fit_ood`` arguments (checked; no heavy import)."""
        pairs = [item.split("=", 1) for item in args.ood_aggregation]
        if any(len(p) != 2 for p in pairs):
            raise OODInputError(f"--ood_aggregation takes METHOD=HOW pairs, got {' '.join(args.ood_aggregation)}")
        values = dict(methods=tuple(args.ood or DEFAULT_FIT_METHODS), checkpoint=args.chk, seed=args.seed,
                      progress=not args.disable_progress_bar, calibration_parts=args.calibration_parts,
                      max_patches=args.max_patches, normalization_cases=args.normalization_cases,
                      aggregations=dict(pairs), method_configs=REGISTRY.configs_from_args(args, "fit"))
        return cls(**{**values, **overrides})
