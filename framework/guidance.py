"""Classifier-free guidance (Ho & Salimans, 2022), shared by every sampler.

The guided prediction ``uncond + scale * (cond - uncond)`` is linear in the model output, so it applies unchanged
to velocity, noise or clean-data predictions. Both branches run as one packed batch: one denoiser call per step.
"""

from __future__ import annotations

import torch

from framework.interfaces import Conditioning, Denoiser, ModelFn
from framework.packing import PackedSequence


def guided_model_fn(denoiser: Denoiser, cond: Conditioning, null: Conditioning | None, scale: float) -> ModelFn:
    """Bind conditioning (and guidance) to a denoiser: ``(x_t, t[B]) -> prediction``."""
    if null is None or scale == 1.0:
        return lambda x, t: denoiser(x, t, cond)
    both = Conditioning.cat([cond, null])

    def model_fn(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
        out = denoiser(PackedSequence.concat([x, x]), torch.cat([t, t]), both).tokens  # [2N, D]
        conditional, unconditional = out.chunk(2)  # each [N, D]
        return x.with_tokens(unconditional + scale * (conditional - unconditional))

    return model_fn
