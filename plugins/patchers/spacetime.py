"""Spacetime patches: non-overlapping (pt, ph, pw) cubes of a latent become the transformer's tokens."""

from __future__ import annotations

from torch import Tensor

from framework.core.interfaces import Patcher
from framework.layers.packing import PackedSequence


class SpacetimePatcher(Patcher):
    """Cuts each latent into (pt, ph, pw) cubes and packs all samples of a batch into one token sequence."""

    def __init__(self, patch_t: int = 1, patch_h: int = 2, patch_w: int = 2) -> None:
        super().__init__()
        for name, value in (("patch_t", patch_t), ("patch_h", patch_h), ("patch_w", patch_w)):
            if value < 1:
                raise ValueError(f"SpacetimePatcher: {name} must be >= 1, got {value}")
        self.patch_size = (patch_t, patch_h, patch_w)

    def patchify(self, latents: list[Tensor]) -> PackedSequence:
        pt, ph, pw = self.patch_size
        grids = []
        for latent in latents:
            c = latent.shape[0]
            gt, gh, gw = self.grid_size(tuple(latent.shape[1:]))
            x = latent.reshape(c, gt, pt, gh, ph, gw, pw)  # [c, gt, pt, gh, ph, gw, pw]
            x = x.permute(1, 3, 5, 2, 4, 6, 0)  # [gt, gh, gw, pt, ph, pw, c]
            grids.append(x.reshape(gt, gh, gw, pt * ph * pw * c))  # [gt, gh, gw, D]
        return PackedSequence.from_grids(grids)

    def unpatchify(self, packed: PackedSequence) -> list[Tensor]:
        pt, ph, pw = self.patch_size
        c = packed.tokens.shape[1] // (pt * ph * pw)
        latents = []
        for tokens, (gt, gh, gw) in zip(packed.split(), packed.grid_sizes):
            x = tokens.reshape(gt, gh, gw, pt, ph, pw, c)  # [gt, gh, gw, pt, ph, pw, c]
            x = x.permute(6, 0, 3, 1, 4, 2, 5)  # [c, gt, pt, gh, ph, gw, pw]
            latents.append(x.reshape(c, gt * pt, gh * ph, gw * pw))  # [c, t, h, w]
        return latents
