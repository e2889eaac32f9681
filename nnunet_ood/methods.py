"""The OOD methods this plugin knows, and what each one needs (METHODS.md §1-2).

* Feature methods score one feature vector per sliding-window patch with a fitted detector; the
  patch scores are spread over the patch with nnU-Net's Gaussian weighting.
* Voxel methods produce a map per patch that is accumulated like nnU-Net's logits.
* Methods built on the SD autoencoder share it, so they are fitted together.
* Output-based methods are computed from the final logits of the case (no extra forward pass).
"""

from __future__ import annotations

from collections.abc import Iterable

from nnunet_ood.errors import OODInputError

#: feature method -> which per-patch features it scores ("bottleneck": pooled U-Net bottleneck,
#: "latent": the SD autoencoder's latent vector)
FEATURE_METHODS: dict[str, str] = {"mahalanobis": "bottleneck", "knn": "bottleneck", "latent_mahalanobis": "latent"}
#: methods whose per-patch output is a voxel map
VOXEL_METHODS: tuple[str, ...] = ("sd", "tta", "mc_dropout")
#: methods that need the SD autoencoder (trained once, shared)
AUTOENCODER_METHODS: tuple[str, ...] = ("sd", "latent_mahalanobis")
#: methods computed from the logits nnU-Net already has (see nnunet_ood.output_scores)
LOGIT_METHODS: tuple[str, ...] = ("max_softmax", "entropy", "energy", "kl_uniform", "temperature")
#: methods that need the full forward pass (decoder included) to be calibrated
INFERENCE_PASS_METHODS: tuple[str, ...] = VOXEL_METHODS + LOGIT_METHODS
#: every method nnUNetv2_fit_ood can fit, in the order they appear in tables
FITTABLE_METHODS: tuple[str, ...] = ("mahalanobis", "knn", "sd", "latent_mahalanobis", *LOGIT_METHODS, "tta",
                                     "mc_dropout")
#: what is fitted unless asked otherwise: everything but mc_dropout, which multiplies inference cost
DEFAULT_FIT_METHODS: tuple[str, ...] = tuple(m for m in FITTABLE_METHODS if m != "mc_dropout")


def needs_autoencoder(methods: Iterable[str]) -> bool:
    """Whether any of ``methods`` needs the SD autoencoder."""
    return any(m in AUTOENCODER_METHODS for m in methods)


def resolve_fit_methods(methods: Iterable[str]) -> list[str]:
    """Check names and add partners: asking for sd or latent_mahalanobis fits both (one shared AE)."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in FITTABLE_METHODS]
    if unknown:
        raise OODInputError(f"unknown OOD method(s) {', '.join(unknown)}; choose from {', '.join(FITTABLE_METHODS)}")
    if needs_autoencoder(methods):
        methods += [m for m in AUTOENCODER_METHODS if m not in methods]
    return [m for m in FITTABLE_METHODS if m in methods]
