"""Size presets shared by every transformer denoiser: DiT's S / B / L / XL (Peebles & Xie 2023, Table 1).

A config picks a size by name and may override single fields::

    denoiser:
      class_path: STDiT
      init_args: {preset: B}              # width 768, depth 12, 12 heads
      init_args: {preset: S, depth: 6}    # a shallower S

Without a preset the fields fall back to S. Every denoiser resolves its size through ``resolve_size``, so a preset
means the same width, depth and head count in every architecture, and the checks (heads divide the width, RoPE's
head size) live in one place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerSize:
    width: int
    depth: int
    num_heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class Preset(str, enum.Enum):
    S = "S"
    B = "B"
    L = "L"
    XL = "XL"

    @property
    def size(self) -> TransformerSize:
        return PRESET_SIZES[self]


PRESET_SIZES: dict[Preset, TransformerSize] = {
    Preset.S: TransformerSize(width=384, depth=12, num_heads=6),
    Preset.B: TransformerSize(width=768, depth=12, num_heads=12),
    Preset.L: TransformerSize(width=1024, depth=24, num_heads=16),
    Preset.XL: TransformerSize(width=1152, depth=28, num_heads=16),
}


def resolve_size(
    owner: str,
    preset: Preset | str | None = None,
    width: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> TransformerSize:
    """The preset's size (S when none) with any explicitly given field overriding it; raises ValueError naming
    ``owner`` and the fields at fault."""
    try:
        base = Preset(preset).size if preset is not None else Preset.S.size
    except ValueError:
        raise ValueError(
            f"{owner}: unknown preset {preset!r}; valid presets: {[p.value for p in Preset]}"
        ) from None
    size = TransformerSize(
        width=base.width if width is None else width,
        depth=base.depth if depth is None else depth,
        num_heads=base.num_heads if num_heads is None else num_heads,
    )
    if size.width < 1 or size.num_heads < 1 or size.depth < 1:
        raise ValueError(f"{owner}: width, depth and num_heads must be >= 1, got {size}")
    if size.width % size.num_heads:
        raise ValueError(f"{owner}: width {size.width} is not divisible by num_heads {size.num_heads}")
    if size.head_dim % 2 or size.head_dim < 6:
        raise ValueError(
            f"{owner}: head size width / num_heads = {size.head_dim} must be even and >= 6 for 3D RoPE "
            f"(width {size.width}, num_heads {size.num_heads})"
        )
    return size
