"""Rectified flow (flow matching with straight paths) and its Euler sampler.

Training follows Liu et al., "Flow Straight and Fast" (2022) and Lipman et al., "Flow Matching for Generative
Modeling" (2023): ``x_t = (1 - t) x_0 + t eps`` and the model predicts the velocity ``eps - x_0``. Timesteps are
drawn logit-normal and shifted towards noise for longer sequences, as in Esser et al., "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3, 2024), because more tokens carry more redundant signal and
need more noise to destroy it. Sampling integrates ``dx/dt = v`` from t = 1 to 0 with Euler steps on the same
shifted schedule.

The denoiser's output is read as the velocity (``prediction: velocity``) or as the clean data
(``prediction: clean``). Li & He, "Back to Basics: Let Denoising Generative Models Denoise" (JiT, 2025) show that
when a token has many dimensions relative to the network width (large pixel-space patches), predicting the velocity
or the noise fails while predicting clean data works: clean data lies on a low-dimensional manifold, noise does not,
and a narrow network cannot carry the full-rank noise through. With ``clean``, the predicted velocity is
``(x_t - x0_hat) / t`` and the loss stays the velocity MSE, ``|x0_hat - x0|^2 / t^2``, with the weight capped
at ``1 / t_min^2`` for nearly clean samples as in JiT (capping the weight rather than the divisor keeps the true
clean data the minimiser at every t).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from framework.core.interfaces import ModelFn, StepCallback
from framework.core.sampling import SamplingRun, SteppedSampler
from framework.layers.packing import PackedSequence

def shift_time(t: Tensor, shift: Tensor) -> Tensor:
    """SD3 time shift ``s t / (1 + (s - 1) t)``: s > 1 spends more of the schedule at high noise."""
    return shift * t / (1 + (shift - 1) * t)

@dataclass
class FlowRun(SamplingRun):
    times: Tensor  # [S + 1, B] the shifted time grid, from the start time to 0


class FlowPrediction(str, enum.Enum):
    """What the denoiser's output means to a rectified-flow sampler."""

    VELOCITY = "velocity"  # v = eps - x0 (Liu et al. 2022; SD3)
    CLEAN = "clean"  # x0 (JiT, Li & He 2025); turned into a velocity before the loss and the ODE step


