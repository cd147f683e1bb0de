"""DDPM: Gaussian diffusion sampled by ancestral steps through the true posterior.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020), Algorithm 2: from ``x_i`` the model's clean estimate
``x0`` gives the Gaussian posterior ``q(x_j | x_i, x0)`` of an earlier step ``j``, with mean
``sqrt(abar_j) beta / (1 - abar_i) x0 + sqrt(1 - beta) (1 - abar_j) / (1 - abar_i) x_i`` and variance
``beta (1 - abar_j) / (1 - abar_i)``, where ``beta = 1 - abar_i / abar_j`` (the "fixed small" variance; with
``steps < T`` the strided chain of Nichol & Dhariwal 2021 uses the same formula over the skipped steps). A fresh
Gaussian is drawn at every step, so the sampler is stochastic; it is seeded once per ``sample`` call from
``noise_seed``, which makes a given initial noise always produce the same output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from framework.core.interfaces import ModelFn
from plugins.samplers.gaussian_diffusion import DiffusionRun, GaussianDiffusion


class DDPM(GaussianDiffusion):
    """DDPM (Ho et al. 2020): epsilon or v training on a linear/cosine schedule, ancestral sampling."""

    def step(self, model_fn: ModelFn, run: DiffusionRun, k: int) -> Tensor:
        index, prev = self.step_pair(run, k)
        x = run.x
        x0, _ = self.denoise(model_fn, x, index)  # [N, D]
        abar, abar_prev = self.alpha_sigma(index)[0] ** 2, self.alpha_sigma(prev)[0] ** 2
        beta = 1 - abar / abar_prev
        mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        ) * x.tokens  # [N, D]
        variance = beta * (1 - abar_prev) / (1 - abar)
        if variance > 0:
            z = torch.randn(x.tokens.shape, generator=run.generator, device=x.tokens.device, dtype=x.tokens.dtype)
            mean = mean + math.sqrt(variance) * z
        run.x = x.with_tokens(mean)
        return self.time_at(run, prev)
