"""Guidance rescale and negative prompts: each checked against per-sample computations on separate model calls."""

from __future__ import annotations

import pytest
import torch

from framework.generation.guidance import guided_model_fn, per_sample_std, unconditional_branch
from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO
from framework.layers.packing import PackedSequence


class ToyDenoiser(Denoiser):
    """A deterministic prediction that depends on every Conditioning field (context only through its mask)."""

    def bind(self, io: DenoiserIO) -> None:
        g = torch.Generator().manual_seed(0)
        self.w_pooled = torch.randn(io.pooled_dim, io.token_dim, generator=g)
        self.w_context = torch.randn(io.context_dim, io.token_dim, generator=g)

    def forward(self, x: PackedSequence, timestep: torch.Tensor, cond: Conditioning) -> PackedSequence:
        mask = cond.context_mask[..., None].float()  # [B, L, 1]
        context = (cond.context * mask).sum(1) / mask.sum(1)  # [B, context_dim]
        per_sample = cond.pooled @ self.w_pooled + context @ self.w_context  # [B, token_dim]
        scale = 1 + x.per_token(timestep)[:, None]  # [N, 1]
        return x.with_tokens(x.tokens * scale + x.per_token(per_sample))


def conditioning(lengths: list[int], dim: int = 5, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # [B, L]
    return Conditioning(torch.randn(len(lengths), max(lengths), dim, generator=g) * mask[..., None], mask,
                        torch.randn(len(lengths), dim, generator=g))


@pytest.fixture
def setup():
    denoiser = ToyDenoiser()
    denoiser.bind(DenoiserIO(token_dim=3, context_dim=5, pooled_dim=5))
    x = PackedSequence.from_grids([torch.randn(1, 2, 1, 3), torch.randn(2, 3, 1, 3), torch.randn(1, 1, 4, 3)])
    t = torch.tensor([0.2, 0.5, 0.9])
    return denoiser, x, t, conditioning([4, 2, 7], seed=1), conditioning([1, 1, 1], seed=2)


def reference_rescaled(c: torch.Tensor, u: torch.Tensor, scale: float, phi: float) -> torch.Tensor:
    """Lin et al. (2023) Eq. 15-16 for ONE sample, written with torch.std over all of its values."""
    guided = u + scale * (c - u)
    rescaled = guided * c.std(unbiased=False) / guided.std(unbiased=False)
    return phi * rescaled + (1 - phi) * guided


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_the_paper_per_sample(setup, phi) -> None:
    denoiser, x, t, cond, null = setup
    out = guided_model_fn(denoiser, cond, null, 6.0, rescale=phi)(x, t)
    c, u = denoiser(x, t, cond), denoiser(x, t, null)
    for i, (ci, ui, oi) in enumerate(zip(x.split(c.tokens), x.split(u.tokens), out.split())):
        torch.testing.assert_close(oi, reference_rescaled(ci, ui, 6.0, phi), rtol=1e-5, atol=1e-5, msg=f"sample {i}")


def test_full_rescale_restores_the_conditional_spread_of_every_sample(setup) -> None:
    denoiser, x, t, cond, null = setup
    plain = guided_model_fn(denoiser, cond, null, 8.0)(x, t).tokens
    rescaled = guided_model_fn(denoiser, cond, null, 8.0, rescale=1.0)(x, t).tokens
    conditional_std = per_sample_std(x, denoiser(x, t, cond).tokens)  # [B]
    assert (per_sample_std(x, plain) > 1.5 * conditional_std).all()  # guidance inflates the prediction
    torch.testing.assert_close(per_sample_std(x, rescaled), conditional_std)


def test_per_sample_std_never_mixes_samples() -> None:
    x = PackedSequence.from_grids([torch.randn(1, 2, 2, 3), 10 * torch.randn(1, 3, 1, 3) + 5])
    expected = torch.stack([s.std(unbiased=False) for s in x.split()])
    torch.testing.assert_close(per_sample_std(x, x.tokens), expected)


def test_invalid_rescale_and_branch_sizes_fail_naming_them(setup) -> None:
    denoiser, x, t, cond, null = setup
    with pytest.raises(ValueError, match="rescale"):
        guided_model_fn(denoiser, cond, null, 4.0, rescale=1.5)
    with pytest.raises(ValueError, match="unconditional branch has 1 samples"):
        guided_model_fn(denoiser, cond, conditioning([1]), 4.0)


# ---------------------------------------------------------------------------------------------- negative prompts
@pytest.fixture(scope="module")
def text():
    from plugins.conditioners.hashed_text import HashedTextConditioner
    from plugins.denoisers.dit import DiT

    torch.manual_seed(0)
    conditioner = HashedTextConditioner(width=16, depth=1, num_heads=2, caption_dropout=1.0)
    denoiser = DiT(width=32, depth=2, num_heads=2).eval()
    denoiser.bind(DenoiserIO(token_dim=6, context_dim=16, pooled_dim=16))
    with torch.no_grad():
        for p in denoiser.parameters():  # adaLN-Zero starts at a constant zero output: randomise it
            p.normal_(0.0, 0.2)
    return conditioner, denoiser


@torch.no_grad()
def test_negative_prompts_replace_the_null_branch_per_sample(text) -> None:
    conditioner, denoiser = text
    conditioner.train()  # caption_dropout=1.0: every caption would be dropped if dropout applied here
    captions = ["a red square moving right", "a blue circle moving up"]
    negative = unconditional_branch(conditioner, 2, ["", "a blue circle, static, blurry"])
    assert conditioner.training  # mode restored
    conditioner.eval()
    x = PackedSequence.from_grids([torch.randn(2, 2, 3, 6), torch.randn(1, 3, 2, 6)])
    t = torch.tensor([0.3, 0.8])
    cond, null = conditioner(captions), conditioner.null(2)
    out = guided_model_fn(denoiser, cond, negative, 3.0)(x, t)
    c = denoiser(x, t, cond).tokens
    u_null = denoiser(x, t, null).tokens
    u_negative = denoiser(x, t, conditioner(["a blue circle, static, blurry"] * 2)).tokens
    assert not torch.allclose(u_null, u_negative, atol=1e-3)
    first, second = x.split(out.tokens)
    torch.testing.assert_close(first, x.split(u_null + 3.0 * (c - u_null))[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, x.split(u_negative + 3.0 * (c - u_negative))[1], rtol=1e-4, atol=1e-4)


def test_without_negative_prompts_the_branch_is_the_null_condition(text) -> None:
    conditioner, _ = text
    conditioner.eval()
    a, b = unconditional_branch(conditioner, 3), conditioner.null(3)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    with pytest.raises(ValueError, match="2 negative prompts for 3 samples"):
        unconditional_branch(conditioner, 3, ["x", "y"])
