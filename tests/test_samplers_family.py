"""Every sampler family checked against an exactly solvable 2-D Gaussian mixture.

For data x0 ~ sum_k w_k N(mu_k, s^2 I) noised as x = alpha x0 + sigma eps, given component k the pair (x0, eps) is
jointly Gaussian with x ~ N(alpha mu_k, (alpha^2 s^2 + sigma^2) I), so

    E[x0  | x, k] = mu_k + alpha s^2 / var_k (x - alpha mu_k)
    E[eps | x, k] = sigma / var_k (x - alpha mu_k)

mixed by the responsibilities p(k | x). Rectified flow (alpha = 1 - t, sigma = t) needs the velocity
E[eps] - E[x0]; Gaussian diffusion (alpha^2 + sigma^2 = 1) needs E[eps] or v = alpha E[eps] - sigma E[x0]. Plugging
these exact predictions in as the model, every sampler must turn Gaussian noise into the mixture: a wrong
coefficient, step direction or schedule shows up as a wrong component mass, mean or spread.
"""

from __future__ import annotations

import math

import pytest
import torch

from framework.layers.packing import PackedSequence
from plugins.samplers.ddim import DDIM
from plugins.samplers.ddpm import DDPM
from plugins.samplers.dpm_solver import DPMSolverPlusPlus
from plugins.samplers.gaussian_diffusion import BetaSchedule, GaussianDiffusion, Prediction
from plugins.samplers.rectified_flow import FlowPrediction, RectifiedFlow
from plugins.samplers.rectified_flow_heun import RectifiedFlowHeun

from gaussian_mixture import MEANS, NUM_POINTS, STD, WEIGHTS, assert_matches_mixture, one_sample_pack, varied_pack

