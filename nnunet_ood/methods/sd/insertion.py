"""Segmentation Distortion inside a U-Net's forward pass, through hooks only (METHODS.md §2).

While armed, :class:`AutoencoderInsertion` runs the AE inside one forward call of the unchanged
network; the encoder runs once. Two ways to get the logits with the AE, U∘r(x):

* ``batched=True`` (the reference code's trick): a forward hook on the encoder doubles every skip along
  the batch and puts r(x) next to x, so the decoder runs once on [x; r(x)]; a forward hook on the
  network splits the output, hands the first half back and keeps the second. Fastest on a GPU, but
  a decoder call on a batch of two is not bit-identical to one on a batch of one (about 1e-6 in the
  logits on the CPU), so the segmentation could differ from stock nnU-Net at exact ties.
* ``batched=False`` (default): the network's own decoder call runs unchanged on x, so its logits are
  bit-identical to stock nnU-Net; the hook on the network then calls the decoder once more on the
  skips with r(x). The same arithmetic, one more (smaller) decoder call.

Skip connections are left untouched, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnunet_ood.aggregation import PatchMapAccumulator
from nnunet_ood.errors import OODInputError, OODStateError
from nnunet_ood.features import bottleneck_module, unwrap_network
from nnunet_ood.methods.base import PatchTap, TapContext
from nnunet_ood.methods.sd import AE_STATE_NAME, SDPredictConfig
from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder
from nnunet_ood.segmentation import dice, foreground_masks, probabilities
from nnunet_ood.sliding_window import SlidingWindowLayout


@dataclass
class DistortionPass:
    """What one armed forward call produced (batch B)."""

    logits: torch.Tensor  # U(I): the U-Net's own logits, (B, K, *patch)
    logits_ae: torch.Tensor  # U∘r(x): logits with the reconstruction in the bottleneck
    bottleneck: torch.Tensor  # x, (B, C, *spatial)
    reconstruction: torch.Tensor  # r(x)
    latent: torch.Tensor  # z, (B, latent_dim)


def segmentation_distortion(logits: torch.Tensor, logits_ae: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Per-voxel SD ``(B, *patch)``: mean over classes of the squared difference of probabilities (paper eq. 4)."""
    return (probabilities(logits, region_based) - probabilities(logits_ae, region_based)).square().mean(dim=1)


