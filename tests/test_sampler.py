"""RectifiedFlow and classifier-free guidance checked against an exactly solvable 2-D problem.

For data x0 ~ sum_k w_k N(mu_k, s^2 I) and x_t = (1 - t) x0 + t eps, the rectified-flow velocity
v(x, t) = E[eps - x0 | x_t = x] is analytic: given component k, x_t ~ N((1 - t) mu_k, sigma_t^2 I) with
sigma_t^2 = (1 - t)^2 s^2 + t^2, and (x0, eps) are jointly Gaussian with x_t, so

    E[x0  | x_t, k] = mu_k + (1 - t) s^2 / sigma_t^2 (x_t - (1 - t) mu_k)
    E[eps | x_t, k] = t / sigma_t^2 (x_t - (1 - t) mu_k)

mixed by the posterior responsibilities p(k | x_t). Integrating this exact field with the sampler must turn
Gaussian noise into the mixture, so any error in the schedule, the step direction or the per-sample
broadcasting shows up as a wrong distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from framework.generation.guidance import guided_model_fn
from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO
from framework.layers.packing import PackedSequence
from plugins.samplers.rectified_flow import FlowPrediction, RectifiedFlow, shift_time

from gaussian_mixture import (
    MEANS, NUM_POINTS, STD, WEIGHTS, assert_matches_mixture, one_sample_pack, sample_mixture, varied_pack,
)


# ------------------------------------------------------------------------------------------------ helpers
def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact rectified-flow velocity of the mixture. x: [N, 2], t: [N] per point -> [N, 2]."""
    x, t = x.double(), t.double()[:, None, None]  # [N, 2], [N, 1, 1]
    var = (1 - t) ** 2 * STD**2 + t**2  # [N, 1, 1]
    resid = x[:, None, :] - (1 - t) * MEANS[None]  # [N, K, 2]
    log_r = WEIGHTS.log()[None] - 0.5 * (resid**2).sum(-1) / var[..., 0] - math.log(2 * math.pi) - var[..., 0].log()
    r = torch.softmax(log_r, dim=1)[..., None]  # [N, K, 1]
    e_x0 = MEANS[None] + (1 - t) * STD**2 / var * resid  # [N, K, 2]
    e_eps = t / var * resid  # [N, K, 2]
    return (r * (e_eps - e_x0)).sum(1)  # [N, 2]


