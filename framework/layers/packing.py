"""PackedSequence: many variable-size samples as one token sequence.

Native-size training means a batch holds clips of different durations, resolutions and aspect ratios. Instead of
padding them to the largest, their tokens are concatenated into one ``[N, D]`` tensor; ``cu_seqlens`` marks where
each sample starts (the layout FlashAttention and xformers' ``BlockDiagonalMask`` use), ``positions`` gives every
token its (t, h, w) grid index for rotary embeddings, and ``grid_sizes`` keeps each sample's token grid so the
patcher can fold tokens back into latents.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class PackedSequence:
    tokens: Tensor  # [N, D], N = sum of per-sample token counts
    cu_seqlens: Tensor  # [B + 1] int64, cumulative token counts starting at 0
    positions: Tensor  # [N, 3] float, (t, h, w) token-grid coordinates
    grid_sizes: tuple[tuple[int, int, int], ...]  # per sample (t, h, w) token grid
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"PackedSequence.tokens must be [N, D], got shape {tuple(self.tokens.shape)}")
        if self.cu_seqlens.dim() != 1 or len(self.cu_seqlens) != len(self.grid_sizes) + 1:
            raise ValueError(
                f"cu_seqlens must have one entry per sample plus one ({len(self.grid_sizes) + 1}), "
                f"got shape {tuple(self.cu_seqlens.shape)}"
            )
        lengths = {t * h * w for t, h, w in self.grid_sizes}
        # a plain attribute, so code traced by torch.compile reads one bool instead of the whole layout
        object.__setattr__(self, "_uniform", len(lengths) == 1)
        expected = sum(t * h * w for t, h, w in self.grid_sizes)
        if self.tokens.shape[0] != expected or self.positions.shape != (expected, 3):
            raise ValueError(
                f"grid sizes {self.grid_sizes} imply {expected} tokens, but tokens has {self.tokens.shape[0]} "
                f"and positions has shape {tuple(self.positions.shape)}"
            )

    @classmethod
    def from_grids(cls, grids: list[Tensor]) -> PackedSequence:
        """Pack per-sample token grids ``[t, h, w, D]`` (row-major t, h, w order)."""
        if not grids:
            raise ValueError("cannot pack an empty list of samples")
        dims = {g.shape[-1] for g in grids}
        if len(dims) != 1 or any(g.dim() != 4 for g in grids):
            raise ValueError(f"every grid must be [t, h, w, D] with one D, got {[tuple(g.shape) for g in grids]}")
        sizes = tuple(tuple(int(s) for s in g.shape[:3]) for g in grids)
        tokens = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])  # [N, D]
        lengths = torch.tensor([t * h * w for t, h, w in sizes], dtype=torch.long)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(tokens.device)  # [B + 1]
        positions = torch.cat([grid_positions(s, tokens.device) for s in sizes])  # [N, 3]
        return cls(tokens, cu_seqlens, positions, sizes)

    @classmethod
    def concat(cls, packs: list[PackedSequence]) -> PackedSequence:
        """Join packs into one (e.g. the conditional and unconditional halves of a guided step)."""
        tokens = torch.cat([p.tokens for p in packs])
        lengths = torch.tensor([n for p in packs for n in p.seqlens], dtype=torch.long, device=tokens.device)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        sizes = tuple(s for p in packs for s in p.grid_sizes)
        return cls(tokens, cu_seqlens, torch.cat([p.positions for p in packs]), sizes)

    # -- derived views (cached: the same pack is read by every block of a denoiser) --------------------------
    @property
    def num_samples(self) -> int:
        return len(self.grid_sizes)

    @cached_property
    def seqlens(self) -> tuple[int, ...]:
        return tuple(t * h * w for t, h, w in self.grid_sizes)

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    @property
    def is_uniform(self) -> bool:
        """All samples have the same token count, so the pack can be viewed as a dense ``[B, L, D]`` batch."""
        return self._uniform

    @property
    def sample_index(self) -> Tensor:
        """``[N]`` index of the sample each token belongs to, for broadcasting per-sample values to tokens."""
        if "sample_index" not in self._cache:
            lengths = torch.tensor(self.seqlens, device=self.tokens.device)
            self._cache["sample_index"] = torch.repeat_interleave(
                torch.arange(self.num_samples, device=self.tokens.device), lengths
            )
        return self._cache["sample_index"]

    def layout_cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``, computed once per layout: packs made by ``with_tokens`` share the cache, so a value derived
        from the layout alone (e.g. attention groups) is built at the first sampling step and reused after."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def per_token(self, values: Tensor) -> Tensor:
        """Broadcast ``[B, ...]`` per-sample values to ``[N, ...]`` per-token values."""
        if self.is_uniform:  # sizes from the shapes alone: traced by torch.compile for any uniform layout
            b, n = values.shape[0], self.tokens.shape[0] // values.shape[0]
            return values.unsqueeze(1).expand(b, n, *values.shape[1:]).reshape(b * n, *values.shape[1:])  # [N, ...]
        return self._per_token_mixed(values)

    @torch.compiler.disable  # loops over the layout: eager under torch.compile (framework/training/compilation.py)
    def _per_token_mixed(self, values: Tensor) -> Tensor:
        # expand + cat rather than values[sample_index]: the gather's backward zero-fills and scatters an [N, ...]
        # buffer, measured as the largest extra cost of a mixed-size DiT step on CPU; expand's backward is a sum.
        return torch.cat([v.expand(n, *v.shape) for v, n in zip(values, self.seqlens)])  # [N, ...]

    def per_sample_mean(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean of ``[N]`` per-token values within each sample -> ``[B]``; with ``mask`` [N] bool, over the tokens
        where it is True only (0 for a sample without such tokens), e.g. a loss that leaves given frames out."""
        sums = torch.zeros(self.num_samples, dtype=values.dtype, device=values.device)
        if mask is None:
            sums.index_add_(0, self.sample_index, values)
            return sums / torch.tensor(self.seqlens, dtype=values.dtype, device=values.device)
        weights = mask.to(values.dtype)  # [N]
        counts = torch.zeros_like(sums)
        sums.index_add_(0, self.sample_index, values * weights)
        counts.index_add_(0, self.sample_index, weights)
        return sums / counts.clamp_min(1.0)  # [B]

    def split(self, tokens: Tensor | None = None) -> list[Tensor]:
        """Per-sample ``[L_i, D]`` views of ``tokens`` (default: this pack's tokens)."""
        return list((self.tokens if tokens is None else tokens).split(list(self.seqlens)))

    @torch.compiler.disable  # builds a PackedSequence (checks its grid sizes): eager under torch.compile
    def with_tokens(self, tokens: Tensor) -> PackedSequence:
        """Same layout, new token values (e.g. a denoiser's prediction or noise of a different width)."""
        if tokens.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"expected {self.tokens.shape[0]} tokens, got {tokens.shape[0]}")
        return PackedSequence(tokens, self.cu_seqlens, self.positions, self.grid_sizes, self._cache)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedSequence:
        return PackedSequence(
            self.tokens.to(device=device, dtype=dtype),
            self.cu_seqlens.to(device=device),
            self.positions.to(device=device),
            self.grid_sizes,
        )


def grid_positions(size: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
    """(t, h, w) coordinates of a token grid in row-major order -> ``[t*h*w, 3]`` float."""
    t, h, w = size
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
