"""Rectified flow (flow matching with straight paths) and its Euler sampler.

Training follows Liu et al., "Flow Straight and Fast" (2022) and Lipman et al., "Flow Matching for Generative
Modeling" (2023): ``x_t = (1 - t) x_0 + t eps`` and the model predicts the velocity ``eps - x_0``. Timesteps are
drawn logit-normal and shifted towards noise for longer sequences, as in Esser et al., "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis" (SD3, 2024), because more tokens carry more redundant signal and
need more noise to destroy it. Sampling integrates ``dx/dt = v`` from t = 1 to 0 with Euler steps on the same
shifted schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.interfaces import ModelFn, Sampler, StepCallback
from framework.packing import PackedSequence

def shift_time(t: Tensor, shift: Tensor) -> Tensor:
    """SD3 time shift ``s t / (1 + (s - 1) t)``: s > 1 spends more of the schedule at high noise."""
    return shift * t / (1 + (shift - 1) * t)

class RectifiedFlow(Sampler):
    """Rectified-flow training (velocity target, logit-normal t, sequence-length time shift) with Euler sampling."""

    def __init__(
        self,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        shift_reference_tokens: int = 0,
    ) -> None:
        """``shift`` applies as is when ``shift_reference_tokens`` is 0; otherwise a sample with L tokens uses
        ``shift * sqrt(L / shift_reference_tokens)``, so larger videos get proportionally more noise."""
        super().__init__()
        if logit_std <= 0:
            raise ValueError(f"RectifiedFlow: logit_std must be > 0, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"RectifiedFlow: shift must be > 0, got {shift}")
        if shift_reference_tokens < 0:
            raise ValueError(f"RectifiedFlow: shift_reference_tokens must be >= 0, got {shift_reference_tokens}")
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.shift, self.shift_reference_tokens = shift, shift_reference_tokens

    def sample_shift(self, packed: PackedSequence) -> Tensor:
        """Per-sample time shift [B]."""
        lengths = torch.tensor(packed.seqlens, dtype=torch.float32, device=packed.tokens.device)
        if self.shift_reference_tokens == 0:
            return torch.full_like(lengths, self.shift)
        return self.shift * (lengths / self.shift_reference_tokens).sqrt()

    def training_loss(self, model_fn: ModelFn, clean: PackedSequence, generator: torch.Generator | None = None) -> Tensor:
        x0 = clean.tokens  # [N, D]
        device = x0.device
        logits = torch.randn(clean.num_samples, generator=generator, device=device) * self.logit_std + self.logit_mean
        t = shift_time(torch.sigmoid(logits), self.sample_shift(clean))  # [B]
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)  # [N, D]
        t_tok = clean.per_token(t)[:, None].to(x0.dtype)  # [N, 1]
        x_t = (1 - t_tok) * x0 + t_tok * noise  # [N, D]
        velocity = model_fn(clean.with_tokens(x_t), t).tokens  # [N, D]
        per_token = (velocity.float() - (noise - x0).float()).pow(2).mean(dim=1)  # [N]
        return clean.per_sample_mean(per_token)  # [B]

    def schedule(self, steps: int, packed: PackedSequence) -> Tensor:
        """Time grid [steps + 1, B] from 1 to 0, shifted per sample."""
        if steps < 1:
            raise ValueError(f"RectifiedFlow: steps must be >= 1, got {steps}")
        grid = torch.linspace(1.0, 0.0, steps + 1, device=packed.tokens.device)[:, None]  # [S + 1, 1]
        return shift_time(grid, self.sample_shift(packed)[None])  # [S + 1, B]

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, noise: PackedSequence, steps: int, callback: StepCallback | None = None
    ) -> PackedSequence:
        """Euler integration of the learned ODE (first order; one model call per step)."""
        times = self.schedule(steps, noise)  # [S + 1, B]
        x = noise
        for i in range(steps):
            t, t_next = times[i], times[i + 1]  # [B]
            velocity = model_fn(x, t).tokens  # [N, D]
            dt = x.per_token(t_next - t)[:, None].to(velocity.dtype)  # [N, 1], negative
            x = x.with_tokens(x.tokens + dt * velocity)
            if callback is not None:
                callback(i, t_next, x)
        return x