def mixture_model_fn(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
    """A perfect model: the exact velocity for every token, with t [B] broadcast per token."""
    assert t.shape == (x.num_samples,)
    return x.with_tokens(exact_velocity(x.tokens, x.per_token(t)).to(x.tokens.dtype))


def mixture_clean_fn(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
    """A perfect clean-data model: E[x0 | x_t] = x_t - t v, from the exact velocity."""
    tt = x.per_token(t)[:, None].double()
    return x.with_tokens((x.tokens.double() - tt * exact_velocity(x.tokens, x.per_token(t))).to(x.tokens.dtype))





@pytest.fixture(scope="module")
def noise_tokens() -> torch.Tensor:
    return torch.randn(NUM_POINTS, 2, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------- sampling
def test_reference_velocity_has_the_known_limits() -> None:
    """Guards the reference itself: at t = 1 (pure noise) v = x - E[x0]; at t = 0 it is -x0."""
    x = torch.randn(5, 2, dtype=torch.float64)
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    torch.testing.assert_close(exact_velocity(x, torch.ones(5)), x - mean)
    torch.testing.assert_close(exact_velocity(x, torch.zeros(5)), -x)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampling_of_exact_velocity_reproduces_the_mixture(noise_tokens, shift) -> None:
    sampler = RectifiedFlow(shift=shift)
    noise = one_sample_pack(noise_tokens)
    out = sampler.sample(mixture_model_fn, noise, steps=100)
    assert out.tokens.shape == noise.tokens.shape and out.grid_sizes == noise.grid_sizes
    assert torch.equal(out.cu_seqlens, noise.cu_seqlens) and torch.equal(out.positions, noise.positions)
    assert_matches_mixture(out.tokens)


def test_clean_prediction_of_the_exact_posterior_mean_reproduces_the_mixture(noise_tokens) -> None:
    """prediction=clean turns E[x0 | x_t] into the same velocity, so Euler sampling lands on the same mixture."""
    sampler = RectifiedFlow(shift=3.0, prediction=FlowPrediction.CLEAN)
    noise = one_sample_pack(noise_tokens)
    out = sampler.sample(mixture_clean_fn, noise, steps=100)
    assert_matches_mixture(out.tokens)
    reference = RectifiedFlow(shift=3.0).sample(mixture_model_fn, noise, steps=100)
    torch.testing.assert_close(out.tokens, reference.tokens, atol=1e-4, rtol=1e-4)


def test_sampling_with_per_sample_shifts_reproduces_the_mixture(noise_tokens) -> None:
    """Samples of different lengths get different shifted schedules; each must still reach the data."""
    lengths = [40, 160, 640, 3160]  # shifts 0.25, 0.5, 1 and 2.2
    sampler = RectifiedFlow(shift=1.0, shift_reference_tokens=640)
    noise = varied_pack(noise_tokens, lengths)
    assert len(set(sampler.sample_shift(noise).tolist())) == len(lengths)
    out = sampler.sample(mixture_model_fn, noise, steps=100)
    assert_matches_mixture(out.tokens)
    # the big sample alone also carries the right per-component mass
    big = out.split()[-1].double()
    nearest = torch.cdist(big, MEANS).argmin(dim=1)
    mass = torch.bincount(nearest, minlength=3).double() / len(big)
    assert (mass - WEIGHTS).abs().max() < 0.04


def test_too_few_steps_do_not_pass_the_check(noise_tokens) -> None:
    """The distribution check is sharp enough to reject a badly integrated flow (a single Euler step)."""
    out = RectifiedFlow().sample(mixture_model_fn, one_sample_pack(noise_tokens), steps=1)
    with pytest.raises(AssertionError):
        assert_matches_mixture(out.tokens)


def test_sampling_is_deterministic_and_depends_on_the_noise(noise_tokens) -> None:
    sampler = RectifiedFlow(shift=2.0)
    noise = one_sample_pack(noise_tokens[:500])
    a = sampler.sample(mixture_model_fn, noise, steps=20).tokens
    b = sampler.sample(mixture_model_fn, noise, steps=20).tokens
    assert torch.equal(a, b)
    other = sampler.sample(mixture_model_fn, one_sample_pack(noise_tokens[500:1000]), steps=20).tokens
    assert not torch.allclose(a, other)


def test_sample_calls_back_each_step_down_to_zero() -> None:
    sampler = RectifiedFlow(shift=3.0)
    noise = varied_pack(torch.randn(10, 2), [3, 7])
    seen = []
    sampler.sample(mixture_model_fn, noise, steps=5, callback=lambda i, t, x: seen.append((i, t.clone())))
    assert [i for i, _ in seen] == list(range(5))
    assert all(t.shape == (2,) for _, t in seen)
    times = torch.stack([t for _, t in seen])  # [5, 2]
    assert (times[1:] < times[:-1]).all()
    torch.testing.assert_close(times[-1], torch.zeros(2))


# -------------------------------------------------------------------------------------------------- schedule
def test_schedule_runs_from_one_to_zero_and_is_shifted_per_sample() -> None:
    sampler = RectifiedFlow(shift=1.0, shift_reference_tokens=16)
    pack = varied_pack(torch.zeros(16 + 256, 2), [16, 256])
    shifts = sampler.sample_shift(pack)
    torch.testing.assert_close(shifts, torch.tensor([1.0, 4.0]))  # shift * sqrt(L / reference)
    times = sampler.schedule(10, pack)  # [11, 2]
    assert times.shape == (11, 2)
    torch.testing.assert_close(times[0], torch.ones(2))
    torch.testing.assert_close(times[-1], torch.zeros(2))
    assert (times[1:] < times[:-1]).all()
    torch.testing.assert_close(times[:, 0], torch.linspace(1, 0, 11))  # shift 1: unshifted
    assert (times[1:-1, 1] > times[1:-1, 0]).all()  # the longer sample stays noisier
    torch.testing.assert_close(shift_time(torch.tensor(0.5), torch.tensor(4.0)), torch.tensor(0.8))


def test_constant_shift_ignores_sequence_length() -> None:
    sampler = RectifiedFlow(shift=3.0)
    pack = varied_pack(torch.zeros(20, 2), [4, 16])
    torch.testing.assert_close(sampler.sample_shift(pack), torch.tensor([3.0, 3.0]))


def test_training_timesteps_are_shifted_towards_noise_for_longer_samples() -> None:
    sampler = RectifiedFlow(shift=1.0, shift_reference_tokens=16)
    clean = varied_pack(torch.zeros(16 + 256, 2), [16, 256])
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return x.with_tokens(torch.zeros_like(x.tokens))

    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        sampler.training_loss(model_fn, clean, generator=generator)
    t = torch.stack(seen)  # [400, 2]
    assert ((t > 0) & (t < 1)).all()
    assert abs(t[:, 0].mean().item() - 0.5) < 0.05  # logit-normal(0, 1), no shift: mean 1/2
    assert t[:, 1].mean() > t[:, 0].mean() + 0.15  # shift 4 for the 16x longer sample


# ------------------------------------------------------------------------------------------------ training
def test_training_loss_is_per_sample_and_zero_for_the_true_target() -> None:
    """A model that knows the clean data recovers eps - x0 from (x_t, t); the loss must then vanish, which pins
    down the interpolation x_t = (1 - t) x0 + t eps, the velocity target and that the model sees the same t."""
    sampler = RectifiedFlow(logit_mean=0.3, logit_std=1.2, shift=2.0)
    clean = varied_pack(sample_mixture(60, torch.Generator().manual_seed(1)), [10, 20, 30])

    def oracle(x, t):
        tt = x.per_token(t)[:, None]
        eps = (x.tokens - (1 - tt) * clean.tokens) / tt
        return x.with_tokens(eps - clean.tokens)

    loss = sampler.training_loss(oracle, clean, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (3,)
    assert loss.max() < 1e-8


def test_clean_prediction_loss_is_the_velocity_error_and_zero_for_the_true_data() -> None:
    """With prediction=clean the loss is |(x_t - x0_hat) / max(t, t_min) - (eps - x0)|^2: zero when x0_hat = x0,
    and for x0_hat = x0 + d it is |d|^2 / max(t, t_min)^2 per token (mean over the token's channels)."""
    sampler = RectifiedFlow(logit_std=1.5, prediction=FlowPrediction.CLEAN, t_min=0.05)
    clean = varied_pack(sample_mixture(60, torch.Generator().manual_seed(1)), [10, 20, 30])
    exact = sampler.training_loss(lambda x, t: x.with_tokens(clean.tokens), clean, torch.Generator().manual_seed(0))
    assert exact.shape == (3,) and exact.max() < 1e-10
    seen_t = []

    def offset(x, t):
        seen_t.append(t)
        return x.with_tokens(clean.tokens + 0.1)

    loss = sampler.training_loss(offset, clean, torch.Generator().manual_seed(0))
    expected = 0.01 / seen_t[0].clamp_min(0.05) ** 2  # [B]
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-4, atol=1e-6)


def test_exact_velocity_beats_a_zero_model_and_loss_is_reproducible() -> None:
    sampler = RectifiedFlow()
    clean = PackedSequence.from_grids(
        [g.reshape(1, 1, 1, 2) for g in sample_mixture(2000, torch.Generator().manual_seed(2))]
    )  # 2000 samples of one token: 2000 independent timesteps
    zero = lambda x, t: x.with_tokens(torch.zeros_like(x.tokens))
    exact = sampler.training_loss(mixture_model_fn, clean, generator=torch.Generator().manual_seed(0))
    baseline = sampler.training_loss(zero, clean, generator=torch.Generator().manual_seed(0))
    assert exact.shape == baseline.shape == (2000,)
    assert (exact >= 0).all()
    # zero model: E|eps - x0|^2 / 2 = (2 + E|x0|^2) / 2 ~ 3.3; the exact velocity leaves only the posterior variance
    assert exact.mean() < 0.5 * baseline.mean()
    again = sampler.training_loss(mixture_model_fn, clean, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exact, again)


def test_training_loss_gradient_flows_to_the_model() -> None:
    weight = torch.zeros(2, 2, requires_grad=True)
    clean = one_sample_pack(torch.randn(8, 2))
    loss = RectifiedFlow().training_loss(lambda x, t: x.with_tokens(x.tokens @ weight), clean)
    loss.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"logit_std": 0.0}, "logit_std"),
        ({"logit_std": -1.0}, "logit_std"),
        ({"shift": 0.0}, "shift"),
        ({"shift": -2.0}, "shift"),
        ({"shift_reference_tokens": -1}, "shift_reference_tokens"),
        ({"t_min": 0.0}, "t_min"),
        ({"t_min": 1.0}, "t_min"),
    ],
)
def test_invalid_constructor_arguments_raise_naming_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        RectifiedFlow(**kwargs)


