"""3D rotary position embeddings over (t, h, w) token coordinates.

Each attention head's channels are split into three groups that rotate with the token's frame, row and column
index respectively (as in Open-Sora 2 / HunyuanVideo / Wan). Because attention then depends only on relative
offsets, one model serves any number of frames, resolution and aspect ratio.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def split_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w), each even: a quarter for time, the rest shared by height and width."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    dt = max(2, (head_dim // 4) // 2 * 2)
    dh = (head_dim - dt) // 4 * 2
    return dt, dh, head_dim - dt - dh


class Rope3D(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.axis_dims = split_head_dim(head_dim)
        for name, dim in zip("thw", self.axis_dims):
            freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim / 2]
            self.register_buffer(f"freqs_{name}", freqs, persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [N, 3] -> cos, sin [N, 1, head_dim / 2] (computed once per forward, shared by all blocks)."""
        freqs = (self.freqs_t, self.freqs_h, self.freqs_w)
        angles = torch.cat([positions[:, i, None] * f for i, f in enumerate(freqs)], dim=-1)  # [N, head_dim / 2]
        return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of ``x`` [N, H, Dh] by the token's angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [N, H, Dh / 2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [N, H, Dh / 2, 2]
    return out.flatten(-2).type_as(x)
