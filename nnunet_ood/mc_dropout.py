"""``mc_dropout``: Monte-Carlo dropout inserted post hoc into a network trained without it (METHODS.md §3).

nnU-Net trains without dropout; González et al. insert it afterwards. Forward pre-hooks on chosen
decoder stages apply dropout (always in training mode) to the stage's input while active; nothing in
the network changes. For every patch, after nnU-Net's own (dropout-free) passes, the network runs
``passes`` more times with dropout on; per voxel the score is the standard deviation of the class
probabilities over those passes, averaged over classes. Off by default: it multiplies the cost of the
un-mirrored pass by ``passes``. Dropout masks come from a generator seeded per patch, so results repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nnunet_ood.distortion import probabilities
from nnunet_ood.errors import OODInputError
from nnunet_ood.features import unwrap_network
from nnunet_ood.tta import ProbabilitySpread


@dataclass
class MCDropoutConfig:
    """Where and how much dropout (``nnUNetv2_fit_ood --mc_dropout_*``); stored with the fitted state."""

    rate: float = 0.1
    passes: int = 10
    stages: tuple[int, ...] | None = None  # indices into decoder.stages; None: every decoder stage
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1 or self.passes < 2:
            raise OODInputError(f"mc_dropout needs a rate in (0, 1) and at least 2 passes, got {self.rate} and "
                                f"{self.passes}")
        self.stages = None if self.stages is None else tuple(int(s) for s in self.stages)

    def to_json(self) -> dict:
        return asdict(self)


class PostHocDropout:
    """Dropout on the inputs of decoder stages, switched on only inside :meth:`spread`."""

    def __init__(self, network: nn.Module, config: MCDropoutConfig, region_based: bool) -> None:
        net = unwrap_network(network)
        stages = getattr(getattr(net, "decoder", None), "stages", None)
        if stages is None:
            raise OODInputError(f"cannot insert dropout into {type(net).__name__}: it has no decoder.stages")
        chosen = range(len(stages)) if config.stages is None else config.stages
        if any(not 0 <= i < len(stages) for i in chosen):
            raise OODInputError(f"--mc_dropout_stages {list(chosen)} out of range: the decoder has {len(stages)} "
                                f"stages (0..{len(stages) - 1})")
        self.network, self.config, self.region_based = network, config, region_based
        self._active = False
        self._generator: torch.Generator | None = None
        self._handles = [stages[i].register_forward_pre_hook(self._drop) for i in chosen]

    def _drop(self, module: nn.Module, inputs: tuple):
        if not self._active:
            return None
        x = inputs[0]
        keep = torch.rand(x.shape, generator=self._generator, device=self._generator.device) >= self.config.rate
        return (x * keep.to(x.device, x.dtype) / (1 - self.config.rate), *inputs[1:])

    def spread(self, x: torch.Tensor, patch_index: int) -> torch.Tensor:
        """Per-voxel spread ``(B, *patch)`` of ``passes`` dropout predictions of the patch batch ``x``."""
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


def config_from_params(params: dict) -> MCDropoutConfig:
    """The config stored in the fitted state's manifest."""
    stages: Sequence[int] | None = params.get("stages")
    return MCDropoutConfig(rate=float(params.get("rate", 0.1)), passes=int(params.get("passes", 10)),
                           stages=None if stages is None else tuple(stages), seed=int(params.get("seed", 0)))