@pytest.mark.parametrize("steps", [0, -3])
def test_invalid_step_count_raises_naming_steps(steps) -> None:
    with pytest.raises(ValueError, match="steps"):
        RectifiedFlow().sample(mixture_model_fn, one_sample_pack(torch.randn(4, 2)), steps=steps)


# ------------------------------------------------------------------------------------------------- guidance
class ToyDenoiser(Denoiser):
    """Deterministic, condition-dependent prediction that reads every Conditioning field (the context through its
    mask, so padding added when the two branches are batched must not change anything)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def bind(self, io: DenoiserIO) -> None:
        g = torch.Generator().manual_seed(0)
        self.w_pooled = torch.randn(io.pooled_dim, io.token_dim, generator=g)
        self.w_context = torch.randn(io.context_dim, io.token_dim, generator=g)

    def forward(self, x: PackedSequence, timestep: torch.Tensor, cond: Conditioning) -> PackedSequence:
        self.calls += 1
        mask = cond.context_mask[..., None].float()  # [B, L, 1]
        context = (cond.context * mask).sum(1) / mask.sum(1)  # [B, context_dim]
        per_sample = cond.pooled @ self.w_pooled + context @ self.w_context  # [B, token_dim]
        scale = 1 + x.per_token(timestep)[:, None]  # [N, 1]
        return x.with_tokens(x.tokens * scale + x.per_token(per_sample))


def make_conditioning(lengths: list[int], dim: int = 5, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]  # [B, L]
    context = torch.randn(len(lengths), length, dim, generator=g) * mask[..., None]
    return Conditioning(context, mask, torch.randn(len(lengths), dim, generator=g))


@pytest.fixture
def guidance_setup():
    denoiser = ToyDenoiser()
    denoiser.bind(DenoiserIO(token_dim=3, context_dim=5, pooled_dim=5))
    x = varied_pack(torch.randn(2 + 6 + 4, 3), [2, 6, 4])
    t = torch.tensor([0.2, 0.5, 0.9])
    cond = make_conditioning([4, 2, 7], seed=1)
    null = make_conditioning([1, 1, 1], seed=2)  # shorter context: batching both branches pads it
    return denoiser, x, t, cond, null


def test_guidance_scale_one_is_the_conditional_prediction(guidance_setup) -> None:
    denoiser, x, t, cond, null = guidance_setup
    expected = denoiser(x, t, cond).tokens
    denoiser.calls = 0
    out = guided_model_fn(denoiser, cond, null, 1.0)(x, t)
    assert denoiser.calls == 1  # no wasted unconditional pass
    torch.testing.assert_close(out.tokens, expected)
    torch.testing.assert_close(guided_model_fn(denoiser, cond, None, 4.0)(x, t).tokens, expected)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_guided_prediction_equals_two_separate_calls(guidance_setup, scale) -> None:
    denoiser, x, t, cond, null = guidance_setup
    c = denoiser(x, t, cond).tokens
    u = denoiser(x, t, null).tokens
    denoiser.calls = 0
    out = guided_model_fn(denoiser, cond, null, scale)(x, t)
    assert denoiser.calls == 1  # both branches in one packed batch
    assert out.grid_sizes == x.grid_sizes and torch.equal(out.cu_seqlens, x.cu_seqlens)
    torch.testing.assert_close(out.tokens, u + scale * (c - u), rtol=1e-5, atol=1e-5)


def test_guidance_with_the_real_dit_and_text_conditioner_matches_two_calls() -> None:
    """Batching both branches must not leak attention between samples or through padded caption tokens."""
    from plugins.conditioners.hashed_text import HashedTextConditioner
    from plugins.denoisers.dit import DiT

    torch.manual_seed(0)
    conditioner = HashedTextConditioner(width=16, depth=1, num_heads=2).eval()
    denoiser = DiT(width=32, depth=2, num_heads=2).eval()
    denoiser.bind(DenoiserIO(token_dim=6, context_dim=16, pooled_dim=16))
    with torch.no_grad():
        for p in denoiser.parameters():  # adaLN-Zero starts at a constant zero output: randomise it
            p.normal_(0.0, 0.2)
        x = PackedSequence.from_grids([torch.randn(2, 2, 3, 6), torch.randn(1, 3, 2, 6)])
        t = torch.tensor([0.3, 0.8])
        cond = conditioner(["a red square moving right on a black background", "a blue circle"])
        null = conditioner.null(2)
        c, u = denoiser(x, t, cond).tokens, denoiser(x, t, null).tokens
        assert not torch.allclose(c, u, atol=1e-3)
        out = guided_model_fn(denoiser, cond, null, 3.0)(x, t).tokens
    torch.testing.assert_close(out, u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)
