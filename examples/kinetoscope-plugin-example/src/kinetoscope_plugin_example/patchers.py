"""Temporal-difference patches: frame 0 as is, every later frame as its difference to the previous one.

Consecutive video frames are highly correlated, so differences are mostly small and the tokens of a static background
are near zero (the idea behind frame-difference inputs in two-stream video models, Simonyan & Zisserman 2014, and
behind P-frames in video codecs). The transform is linear and exactly invertible (a cumulative sum), so the
denoiser still predicts a full video; only the token coordinates change. After the difference, the latent is cut into
non-overlapping (pt, ph, pw) cubes exactly as kinetoscope's ``SpacetimePatcher`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.layers.packing import PackedSequence
from plugins.patchers.spacetime import SpacetimePatcher


class TemporalDifferencePatcher(SpacetimePatcher):
    """Spacetime patches of the frame-to-frame differences of each latent (frame 0 kept); exact round trip."""

    def __init__(self, patch_t: int = 1, patch_h: int = 2, patch_w: int = 2, difference_scale: float = 1.0) -> None:
        """``difference_scale`` multiplies the differences (frames 1..T-1) so their scale can match frame 0's."""
        super().__init__(patch_t, patch_h, patch_w)
        if difference_scale <= 0:
            raise ValueError(f"TemporalDifferencePatcher: difference_scale must be > 0, got {difference_scale}")
        self.difference_scale = difference_scale

    def patchify(self, latents: list[Tensor]) -> PackedSequence:
        differenced = []
        for latent in latents:  # each [c, t, h, w]
            steps = (latent[:, 1:] - latent[:, :-1]) * self.difference_scale  # [c, t - 1, h, w]
            differenced.append(torch.cat([latent[:, :1], steps], dim=1))  # [c, t, h, w]
        return super().patchify(differenced)

    def unpatchify(self, packed: PackedSequence) -> list[Tensor]:
        latents = []
        for differenced in super().unpatchify(packed):  # each [c, t, h, w]
            steps = differenced[:, 1:] / self.difference_scale  # [c, t - 1, h, w]
            latents.append(torch.cat([differenced[:, :1], steps], dim=1).cumsum(dim=1))  # [c, t, h, w]
        return latents
