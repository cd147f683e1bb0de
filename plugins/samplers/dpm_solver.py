"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE in data-prediction form.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (2022), Algorithm 2.
With ``lambda = log(alpha / sigma)`` (half the log-SNR) and the model's clean-data estimate ``x0_i`` at step i, one
step to the next (less noisy) step with ``h = lambda_next - lambda_i`` is

    x_next = (sigma_next / sigma_i) x_i - alpha_next (exp(-h) - 1) D_i,
    D_i = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1},   r = h_{i-1} / h_i,

i.e. the exact integral of the linear part plus a linear extrapolation of ``x0`` over lambda from the previous
step's estimate (first order, ``D = x0_i``, on the first step). One model call per step; 10-25 steps match hundreds
of DDPM steps. The last step lands on clean data (sigma = 0), where the update reduces to ``x = x0`` as in
diffusers' ``lower_order_final``. Training is the shared Gaussian diffusion objective.

Steps are spaced uniformly in lambda ("logSNR" spacing, Lu et al. 2022, Sec. 3.3), not in the step index: the
extrapolation above is accurate when consecutive ``h`` are similar, and an index-uniform grid on the linear schedule
ends with one lambda jump four times the previous one (measured on the test mixture: 20 steps are then no better
than DDIM; logSNR spacing makes them 2.8x closer to the converged ODE solution than DDIM's).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from framework.core.interfaces import ModelFn
from plugins.samplers.gaussian_diffusion import DiffusionRun, GaussianDiffusion


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma); -inf at zero SNR (alpha = 0), +inf on clean data (sigma = 0)."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


class DPMSolverPlusPlus(GaussianDiffusion):
    """DPM-Solver++(2M) (Lu et al. 2022): deterministic 2nd-order multistep sampling, one model call per step."""

    stochastic = False  # draws no noise: noise_seed has no effect

    def sampling_indices(self, steps: int) -> list[int]:
        """Descending training steps nearest to a lambda-uniform grid from step T - 1 to step 0.

        Near step 0 lambda changes fast, so two grid points can round to one training step; these are merged,
        which only happens when ``steps`` approaches ``num_train_timesteps``."""
        super().sampling_indices(steps)  # validates steps
        if steps == 1:
            return [self.num_train_timesteps - 1]
        alpha_bar = self.alphas_cumprod  # [T]
        lambdas = 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())  # [T], increasing as the step index decreases
        # with zero terminal SNR lambda(T - 1) = -inf: span the grid from the next step and start at T - 1 anyway
        noisiest = lambdas[-1] if torch.isfinite(lambdas[-1]) else lambdas[-2]
        grid = torch.linspace(float(noisiest), float(lambdas[0]), steps, dtype=torch.float64)  # [S]
        nearest = (lambdas[None, :] - grid[:, None]).abs().argmin(dim=1)  # [S]
        nearest[0] = self.num_train_timesteps - 1
        return sorted({int(i) for i in nearest}, reverse=True)

    def step(self, model_fn: ModelFn, run: DiffusionRun, k: int) -> Tensor:
        index, prev = self.step_pair(run, k)
        x = run.x
        x0, _ = self.denoise(model_fn, x, index)  # [N, D]
        alpha, sigma = self.alpha_sigma(index)
        alpha_next, sigma_next = self.alpha_sigma(prev)
        if prev < 0:
            tokens = x0  # sigma_next = 0: exp(-h) = 0 and the first-order update is exactly x0
        else:
            h = half_log_snr(alpha_next, sigma_next) - half_log_snr(alpha, sigma)  # > 0
            data = x0
            if run.previous_x0 is not None and math.isfinite(run.previous_h):
                r = run.previous_h / h
                data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * run.previous_x0  # [N, D]
            tokens = (sigma_next / sigma) * x.tokens - alpha_next * math.expm1(-h) * data  # [N, D]
            run.previous_h = h
        run.previous_x0 = x0
        run.x = x.with_tokens(tokens)
        return self.time_at(run, prev)