# ------------------------------------------------------------------------------------------------ reference
def posterior_means(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x0 | x] and E[eps | x] for x = alpha x0 + sigma eps. x: [N, 2]; alpha, sigma: [N] -> each [N, 2]."""
    x, alpha, sigma = x.double(), alpha.double()[:, None, None], sigma.double()[:, None, None]
    var = alpha**2 * STD**2 + sigma**2  # [N, 1, 1]
    resid = x[:, None, :] - alpha * MEANS[None]  # [N, K, 2]
    log_r = WEIGHTS.log()[None] - 0.5 * (resid**2).sum(-1) / var[..., 0] - var[..., 0].log()  # [N, K]
    r = torch.softmax(log_r, dim=1)[..., None]  # [N, K, 1]
    e_x0 = (r * (MEANS[None] + alpha * STD**2 / var * resid)).sum(1)  # [N, 2]
    e_eps = (r * (sigma / var * resid)).sum(1)  # [N, 2]
    return e_x0, e_eps


def velocity_model(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
    """The exact rectified-flow velocity for every token."""
    assert t.shape == (x.num_samples,)
    tt = x.per_token(t)  # [N]
    e_x0, e_eps = posterior_means(x.tokens, 1 - tt, tt)
    return x.with_tokens((e_eps - e_x0).to(x.tokens.dtype))


def diffusion_model(sampler: GaussianDiffusion):
    """The exact epsilon or v prediction on the sampler's discrete schedule (t = (i + 1) / T)."""

    def model_fn(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
        assert t.shape == (x.num_samples,)
        index = (x.per_token(t).double() * sampler.num_train_timesteps).round().long() - 1  # [N]
        assert (index >= 0).all() and (index < sampler.num_train_timesteps).all()
        alpha_bar = sampler.alphas_cumprod[index]  # [N]
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        e_x0, e_eps = posterior_means(x.tokens, alpha, sigma)
        if sampler.prediction is Prediction.EPSILON:
            return x.with_tokens(e_eps.to(x.tokens.dtype))
        return x.with_tokens((alpha[:, None] * e_eps - sigma[:, None] * e_x0).to(x.tokens.dtype))

    return model_fn


def clean_model(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
    """The exact clean-data prediction E[x0 | x_t] (rectified flow with prediction=clean)."""
    tt = x.per_token(t)  # [N]
    return x.with_tokens(posterior_means(x.tokens, 1 - tt, tt)[0].to(x.tokens.dtype))


def model_for(sampler):
    if isinstance(sampler, RectifiedFlow):
        return clean_model if sampler.prediction is FlowPrediction.CLEAN else velocity_model
    return diffusion_model(sampler)


@pytest.fixture(scope="module")
def noise_tokens() -> torch.Tensor:
    return torch.randn(NUM_POINTS, 2, generator=torch.Generator().manual_seed(0))


def test_reference_posterior_has_the_known_limits() -> None:
    """Guards the reference: pure noise predicts eps = x and x0 = data mean; clean data predicts x0 = x."""
    x = torch.randn(5, 2, dtype=torch.float64)
    ones, zeros = torch.ones(5), torch.zeros(5)
    e_x0, e_eps = posterior_means(x, zeros, ones)
    torch.testing.assert_close(e_eps, x)
    torch.testing.assert_close(e_x0, (WEIGHTS[:, None] * MEANS).sum(0).expand(5, 2))
    e_x0, e_eps = posterior_means(x, ones, zeros)
    torch.testing.assert_close(e_x0, x)
    torch.testing.assert_close(e_eps, torch.zeros(5, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------------- distribution recovery
SAMPLERS = {
    "heun_shift1_20": (lambda: RectifiedFlowHeun(shift=1.0), 20),
    "heun_shift3_20": (lambda: RectifiedFlowHeun(shift=3.0), 20),
    "heun_clean_shift3_20": (lambda: RectifiedFlowHeun(shift=3.0, prediction=FlowPrediction.CLEAN), 20),
    "ddpm_linear_eps_250": (lambda: DDPM(), 250),
    "ddpm_cosine_v_250": (lambda: DDPM(beta_schedule=BetaSchedule.COSINE, prediction=Prediction.V), 250),
    "ddim_linear_eps_50": (lambda: DDIM(), 50),
    "ddim_cosine_v_zero_snr_50": (
        lambda: DDIM(beta_schedule="cosine", prediction="v", zero_terminal_snr=True), 50
    ),
    "ddim_eta1_linear_v_250": (lambda: DDIM(prediction=Prediction.V, eta=1.0), 250),
    "dpmpp_linear_eps_20": (lambda: DPMSolverPlusPlus(), 20),
    # zero terminal SNR: the lambda grid starts at step T - 2 (lambda -8), so more of it is spent near pure noise
    "dpmpp_linear_v_zero_snr_30": (lambda: DPMSolverPlusPlus(prediction="v", zero_terminal_snr=True), 30),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampling_the_exact_model_reproduces_the_mixture(noise_tokens, name) -> None:
    build, steps = SAMPLERS[name]
    sampler = build()
    noise = one_sample_pack(noise_tokens)
    out = sampler.sample(model_for(sampler), noise, steps=steps)
    assert out.tokens.shape == noise.tokens.shape and out.grid_sizes == noise.grid_sizes
    assert torch.equal(out.cu_seqlens, noise.cu_seqlens)
    assert_matches_mixture(out.tokens, overall_moments=False)


@pytest.mark.parametrize("build", [lambda: RectifiedFlowHeun(shift=1.0), lambda: DDIM(), lambda: DPMSolverPlusPlus()])
def test_a_single_step_does_not_pass_the_check(noise_tokens, build) -> None:
    """The check is sharp enough to reject a badly integrated sampler."""
    sampler = build()
    out = sampler.sample(model_for(sampler), one_sample_pack(noise_tokens), steps=1)
    with pytest.raises(AssertionError):
        assert_matches_mixture(out.tokens, overall_moments=False)


def test_heun_with_per_sample_shifts_reproduces_the_mixture(noise_tokens) -> None:
    sampler = RectifiedFlowHeun(shift=1.0, shift_reference_tokens=640)
    out = sampler.sample(velocity_model, varied_pack(noise_tokens, [40, 160, 640, 3160]), steps=20)
    assert_matches_mixture(out.tokens, overall_moments=False)


def endpoint_error(a: PackedSequence, b: PackedSequence) -> float:
    return (a.tokens.double() - b.tokens.double()).norm(dim=1).mean().item()


def test_heun_beats_euler_at_equal_model_calls(noise_tokens) -> None:
    noise = one_sample_pack(noise_tokens[:1000])
    reference = RectifiedFlowHeun(shift=3.0).sample(velocity_model, noise, steps=400)
    heun = endpoint_error(RectifiedFlowHeun(shift=3.0).sample(velocity_model, noise, steps=10), reference)
    euler = endpoint_error(RectifiedFlow(shift=3.0).sample(velocity_model, noise, steps=20), reference)
    # measured: 0.011 for Heun (10 steps = 20 model calls) vs 0.076 for Euler with 20 steps
    assert heun < 0.25 * euler, (heun, euler)


def test_dpm_solver_is_second_order_and_converges_faster_than_ddim(noise_tokens) -> None:
    """DPM-Solver++(2M) and DDIM (eta 0) solve the same ODE; measured at 20 steps: 0.027 vs 0.076 mean distance
    to the 1000-step DDIM solution, and 0.007 for DPM-Solver++ at 40 steps."""
    noise = one_sample_pack(noise_tokens[:1000])
    ddim, dpm = DDIM(), DPMSolverPlusPlus()
    model = diffusion_model(ddim)
    reference = ddim.sample(model, noise, steps=1000)
    err_ddim = endpoint_error(ddim.sample(model, noise, steps=20), reference)
    err_dpm = {s: endpoint_error(dpm.sample(model, noise, steps=s), reference) for s in (20, 40)}
    assert err_dpm[20] < 0.5 * err_ddim, (err_dpm, err_ddim)
    assert err_dpm[40] < err_dpm[20] / 2.5, err_dpm


def test_dpm_solver_steps_are_spaced_in_log_snr() -> None:
    sampler = DPMSolverPlusPlus()
    indices = sampler.sampling_indices(10)
    assert len(indices) == 10 and indices[0] == 999 and indices[-1] == 0
    abar = sampler.alphas_cumprod[indices]
    half_log_snr = 0.5 * (abar.log() - (1 - abar).log())
    gaps = half_log_snr[1:] - half_log_snr[:-1]
    assert (gaps > 0).all() and gaps.max() < 1.5 * gaps.min()


# ---------------------------------------------------------------------------------------- (non)determinism
def test_ddim_eta0_is_deterministic_and_ignores_the_noise_seed(noise_tokens) -> None:
    noise = one_sample_pack(noise_tokens[:500])
    a = DDIM(eta=0.0, noise_seed=0).sample(diffusion_model(DDIM()), noise, steps=20).tokens
    b = DDIM(eta=0.0, noise_seed=1).sample(diffusion_model(DDIM()), noise, steps=20).tokens
    assert torch.equal(a, b)
    other = DDIM().sample(diffusion_model(DDIM()), one_sample_pack(noise_tokens[500:1000]), steps=20).tokens
    assert not torch.allclose(a, other)


def test_stochastic_samplers_are_reproducible_per_seed(noise_tokens) -> None:
    noise = one_sample_pack(noise_tokens[:500])
    model = diffusion_model(DDPM())
    a = DDPM(noise_seed=3).sample(model, noise, steps=20).tokens
    b = DDPM(noise_seed=3).sample(model, noise, steps=20).tokens
    c = DDPM(noise_seed=4).sample(model, noise, steps=20).tokens
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    d = DDIM(eta=0.5, noise_seed=3).sample(model, noise, steps=20).tokens
    e = DDIM(eta=0.5, noise_seed=4).sample(model, noise, steps=20).tokens
    assert not torch.allclose(d, e)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_ddim_with_eta_one_is_ddpm(noise_tokens, prediction) -> None:
    """DDIM's eta = 1 is the DDPM posterior (Song et al. 2021, Sec. 4.1): same seed, same samples."""
    noise = one_sample_pack(noise_tokens[:500])
    ddpm = DDPM(prediction=prediction, noise_seed=7)
    ddim = DDIM(prediction=prediction, eta=1.0, noise_seed=7)
    model = diffusion_model(ddpm)
    torch.testing.assert_close(
        ddim.sample(model, noise, steps=30).tokens, ddpm.sample(model, noise, steps=30).tokens, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("build", [lambda: RectifiedFlowHeun(shift=2.0), DDPM, DDIM, DPMSolverPlusPlus])
def test_callback_sees_every_step_down_to_zero(build) -> None:
    sampler = build()
    noise = varied_pack(torch.randn(10, 2), [3, 7])
    seen = []
    sampler.sample(model_for(sampler), noise, steps=5, callback=lambda i, t, x: seen.append((i, t.clone())))
    assert [i for i, _ in seen] == list(range(5))
    times = torch.stack([t for _, t in seen])  # [5, 2]
    assert times.shape == (5, 2) and (times[1:] < times[:-1]).all()
    torch.testing.assert_close(times[-1], torch.zeros(2))


# ---------------------------------------------------------------------------------------------- schedules
def test_linear_and_cosine_schedules_match_their_papers() -> None:
    linear = DDPM(beta_schedule=BetaSchedule.LINEAR).alphas_cumprod
    betas = 1 - linear / torch.cat([torch.ones(1, dtype=torch.float64), linear[:-1]])
    torch.testing.assert_close(betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    cosine = DDPM(beta_schedule=BetaSchedule.COSINE).alphas_cumprod
    s, t = 0.008, torch.arange(1, 1001, dtype=torch.float64) / 1000
    expected = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(cosine[:-1], expected[:-1])  # the last beta is clipped to 0.999
    assert (cosine[1:] < cosine[:-1]).all() and (linear[1:] < linear[:-1]).all()


def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_step() -> None:
    plain = DDIM(prediction="v").alphas_cumprod
    rescaled = DDIM(prediction="v", zero_terminal_snr=True).alphas_cumprod
    assert plain[-1] > 0 and rescaled[-1] == 0
    torch.testing.assert_close(rescaled[0], plain[0])
    assert (rescaled[1:] < rescaled[:-1]).all()


def test_sampling_steps_span_the_noisiest_to_the_cleanest_training_step() -> None:
    sampler = DDIM(num_train_timesteps=1000)
    assert sampler.sampling_indices(1) == [999]
    assert sampler.sampling_indices(4) == [999, 666, 333, 0]
    assert sampler.sampling_indices(1000) == list(range(999, -1, -1))


# ------------------------------------------------------------------------------------------------ training
def independent_linear_alpha_bar() -> torch.Tensor:
    """Ho et al.'s schedule written out again, so the oracle below does not reuse the code under test."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_training_loss_is_zero_for_an_oracle_that_knows_the_clean_data(prediction) -> None:
    """Recovering eps from (x_t, t) pins down x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the target, and that the
    model is told the step it was noised to."""
    sampler = DDPM(prediction=prediction)
    alpha_bar = independent_linear_alpha_bar()
    clean = varied_pack(torch.randn(60, 2, generator=torch.Generator().manual_seed(1)), [10, 20, 30])
    seen = []

    def oracle(x, t):
        seen.append(t)
        ab = alpha_bar[(x.per_token(t).double() * 1000).round().long() - 1][:, None]  # [N, 1]
        eps = (x.tokens.double() - ab.sqrt() * clean.tokens) / (1 - ab).sqrt()
        target = eps if prediction is Prediction.EPSILON else ab.sqrt() * eps - (1 - ab).sqrt() * clean.tokens
        return x.with_tokens(target.float())

    loss = sampler.training_loss(oracle, clean, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (3,)
    assert loss.max() < 1e-8
    assert ((seen[0] > 0) & (seen[0] <= 1)).all()


@pytest.mark.parametrize("prediction", list(Prediction))
def test_exact_model_minimises_the_loss_and_loss_is_reproducible(prediction) -> None:
    """The posterior mean is the minimiser of the squared error: scaling or shifting it must raise the loss."""
    sampler = DDIM(prediction=prediction)
    k = torch.multinomial(WEIGHTS.float(), 500, replacement=True, generator=torch.Generator().manual_seed(2))
    points = (MEANS[k] + STD * torch.randn(500, 2, generator=torch.Generator().manual_seed(3))).float()  # [500, 2]
    clean = PackedSequence.from_grids([p.reshape(1, 1, 1, 2) for p in points])  # 500 samples, own timesteps
    model = diffusion_model(sampler)
    loss = lambda fn: sampler.training_loss(fn, clean, generator=torch.Generator().manual_seed(0))
    exact = loss(model)
    assert exact.shape == (500,)
    for perturbed in (lambda x, t: x.with_tokens(1.2 * model(x, t).tokens),
                      lambda x, t: x.with_tokens(0.8 * model(x, t).tokens),
                      lambda x, t: x.with_tokens(model(x, t).tokens + 0.2)):
        assert exact.mean() < loss(perturbed).mean() - 0.01
    assert torch.equal(exact, loss(model))


def test_training_loss_gradient_flows_to_the_model() -> None:
    weight = torch.zeros(2, 2, requires_grad=True)
    loss = DPMSolverPlusPlus().training_loss(lambda x, t: x.with_tokens(x.tokens @ weight),
                                             one_sample_pack(torch.randn(8, 2)))
    loss.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: DDPM(prediction="epsilon", zero_terminal_snr=True), ["prediction", "zero_terminal_snr"]),
        (lambda: DPMSolverPlusPlus(prediction="x0"), ["prediction", "epsilon", "'x0'"]),
        (lambda: DDIM(beta_schedule="quadratic"), ["beta_schedule", "linear", "cosine"]),
        (lambda: DDIM(eta=-0.1), ["eta"]),
        (lambda: DDPM(num_train_timesteps=1), ["num_train_timesteps"]),
    ],
)
def test_invalid_constructor_arguments_raise_naming_the_fields(build, names) -> None:
    with pytest.raises(ValueError) as info:
        build()
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("build", [DDPM, DDIM, DPMSolverPlusPlus, RectifiedFlowHeun])
@pytest.mark.parametrize("steps", [0, 1001])
def test_invalid_step_count_raises_naming_steps(build, steps) -> None:
    sampler = build()
    if isinstance(sampler, RectifiedFlow) and steps > 0:
        return  # continuous time: any positive step count is valid
    with pytest.raises(ValueError, match="steps"):
        sampler.sample(model_for(sampler), one_sample_pack(torch.randn(4, 2)), steps=steps)
