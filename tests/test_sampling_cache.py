"""Sampling computes caption-only and layout-only work once per run, not at every step, without changing the samples:
``Denoiser.prepare`` (DiT: pooled embedding and per-block caption keys/values), the two-branch guidance pack built
once, and STDiT's attention groups cached per layout."""

from __future__ import annotations

import pytest
import torch

from framework.generation.guidance import guided_model_fn
from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.packing import PackedSequence
from plugins.denoisers.dit import DiT
from plugins.denoisers.st_dit import GroupedLayout, STDiT
from plugins.samplers.rectified_flow import RectifiedFlow

STEPS, SCALE = 4, 3.0


def conditioning(lengths: list[int], seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # [B, L]
    return Conditioning(torch.randn(len(lengths), max(lengths), 8, generator=g), mask, torch.randn(len(lengths), 8,
                                                                                                    generator=g))


@pytest.mark.parametrize("family", [DiT, STDiT])
def test_cached_guided_sampling_equals_per_step_recomputation(family, monkeypatch) -> None:
    torch.manual_seed(0)
    denoiser = family(width=32, depth=2, num_heads=2)
    denoiser.bind(DenoiserIO(token_dim=6, context_dim=8, pooled_dim=8))
    with torch.no_grad():
        for p in denoiser.parameters():  # off the adaLN-Zero init, so the caption paths matter
            p.normal_(0.0, 0.2)
    denoiser.eval()
    noise = PackedSequence.from_grids([torch.randn(2, 2, 3, 6), torch.randn(3, 2, 2, 6)])
    cond, null = conditioning([5, 3], seed=1), conditioning([1, 1], seed=2)
    context_embeds = []
    denoiser.context_embed.register_forward_hook(lambda *args: context_embeds.append(1))
    builds = []
    build = GroupedLayout._build
    monkeypatch.setattr(GroupedLayout, "_build", staticmethod(lambda x, axis: builds.append(1) or build(x, axis)))

    def recomputed(x: PackedSequence, t: torch.Tensor) -> PackedSequence:  # caption work in every call
        c, u = denoiser(x, t, cond).tokens, denoiser(x, t, null).tokens
        return x.with_tokens(u + SCALE * (c - u))

    sampler = RectifiedFlow(shift=2.0)
    with torch.no_grad():
        expected = sampler.sample(recomputed, noise, STEPS).tokens
        assert len(context_embeds) == 2 * STEPS
        context_embeds.clear(), builds.clear()
        cached = sampler.sample(guided_model_fn(denoiser, cond, null, SCALE), noise, STEPS).tokens
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, noise.tokens, atol=1e-2)  # the model really moved the sample
    assert len(context_embeds) == 1  # the caption embedding and keys/values: once per run
    if family is STDiT:
        assert len(builds) == 2  # spatial and temporal groups of the two-branch pack: once per run
