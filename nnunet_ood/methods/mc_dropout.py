"""``mc_dropout``: Monte-Carlo dropout inserted post hoc into a network trained without it (METHODS.md §3).

nnU-Net trains without dropout; González et al. insert it afterwards. Forward pre-hooks on chosen
decoder stages apply dropout (always in training mode) to the stage's input while active; nothing in
the network changes. For every patch, after nnU-Net's own (dropout-free) passes, the network runs
``passes`` more times with dropout on; per voxel the score is the standard deviation of the class
probabilities over those passes, averaged over classes. Off by default: it multiplies the cost of the
un-mirrored pass by ``passes``. Dropout masks come from a generator seeded per patch, so results repeat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nnunet_ood.errors import OODInputError
from nnunet_ood.methods.base import NON_NEGATIVE, PatchMapMethod, PatchTap, TapContext
from nnunet_ood.methods.options import Range, config_from_json, config_to_json, option
from nnunet_ood.methods.tta import ProbabilitySpread
from nnunet_ood.segmentation import probabilities

if TYPE_CHECKING:
    from torch import Tensor

    from nnunet_ood.methods.context import FitContext


@dataclass
class MCDropoutConfig:
    """Where and how much dropout (``nnUNetv2_fit_ood --mc_dropout_*``); stored with the fitted state."""

    key: ClassVar[str] = "mc_dropout"
    title: ClassVar[str] = "MC dropout"

    rate: float = option(0.1, "--mc_dropout_rate", "dropout rate", type=float,
                         range=Range(0, 1, open_low=True, open_high=True))
    # each pass is one more forward pass of every patch: 100 is ten times the literature's usual 10
    passes: int = option(10, "--mc_dropout_passes", "forward passes with dropout per patch", type=int,
                         range=Range(2, 100, integer=True))
    # the upper end is the network's: checked against its decoder stages when it is built (check_network)
    stages: tuple[int, ...] | None = option(None, "--mc_dropout_stages", "decoder stages (0 = lowest resolution) "
                                            "whose input gets dropout", type=int, nargs="+", default_text="all",
                                            range=Range(0, None, integer=True))
    seed: int = option(0, None, "seed of the dropout masks (nnUNetv2_fit_ood --seed)")

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1 or self.passes < 2:
            raise OODInputError(f"mc_dropout needs a rate in (0, 1) and at least 2 passes, got {self.rate} and "
                                f"{self.passes}")
        self.stages = None if self.stages is None else tuple(int(s) for s in self.stages)
        if self.stages is not None and (not self.stages or min(self.stages) < 0):
            raise OODInputError(f"--mc_dropout_stages takes decoder stage numbers >= 0, got {list(self.stages)}")

    def check_network(self, network: Any) -> None:
        """Given stages must exist in the network (checked by the fit whether mc_dropout is fitted or not)."""
        if self.stages is not None:
            dropout_stages(network, self)


def dropout_stages(network: Any, config: MCDropoutConfig) -> list:
    """The decoder stages of ``network`` that ``config`` puts dropout on; one-line errors for a network without
    decoder stages and for stages out of range."""
    from nnunet_ood.features import unwrap_network

    net = unwrap_network(network)
    stages = getattr(getattr(net, "decoder", None), "stages", None)
    if stages is None:
        raise OODInputError(f"cannot insert dropout into {type(net).__name__}: it has no decoder.stages")
    chosen = range(len(stages)) if config.stages is None else config.stages
    if any(not 0 <= i < len(stages) for i in chosen):
        raise OODInputError(f"--mc_dropout_stages {list(chosen)} out of range: the decoder has {len(stages)} "
                            f"stages (0..{len(stages) - 1})")
    return [stages[i] for i in chosen]


class PostHocDropout:
    """Dropout on the inputs of decoder stages, switched on only inside :meth:`spread`."""

    def __init__(self, network: Any, config: MCDropoutConfig, region_based: bool) -> None:
        stages = dropout_stages(network, config)
        self.network, self.config, self.region_based = network, config, region_based
        self._active = False
        self._generator = None
        self._handles = [stage.register_forward_pre_hook(self._drop) for stage in stages]

    def _drop(self, module: Any, inputs: tuple):
        import torch

        if not self._active:
            return None
        x = inputs[0]
        keep = torch.rand(x.shape, generator=self._generator, device=self._generator.device) >= self.config.rate
        return (x * keep.to(x.device, x.dtype) / (1 - self.config.rate), *inputs[1:])

    def spread(self, x: Tensor, patch_index: int) -> Tensor:
        """Per-voxel spread ``(B, *patch)`` of ``passes`` dropout predictions of the patch batch ``x``."""
        import torch

        device = x.device if x.device.type == "cuda" else torch.device("cpu")
        self._generator = torch.Generator(device=device).manual_seed(self.config.seed * 1_000_003 + patch_index)
        spread = ProbabilitySpread()
        self._active = True
        try:
            for _ in range(self.config.passes):
                logits = self.network(x)
                spread.add(probabilities(logits[0] if isinstance(logits, (list, tuple)) else logits,
                                         self.region_based))
        finally:
            self._active = False
        return spread.std_over_predictions()

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


class DropoutTap(PatchTap):
    """Runs the dropout passes of each patch, after nnU-Net's own passes (which stay dropout-free)."""

    runs_extra_passes = True

    def __init__(self, context: TapContext) -> None:
        super().__init__(context)
        config = config_from_json(MCDropoutConfig, context.method_params.get(MCDropout.name))
        self._dropout = PostHocDropout(context.network, config, context.region_based)
        self.spread: Tensor | None = None

    def after_patch(self, x: Tensor, patch_index: int) -> None:
        self.spread = self._dropout.spread(x, patch_index)

    def remove(self) -> None:
        self._dropout.remove()


class MCDropout(PatchMapMethod):
    name = "mc_dropout"
    score_range = NON_NEGATIVE  # a standard deviation
    summary = ("standard deviation of the class probabilities over forward passes with dropout inserted post hoc "
               "on the decoder stages, per voxel")
    fit_by_default = False  # it multiplies the cost of the un-mirrored pass by the number of passes
    config = MCDropoutConfig
    tap = "nnunet_ood.methods.mc_dropout:DropoutTap"

    def fit_parameters(self, context: FitContext) -> dict[str, Any]:
        return config_to_json(dataclasses.replace(context.options.config(MCDropoutConfig), seed=context.options.seed))

    def patch_map(self, tap: DropoutTap) -> Tensor:
        return tap.spread

    def load_state(self, entry: Any, folder: str, models: Any, device: Any) -> None:
        super().load_state(entry, folder, models, device)
        config_from_json(MCDropoutConfig, models.method_params.get(self.name))  # checks the stored configuration
