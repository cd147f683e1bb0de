"""DDIM: Gaussian diffusion sampled by the non-Markovian implicit process.

Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2021), Eq. 12: with the model's estimates ``(x0, eps)``
at step ``i``, the next (earlier) step ``j`` is

    x_j = sqrt(abar_j) x0 + sqrt(1 - abar_j - s^2) eps + s z,
    s = eta sqrt((1 - abar_j) / (1 - abar_i)) sqrt(1 - abar_i / abar_j).

``eta = 0`` gives the deterministic DDIM sampler (an ODE solver: the same noise always gives the same sample, and
few steps suffice); ``eta = 1`` gives the DDPM posterior (ancestral sampling). Training is the shared Gaussian
diffusion objective, so a DDPM-trained model samples with DDIM unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from framework.core.interfaces import ModelFn
from plugins.samplers.gaussian_diffusion import BetaSchedule, DiffusionRun, GaussianDiffusion, Prediction


class DDIM(GaussianDiffusion):
    """DDIM (Song et al. 2021): shared diffusion training; eta = 0 deterministic, eta = 1 ancestral sampling."""

    # The base's parameters are listed again (not **kwargs): the config reference and `kinetoscope plugins` read
    # the signature. Only eta is DDIM's own.
    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: BetaSchedule = BetaSchedule.LINEAR,
                 prediction: Prediction = Prediction.EPSILON, zero_terminal_snr: bool = False, eta: float = 0.0,
                 noise_seed: int = 0) -> None:
        super().__init__(num_train_timesteps, beta_schedule, prediction, zero_terminal_snr, noise_seed)
        if eta < 0:
            raise ValueError(f"DDIM: eta must be >= 0, got {eta}")
        self.eta = eta

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(self, model_fn: ModelFn, run: DiffusionRun, k: int) -> Tensor:
        index, prev = self.step_pair(run, k)
        x = run.x
        x0, eps = self.denoise(model_fn, x, index)  # each [N, D]
        abar, abar_prev = self.alpha_sigma(index)[0] ** 2, self.alpha_sigma(prev)[0] ** 2
        s = self.eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        tokens = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1 - abar_prev - s**2)) * eps  # [N, D]
        if s > 0:
            z = torch.randn(x.tokens.shape, generator=run.generator, device=x.tokens.device, dtype=x.tokens.dtype)
            tokens = tokens + s * z
        run.x = x.with_tokens(tokens)
        return self.time_at(run, prev)
