"""Discrete-time Gaussian diffusion: the noise schedule and training objective shared by DDPM, DDIM and DPM-Solver++.

The forward process of Ho et al., "Denoising Diffusion Probabilistic Models" (2020) noises clean data ``x0`` in
``T`` discrete steps; in closed form ``x_i = alpha_i x0 + sigma_i eps`` with ``alpha_i = sqrt(alpha_bar_i)`` and
``sigma_i = sqrt(1 - alpha_bar_i)``, where ``alpha_bar_i = prod_{j <= i} (1 - beta_j)``.

* Beta schedules: ``linear`` (Ho et al. 2020, 1e-4 to 0.02 for T = 1000, rescaled for other T as in Nichol &
  Dhariwal 2021) and ``cosine`` (Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021).
* ``zero_terminal_snr`` rescales the schedule so the last step is pure noise (Lin et al., "Common Diffusion Noise
  Schedules and Sample Steps are Flawed", 2023, Algorithm 1); sampling then starts where training ends.
* Prediction targets: ``epsilon`` (Ho et al. 2020) or ``v = alpha eps - sigma x0`` (Salimans & Ho, "Progressive
  Distillation for Fast Sampling of Diffusion Models", 2022). The loss is the unweighted ("simple") mean squared
  error to the target.
* Sampling steps are spaced evenly from the noisiest training step ``T - 1`` down to step 0, both included: Lin et
  al. (2023) show that sampling must start at the last training step, and ending at step 0 (sigma ~ 0.01) keeps
  the final jump to clean data (``alpha_bar = 1``, taken with the model's ``x0`` estimate) negligible.

Step ``i`` in ``0 .. T-1`` is shown to the denoiser as the continuous timestep ``t = (i + 1) / T`` in (0, 1], the
framework's convention (0 = clean, 1 = pure noise), so denoisers need not know the sampler's step count.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from framework.core.interfaces import ModelFn
from framework.core.sampling import SamplingRun, SteppedSampler
from framework.layers.packing import PackedSequence


class BetaSchedule(str, enum.Enum):
    LINEAR = "linear"
    COSINE = "cosine"


class Prediction(str, enum.Enum):
    """What the denoiser is trained to predict from ``x_i``."""

    EPSILON = "epsilon"  # the noise eps (Ho et al. 2020)
    V = "v"  # alpha eps - sigma x0 (Salimans & Ho 2022): well defined even at zero SNR


def make_betas(schedule: BetaSchedule, num_steps: int) -> Tensor:
    """Betas ``[T]`` (float64)."""
    if schedule is BetaSchedule.LINEAR:
        scale = 1000.0 / num_steps  # keeps the end-to-end noise level when T differs from Ho et al.'s 1000
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if schedule is BetaSchedule.COSINE:
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # [T + 1]
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # clipped to avoid a singularity at t = T
    raise AssertionError(schedule)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha_bar) so the first value is kept and the last is 0."""
    root = alphas_cumprod.sqrt()  # [T]
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


@dataclass
class DiffusionRun(SamplingRun):
    indices: list[int]  # descending training steps visited; after the last one comes clean data (index -1)
    generator: torch.Generator | None = None  # the noise of stochastic steps, seeded once per run
    previous_x0: Tensor | None = None  # a multistep solver's clean estimate [N, D] of the step before
    previous_h: float = math.nan  # and its step size in half log-SNR


