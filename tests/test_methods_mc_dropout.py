"""``mc_dropout``: dropout inserted post hoc on the decoder stages, against a hand-written decoder loop."""

from __future__ import annotations

import pytest
import torch

from nnunet_ood.errors import OODInputError
from nnunet_ood.methods.mc_dropout import MCDropoutConfig, PostHocDropout


def test_mc_dropout_matches_a_hand_written_decoder_loop(tiny_unet):
    """PostHocDropout against the decoder run by hand with the same dropout masks (same seeded generator)."""
    net = tiny_unet(2)
    x = torch.randn(2, 1, 16, 16)
    config = MCDropoutConfig(rate=0.3, passes=4, stages=None, seed=5)
    with torch.no_grad():
        stock = net(x)
        dropout = PostHocDropout(net, config, region_based=False)
        got = dropout.spread(x, patch_index=3)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 3)
        probs = []
        for _ in range(config.passes):
            skips = net.encoder(x)
            lres = skips[-1]
            decoder = net.decoder
            for s in range(len(decoder.stages)):
                h = torch.cat((decoder.transpconvs[s](lres), skips[-(s + 2)]), 1)
                keep = torch.rand(h.shape, generator=generator) >= config.rate
                lres = decoder.stages[s](h * keep / (1 - config.rate))
            probs.append(torch.softmax(decoder.seg_layers[-1](lres), 1))
        expected = torch.stack(probs).std(dim=0, unbiased=False).mean(dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert float(got.mean()) > 0
        assert torch.equal(net(x), stock)  # outside spread() the network is dropout-free
        dropout.remove()
    with pytest.raises(OODInputError, match="out of range"):
        PostHocDropout(net, MCDropoutConfig(stages=(7,)), region_based=False)


def test_config_is_checked_and_round_trips_through_json():
    from nnunet_ood.methods.options import config_from_json, config_to_json

    config = MCDropoutConfig(rate=0.2, passes=3, stages=(0, 2), seed=4)
    assert config_from_json(MCDropoutConfig, config_to_json(config)) == config
    assert config_to_json(config)["stages"] == [0, 2]
    for bad in ({"rate": 1.0}, {"rate": 0.0}, {"passes": 1}):
        with pytest.raises(OODInputError, match="mc_dropout needs"):
            MCDropoutConfig(**bad)
