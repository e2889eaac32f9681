"""``tta``: disagreement between nnU-Net's mirrored forward passes of a patch (METHODS.md §3).

nnU-Net already runs, for every patch, the un-mirrored pass and one pass per combination of its mirror
axes (combinations of increasing size, in axis order), flips each result back and averages the logits.
A forward hook on the network sees each of those outputs; it flips it back the same way and streams
the class probabilities into a running mean and sum of squared deviations (Welford), so no extra forward pass
and no stack of outputs is needed. Per voxel: the standard deviation over the passes, averaged over classes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nnunet_ood.methods.base import NON_NEGATIVE, PatchMapMethod, PatchTap, Requirements, TapContext
from nnunet_ood.segmentation import probabilities

if TYPE_CHECKING:
    from torch import Tensor


class ProbabilitySpread:
    """Streams class probabilities of several predictions of the same patch; per voxel, their spread.

    Welford's update of the running mean and sum of squared deviations, in place and in the predictions' own
    precision: E[p^2] - E[p]^2 cancels badly in float32 when the passes agree closely, Welford's form does not, so
    it needs no float64 copies (two float32 patches of C channels are held through nnU-Net's mirrored passes instead
    of two float64 ones, and the passes allocate no float64 temporaries)."""

    def __init__(self) -> None:
        self.n = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def add(self, p: Tensor) -> None:
        """One prediction's probabilities ``(B, C, *patch)``."""
        self.n += 1
        if self._mean is None:
            self._mean, self._m2 = p.clone(), p.new_zeros(p.shape)
            return
        delta = p - self._mean
        self._mean.add_(delta, alpha=1 / self.n)
        self._m2.addcmul_(delta, p - self._mean)

    def std_over_predictions(self) -> Tensor:
        """``(B, *patch)``: population standard deviation over the predictions, averaged over classes."""
        return (self._m2 / self.n).clamp_min(0).sqrt().mean(dim=1).float()


def mirror_axes_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Tensor axes flipped in nnU-Net's mirrored passes, in the order nnU-Net runs them (batch, channel first)."""
    axes = [a + 2 for a in mirror_axes]
    return [c for size in range(1, len(axes) + 1) for c in itertools.combinations(axes, size)]


class MirroredPasses(PatchTap):
    """Base of the taps that see each of nnU-Net's passes of a patch: a forward hook on the network, armed by
    :meth:`before_patch` for the un-mirrored pass and one pass per mirror combination, that flips each output back to
    the patch's orientation and hands it to :meth:`add_pass`."""

    #: the method's name, in the error raised when the mirrored passes did not run
    method_name = "this method"

    def __init__(self, context: TapContext) -> None:
        from nnunet_ood.features import unwrap_network

        super().__init__(context)
        self._combinations = mirror_axes_combinations(context.mirror_axes)
        self._calls = -1  # -1: disarmed
        self._handle = unwrap_network(context.network).register_forward_hook(self._hook)

    def before_patch(self, fold_index: int) -> None:
        """Watch the next 1 + (number of mirror combinations) network calls."""
        self._calls = 0

    def add_pass(self, logits: Tensor) -> None:
        """One pass's logits ``(B, C, *patch)``, in the patch's orientation."""
        raise NotImplementedError

    def _hook(self, module: Any, inputs: tuple, output: Any) -> None:
        if self._calls < 0 or self._calls > len(self._combinations):
            return
        logits = output[0] if isinstance(output, (list, tuple)) else output
        if self._calls > 0:
            logits = logits.flip(self._combinations[self._calls - 1])  # back to the patch's orientation
        self.add_pass(logits)
        self._calls += 1

    def end_passes(self) -> None:
        """Disarm after a patch's passes; an error if the mirrored passes did not run."""
        if self._calls < 2:
            raise RuntimeError(f"{self.method_name} needs the mirrored passes, but the network ran only once since "
                               "arm()")
        self._calls = -1

    def remove(self) -> None:
        self._handle.remove()
        self._calls = -1


class MirroredPassTap(MirroredPasses):
    """Turns the passes of one patch into the per-voxel ``spread``."""

    method_name = "tta"

    def __init__(self, context: TapContext) -> None:
        super().__init__(context)
        self._spread = ProbabilitySpread()
        self.spread: Tensor | None = None

    def before_patch(self, fold_index: int) -> None:
        super().before_patch(fold_index)
        self._spread = ProbabilitySpread()

    def add_pass(self, logits: Tensor) -> None:
        self._spread.add(probabilities(logits, self.context.region_based))

    def after_patch(self, x: Tensor, patch_index: int) -> None:
        """Per-voxel disagreement ``(B, *patch)``: population std over the passes, mean over classes."""
        self.end_passes()
        self.spread, self._spread = self._spread.std_over_predictions(), ProbabilitySpread()


class TTA(PatchMapMethod):
    name = "tta"
    score_range = NON_NEGATIVE  # a standard deviation
    summary = ("standard deviation of the class probabilities over nnU-Net's mirrored passes, averaged over "
               "classes, per voxel")
    requires = Requirements(mirroring=True)
    tap = "nnunet_ood.methods.tta:MirroredPassTap"

    def patch_map(self, tap: MirroredPassTap) -> Tensor:
        return tap.spread