class RectifiedFlow(SteppedSampler):
    """Rectified-flow training (velocity loss, logit-normal t, sequence-length time shift) with Euler sampling."""

    def __init__(
        self,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        shift_reference_tokens: int = 0,
        prediction: FlowPrediction = FlowPrediction.VELOCITY,
        t_min: float = 0.05,
    ) -> None:
        """``shift`` applies as is when ``shift_reference_tokens`` is 0; otherwise a sample with L tokens uses
        ``shift * sqrt(L / shift_reference_tokens)``, so larger videos get proportionally more noise. With
        ``prediction: clean``, ``t_min`` caps the loss weight ``1 / t^2`` of nearly clean samples (JiT uses 0.05)."""
        super().__init__()
        if logit_std <= 0:
            raise ValueError(f"RectifiedFlow: logit_std must be > 0, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"RectifiedFlow: shift must be > 0, got {shift}")
        if shift_reference_tokens < 0:
            raise ValueError(f"RectifiedFlow: shift_reference_tokens must be >= 0, got {shift_reference_tokens}")
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"RectifiedFlow: t_min must be in (0, 1), got {t_min}")
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.shift, self.shift_reference_tokens = shift, shift_reference_tokens
        self.prediction, self.t_min = FlowPrediction(prediction), t_min

    def velocity(self, output: Tensor, x_t: Tensor, t_tok: Tensor) -> Tensor:
        """The velocity [N, D] that a denoiser ``output`` [N, D] stands for at noisy tokens ``x_t`` and times ``t_tok``
        [N, 1] > 0 (``x_t = (1 - t) x0 + t eps`` gives ``v = eps - x0 = (x_t - x0) / t``)."""
        if self.prediction is FlowPrediction.VELOCITY:
            return output
        return (x_t - output) / t_tok

    def sample_shift(self, packed: PackedSequence) -> Tensor:
        """Per-sample time shift [B]."""
        lengths = torch.tensor(packed.seqlens, dtype=torch.float32, device=packed.tokens.device)
        if self.shift_reference_tokens == 0:
            return torch.full_like(lengths, self.shift)
        return self.shift * (lengths / self.shift_reference_tokens).sqrt()

    def training_loss(self, model_fn: ModelFn, clean: PackedSequence, generator: torch.Generator | None = None,
                      loss_mask: Tensor | None = None) -> Tensor:
        x0 = clean.tokens  # [N, D]
        device = x0.device
        logits = torch.randn(clean.num_samples, generator=generator, device=device) * self.logit_std + self.logit_mean
        t = shift_time(torch.sigmoid(logits), self.sample_shift(clean))  # [B]
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)  # [N, D]
        t_tok = clean.per_token(t)[:, None].to(x0.dtype)  # [N, 1]
        x_t = (1 - t_tok) * x0 + t_tok * noise  # [N, D]
        output = model_fn(clean.with_tokens(x_t), t).tokens.float()  # [N, D]
        if self.prediction is FlowPrediction.VELOCITY:
            error = output - (noise - x0).float()  # [N, D]
        else:
            # (x_t - x0_hat) / t - (eps - x0) = (x0 - x0_hat) / t: the velocity error, with 1 / t capped at 1 / t_min
            error = (output - x0.float()) / t_tok.float().clamp_min(self.t_min)  # [N, D]
        per_token = error.pow(2).mean(dim=1)  # [N]
        return clean.per_sample_mean(per_token, loss_mask)  # [B]

    def schedule(self, steps: int, packed: PackedSequence, start_t: float = 1.0) -> Tensor:
        """Time grid [steps + 1, B] from ``start_t`` (a noise level, after the shift) to 0, shifted per sample."""
        if steps < 1:
            raise ValueError(f"RectifiedFlow: steps must be >= 1, got {steps}")
        if not 0.0 < start_t <= 1.0:
            raise ValueError(f"RectifiedFlow: start_t must be in (0, 1], got {start_t}")
        shift = self.sample_shift(packed)[None]  # [1, B]
        # Unshifted start u with shift_time(u) = start_t (the inverse of s u / (1 + (s - 1) u)), so the grid stays
        # the usual shifted one, only truncated.
        grid = torch.linspace(1.0, 0.0, steps + 1, device=packed.tokens.device)[:, None]  # [S + 1, 1]
        if start_t < 1.0:
            grid = grid * (start_t / (shift - (shift - 1) * start_t))  # [S + 1, B]
        return shift_time(grid, shift)  # [S + 1, B]

    def start_point(self, noise: PackedSequence, start_t: float, start: PackedSequence | None) -> PackedSequence:
        """Where sampling begins: pure noise at ``start_t = 1``, else ``start`` noised to ``start_t`` (SDEdit,
        Meng et al. 2022: ``x_t = (1 - t) x_0 + t eps`` with this sampler's own forward process)."""
        if start_t == 1.0:
            return noise
        if start is None:
            raise ValueError(f"RectifiedFlow: start_t={start_t} < 1 needs the clean ``start`` to noise")
        return noise.with_tokens((1 - start_t) * start.tokens + start_t * noise.tokens)

    def begin(self, noise: PackedSequence, steps: int, start_t: float = 1.0,
              start: PackedSequence | None = None) -> FlowRun:
        """A run on the shifted time grid from ``start_t`` (``start`` noised to it when < 1) down to 0."""
        times = self.schedule(steps, noise, start_t)  # [S + 1, B]
        return FlowRun(self.start_point(noise, start_t, start), steps, times)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: PackedSequence,
        steps: int,
        callback: StepCallback | None = None,
        start_t: float = 1.0,
        start: PackedSequence | None = None,
    ) -> PackedSequence:
        """Integrate the learned ODE from t = 1 to 0 in ``steps`` steps. With ``start_t`` < 1 it integrates from
        ``start`` noised to ``start_t`` instead of from pure noise (SDEdit)."""
        return self.run_steps(model_fn, self.begin(noise, steps, start_t, start), callback)

    def step(self, model_fn: ModelFn, run: FlowRun, k: int) -> Tensor:
        """Euler (first order; one model call per step)."""
        x = run.x
        t, t_next = run.times[k], run.times[k + 1]  # [B]
        t_tok = x.per_token(t)[:, None].to(x.tokens.dtype)  # [N, 1]
        velocity = self.velocity(model_fn(x, t).tokens, x.tokens, t_tok)  # [N, D]
        dt = x.per_token(t_next - t)[:, None].to(velocity.dtype)  # [N, 1], negative
        run.x = x.with_tokens(x.tokens + dt * velocity)
        return t_next
