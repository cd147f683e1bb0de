"""3D rotary position embeddings over (t, h, w) token coordinates.

Each attention head's channels are split into three groups that rotate with the token's frame, row and column
index respectively (as in Open-Sora 2 / HunyuanVideo / Wan). Because attention then depends only on relative
offsets, one model serves any number of frames, resolution and aspect ratio.

Scaling rule (how one model serves many sizes):

1. Positions are token-grid indices -- one unit per patch, at every size and aspect ratio -- never normalised to the
   canvas. A 16:9, a 9:16 and a 1:1 sample therefore share the same geometry per patch (an object 3 patches wide
   has the same rotary phase difference across it in all three); only the extent of the grid differs. This is what
   native-size training relies on: mixed sizes in a batch are consistent with each other, and a model trained on
   landscape, portrait and square buckets samples all three from one checkpoint.
2. Training on mixed sizes covers every relative offset up to the largest trained grid extent along each axis.
   Sampling at any size whose grid fits inside those extents -- any aspect ratio among them -- is interpolation.
3. Beyond the trained extent (e.g. sampling 1920x1080 after training at 512 px), the lowest frequencies would rotate
   through angles never seen in training. ``position_scale`` then applies position interpolation (Chen et al. 2023,
   "Extending Context Window of Large Language Models via Positional Interpolation"), per axis: positions are
   multiplied by the largest trained offset over the largest requested one (``interpolation_scale``), so every offset maps back into the
   trained range, at the price of finer spacing than at training. The default scale is 1 (no change).
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


def interpolation_scale(
    trained_extent: tuple[int, int, int], requested_extent: tuple[int, int, int]
) -> tuple[float, float, float]:
    """Per-axis position scale for sampling beyond the trained token-grid extent (rule 3 in the module docstring):
    the largest trained offset over the largest requested one, ``(trained - 1) / (requested - 1)``, where the request
    is larger; else 1. Extents are token-grid sizes (t, h, w)."""
    return tuple(
        (trained - 1) / (requested - 1) if requested > trained else 1.0
        for trained, requested in zip(trained_extent, requested_extent)
    )


class Rope3D(nn.Module):
    """Rotary embedding over (t, h, w) positions. ``position_scale`` (t, h, w) multiplies the positions; keep it at
    1 for training and for sampling within the trained extent, set it from ``interpolation_scale`` beyond."""

    def __init__(
        self, head_dim: int, theta: float = 10000.0, position_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ) -> None:
        super().__init__()
        self.axis_dims = split_head_dim(head_dim)
        self.position_scale = tuple(float(s) for s in position_scale)
        for name, dim in zip("thw", self.axis_dims):
            freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim / 2]
            self.register_buffer(f"freqs_{name}", freqs, persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [N, 3] -> cos, sin [N, 1, head_dim / 2] (computed once per forward, shared by all blocks)."""
        freqs = (self.freqs_t, self.freqs_h, self.freqs_w)
        if self.position_scale != (1.0, 1.0, 1.0):
            positions = positions * positions.new_tensor(self.position_scale)  # [N, 3]
        angles = torch.cat([positions[:, i, None] * f for i, f in enumerate(freqs)], dim=-1)  # [N, head_dim / 2]
        return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of ``x`` [N, H, Dh] by the token's angles: each interleaved pair (x1, x2) becomes
    (x1 cos - x2 sin, x1 sin + x2 cos).

    Eager, the pairs are read as complex numbers x1 + i x2 times cos + i sin: the same products and sums (bitwise equal
    on CPU) in one kernel, measured 10x faster than the real arithmetic, which takes a kernel per product and one more
    to interleave the halves with ``torch.stack``. Under torch.compile the real arithmetic is used instead: Inductor
    cannot generate code for complex tensors (it would fall back to eager kernels and copies), while it fuses the real
    form, and the q/k RMSNorm before it, into one kernel."""
    if torch.compiler.is_compiling():
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [N, H, Dh / 2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [N, H, Dh / 2, 2]
        return rotated.flatten(-2).type_as(x)  # [N, H, Dh]
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [N, H, Dh / 2] complex
    rotated = torch.view_as_real(pairs * torch.complex(cos, sin))  # [N, H, Dh / 2, 2]
    return rotated.flatten(-2).type_as(x)  # [N, H, Dh]