class GaussianDiffusion(SteppedSampler):
    """Shared base (not a plugin by itself): schedule, training loss, prediction conversions and the sampling run of
    DDPM-style samplers. Subclasses implement ``step``; ``stochastic`` ones get a generator seeded from
    ``noise_seed`` at every run, which makes a given initial noise always produce the same output."""

    stochastic = True  # draws fresh noise in its steps (DDPM; DDIM with eta > 0)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = BetaSchedule.LINEAR,
        prediction: Prediction = Prediction.EPSILON,
        zero_terminal_snr: bool = False,
        noise_seed: int = 0,
    ) -> None:
        """``noise_seed`` seeds the noise a stochastic sampler draws while sampling (not the initial noise)."""
        super().__init__()
        name = type(self).__name__
        if num_train_timesteps < 2:
            raise ValueError(f"{name}: num_train_timesteps must be >= 2, got {num_train_timesteps}")
        beta_schedule = _parse(BetaSchedule, beta_schedule, f"{name}: beta_schedule")
        prediction = _parse(Prediction, prediction, f"{name}: prediction")
        if zero_terminal_snr and prediction is Prediction.EPSILON:
            raise ValueError(
                f"{name}: prediction='epsilon' cannot be used with zero_terminal_snr=True: at zero SNR the noise "
                "prediction says nothing about the data (Lin et al. 2023); use prediction='v'"
            )
        self.num_train_timesteps, self.beta_schedule = num_train_timesteps, beta_schedule
        self.prediction, self.zero_terminal_snr, self.noise_seed = prediction, zero_terminal_snr, noise_seed
        alphas_cumprod = torch.cumprod(1 - make_betas(beta_schedule, num_train_timesteps), 0)  # [T]
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        # A plain float64 CPU tensor, not a buffer: mixed-precision casts must not round the schedule, and it is
        # derived from the arguments, so it has no place in a checkpoint.
        self.alphas_cumprod = alphas_cumprod  # [T]

    # ------------------------------------------------------------------------------------------------ schedule
    def timestep(self, index: Tensor | int) -> Tensor | float:
        """Continuous timestep in (0, 1] the denoiser sees for discrete step ``index``."""
        return (index + 1) / self.num_train_timesteps

    def alpha_sigma(self, index: int) -> tuple[float, float]:
        """Signal and noise scale of step ``index``; index -1 is clean data (alpha 1, sigma 0)."""
        if index < 0:
            return 1.0, 0.0
        alpha_bar = float(self.alphas_cumprod[index])
        return math.sqrt(alpha_bar), math.sqrt(max(0.0, 1.0 - alpha_bar))

    def sampling_indices(self, steps: int) -> list[int]:
        """Descending step indices for ``steps`` sampling steps, evenly spaced from T - 1 to 0."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {steps}"
            )
        if steps == 1:
            return [self.num_train_timesteps - 1]
        spaced = torch.linspace(self.num_train_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return [int(i) for i in spaced]  # distinct: the spacing is >= 1 because steps <= T

    def begin(self, noise: PackedSequence, steps: int) -> DiffusionRun:
        indices = self.sampling_indices(steps)
        generator = sampling_generator(self.noise_seed, noise.tokens.device) if self.stochastic else None
        return DiffusionRun(noise, len(indices), indices, generator)

    def step_pair(self, run: DiffusionRun, k: int) -> tuple[int, int]:
        """(training step of sampling step ``k``, the one it moves to; -1 = clean data)."""
        return run.indices[k], run.indices[k + 1] if k + 1 < run.num_steps else -1

    def time_at(self, run: DiffusionRun, index: int) -> Tensor:
        """The timestep [B] of training step ``index`` for every sample (0 for clean data)."""
        return torch.full((run.x.num_samples,), self.timestep(index), device=run.x.tokens.device)

    # ---------------------------------------------------------------------------------------------- prediction
    def target(self, clean: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The training target for ``x = alpha * clean + sigma * noise`` (all broadcastable)."""
        if self.prediction is Prediction.EPSILON:
            return noise
        return alpha * noise - sigma * clean  # v

    def clean_and_noise(self, prediction: Tensor, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """The model's estimates of (x0, eps) at a step with the given alpha, sigma."""
        if self.prediction is Prediction.EPSILON:
            return (x - sigma * prediction) / alpha, prediction
        # v-prediction, using alpha^2 + sigma^2 = 1
        return alpha * x - sigma * prediction, sigma * x + alpha * prediction

    def denoise(self, model_fn: ModelFn, x: PackedSequence, index: int) -> tuple[Tensor, Tensor]:
        """One model call at step ``index`` -> (x0, eps) estimates, each ``[N, D]``."""
        t = torch.full((x.num_samples,), self.timestep(index), device=x.tokens.device)  # [B]
        prediction = model_fn(x, t).tokens  # [N, D]
        return self.clean_and_noise(prediction, x.tokens, *self.alpha_sigma(index))

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, model_fn: ModelFn, clean: PackedSequence, generator: torch.Generator | None = None,
                      loss_mask: Tensor | None = None) -> Tensor:
        x0 = clean.tokens  # [N, D]
        device = x0.device
        index = torch.randint(0, self.num_train_timesteps, (clean.num_samples,), generator=generator, device=device)
        alpha_bar = self.alphas_cumprod.to(device)[index]  # [B] float64
        alpha = clean.per_token(alpha_bar.sqrt())[:, None].to(x0.dtype)  # [N, 1]
        sigma = clean.per_token((1 - alpha_bar).sqrt())[:, None].to(x0.dtype)  # [N, 1]
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)  # [N, D]
        x_t = alpha * x0 + sigma * noise  # [N, D]
        prediction = model_fn(clean.with_tokens(x_t), self.timestep(index).float()).tokens  # [N, D]
        per_token = (prediction.float() - self.target(x0, noise, alpha, sigma).float()).pow(2).mean(dim=1)  # [N]
        return clean.per_sample_mean(per_token, loss_mask)  # [B]


def _parse(kind: type[enum.Enum], value: object, where: str) -> enum.Enum:
    """An enum member from itself, its value ("v") or its name ("V", as jsonargparse writes it in YAML)."""
    try:
        return kind(value)
    except ValueError:
        if isinstance(value, str) and value in kind.__members__:
            return kind[value]
        raise ValueError(f"{where} must be one of {[m.value for m in kind]}, got {value!r}") from None


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator per ``sample`` call, so the same initial noise always gives the same result."""
    return torch.Generator(device=device).manual_seed(seed)