def segmentation_agreement(logits: torch.Tensor, logits_ae: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Mean foreground Dice ``(B,)`` between the segmentations with and without the AE (both empty = 1)."""
    if region_based:
        a, b = logits > 0, logits_ae > 0  # per-region masks, channel = region
    else:  # the argmax of the logits is that of the probabilities
        a, b = foreground_masks(logits, False, dim=1), foreground_masks(logits_ae, False, dim=1)
    return dice(a, b, a.ndim - 2).mean(1)


class WindowAgreement:
    """The Dice between a case's segmentations with and without the AE: the un-mirrored logits of every patch, with
    and without it, Gaussian-weighted over the sliding window as nnU-Net assembles a case (the fit's report)."""

    def __init__(self, layout: SlidingWindowLayout, weights: torch.Tensor, region_based: bool) -> None:
        self.layout, self.weights, self.region_based = layout, weights, region_based
        self._logits: PatchMapAccumulator | None = None

    def add(self, logits: torch.Tensor, logits_ae: torch.Tensor, first_patch: int) -> None:
        """A batch of patches' logits ``(B, C, *patch)`` with and without the AE; patch ``first_patch`` comes first."""
        both = torch.cat((logits, logits_ae), dim=1).float()
        if self._logits is None:
            self._logits = PatchMapAccumulator(both.shape[1], self.layout.padded_shape, self.weights)
        for i in range(both.shape[0]):
            self._logits.add(both[i], self.layout.slicers[first_patch + i])

    def dice(self) -> float:
        merged = self._logits.result(self.layout.revert_padding)[None]
        heads = merged.shape[1] // 2
        return float(segmentation_agreement(merged[:, :heads], merged[:, heads:], self.region_based)[0])


class AutoencoderInsertion:
    """Hooks that run an autoencoder on the bottleneck of the next forward call once armed.

    ``autoencoder`` may be swapped between calls (one per fold). Gradients flow through the decoder
    into the AE when the call is made with grad enabled, which is how the AE is trained; the U-Net's
    own parameters are never touched.
    """

    def __init__(self, network: nn.Module, autoencoder: BottleneckAutoencoder | None = None,
                 batched: bool = False) -> None:
        net = unwrap_network(network)
        bottleneck_module(net)  # a clear error if there is no encoder.stages
        if not hasattr(net, "decoder"):
            raise OODInputError(f"cannot insert the SD autoencoder into {type(net).__name__}: it has no `decoder`; "
                                "nnunet-ood supports U-Nets from dynamic_network_architectures")
        self.autoencoder = autoencoder
        self.batched = batched
        self._decoder = net.decoder
        self._armed = False
        self._batch = 0
        self._parts: dict[str, torch.Tensor] = {}
        self._skips: list[torch.Tensor] = []
        self._result: DistortionPass | None = None
        self._handles = [net.encoder.register_forward_hook(self._on_encoder),
                         net.register_forward_hook(self._on_network)]

    def _on_encoder(self, module: nn.Module, inputs: tuple, skips):
        if not self._armed:
            return None
        if not isinstance(skips, (list, tuple)):
            raise OODInputError("the encoder of this U-Net does not return its skips as a list; cannot insert the "
                                "SD autoencoder (set return_skips=True or use a dynamic_network_architectures U-Net)")
        x = skips[-1]
        reconstruction, latent = self.autoencoder(x.to(next(self.autoencoder.parameters()).dtype))
        reconstruction = reconstruction.to(x.dtype)
        self._batch = x.shape[0]
        self._parts = {"bottleneck": x, "reconstruction": reconstruction, "latent": latent}
        if not self.batched:
            self._skips = list(skips[:-1])
            return None
        return [torch.cat((s, s)) for s in skips[:-1]] + [torch.cat((x, reconstruction))]

    def _on_network(self, module: nn.Module, inputs: tuple, output):
        if not self._armed or not self._parts:
            return None
        self._armed = False
        if isinstance(output, (list, tuple)):  # deep supervision: the full-resolution output comes first
            output = output[0]
        # the caller may add to the returned logits in place (nnU-Net sums its mirrored passes into
        # them), so what is kept must be a copy
        if not self.batched:
            logits_ae = self._decoder(self._skips + [self._parts["reconstruction"]])
            logits_ae = logits_ae[0] if isinstance(logits_ae, (list, tuple)) else logits_ae
            self._result = DistortionPass(output.clone(), logits_ae, **self._parts)
            self._parts, self._skips = {}, []
            return None
        b = self._batch
        self._result = DistortionPass(output[:b].clone(), output[b:], **self._parts)
        self._parts = {}
        return output[:b]

    def arm(self) -> None:
        """Insert the AE into the next forward call of the network."""
        if self.autoencoder is None:
            raise RuntimeError("no autoencoder to insert")
        self._result, self._parts, self._armed = None, {}, True

    def take(self) -> DistortionPass:
        """What the armed call produced (and forget it)."""
        if self._result is None:
            raise RuntimeError("the SD hooks captured nothing: the network did not run since arm()")
        out, self._result = self._result, None
        return out

    def remove(self) -> None:
        """Detach the hooks from the network."""
        for handle in self._handles:
            handle.remove()
        self._armed, self._parts, self._result = False, {}, None


def check_autoencoders(context: TapContext) -> None:
    """Every fold's autoencoder must fit this network's bottleneck (one-line error naming the refit)."""
    expected = context.bottleneck_shape
    for index, models in enumerate(context.folds):
        ae = models.shared.get(AE_STATE_NAME)
        got = None if ae is None else (ae.in_channels, *ae.spatial_shape)
        if got != expected:
            raise OODStateError(f"the SD autoencoder of fold {context.fold_names[index]} expects bottlenecks of shape "
                                f"{got} but this network's is {expected}; re-fit it with nnUNetv2_fit_ood --ood sd")
        ae.to(context.device).eval()


class AutoencoderTap(PatchTap):
    """Puts each fold's autoencoder into the un-mirrored pass of every patch; keeps the per-voxel distortion.

    The distortion is computed as soon as the un-mirrored pass ends (a forward hook registered after the insertion's),
    so that the two logits it compares (two patches of C channels each) are not held through nnU-Net's mirrored
    passes of the patch, whose activations are the peak memory of a prediction. In the fit's validation pass
    (``record_fit_reports``) it also assembles them over the window, for :meth:`take_agreement`."""

    def __init__(self, context: TapContext) -> None:
        super().__init__(context)
        check_autoencoders(context)
        options = context.predict_options.get(SDPredictConfig.key) or SDPredictConfig()
        self._insertion = AutoencoderInsertion(context.network, None, batched=options.batched_decoder)
        self._handle = unwrap_network(context.network).register_forward_hook(self._after_pass)
        self._waiting = False
        self._agreement: WindowAgreement | None = None
        self._kept: DistortionPass | None = None
        self.distortion: torch.Tensor | None = None

    def begin_window(self, layout: SlidingWindowLayout, weights: torch.Tensor) -> None:
        if self.context.record_fit_reports:
            self._agreement = WindowAgreement(layout, weights, self.context.region_based)

    def before_patch(self, fold_index: int) -> None:
        self._insertion.autoencoder = self.context.folds[fold_index].shared[AE_STATE_NAME]
        self._insertion.arm()
        self._waiting, self.distortion = True, None

    def _after_pass(self, module: nn.Module, inputs: tuple, output) -> None:
        if not self._waiting:
            return
        self._waiting = False
        result = self._insertion.take()
        self.distortion = segmentation_distortion(result.logits, result.logits_ae, self.context.region_based)
        self._kept = result if self._agreement is not None else None

    def after_patch(self, x: torch.Tensor, patch_index: int) -> None:
        if self.distortion is None:
            raise RuntimeError("the SD hooks captured nothing: the network did not run since before_patch()")
        if self._kept is not None:
            self._agreement.add(self._kept.logits, self._kept.logits_ae, patch_index)
            self._kept = None

    def take_agreement(self) -> float | None:
        """The Dice between the window's segmentations with and without the AE (``None`` unless recording)."""
        if self._agreement is None:
            return None
        agreement, self._agreement = self._agreement.dice(), None
        return agreement

    def remove(self) -> None:
        self._insertion.remove()
        self._handle.remove()
        self._waiting, self._agreement, self._kept = False, None, None
