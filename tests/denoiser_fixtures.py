"""Shared helpers for denoiser tests: a small bound denoiser with random weights and a random packed caption batch."""

from __future__ import annotations

import torch

from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO


def random_denoiser(cls: type[Denoiser], io: DenoiserIO, randomise: bool = True, **kwargs) -> Denoiser:
    torch.manual_seed(0)
    model = cls(**kwargs)
    model.bind(io)
    if randomise:  # adaLN-Zero and the zero head make a fresh model output 0 everywhere: randomise every weight
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
    return model.eval()


def random_conditioning(io: DenoiserIO, lengths: list[int], seed: int = 0) -> Conditioning:
    """Captions of the given lengths, padded to the longest (mask False on padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # [B, L]
    context = torch.randn(len(lengths), max(lengths), io.context_dim, generator=g) * mask[..., None]
    return Conditioning(context, mask, torch.randn(len(lengths), io.pooled_dim, generator=g))
