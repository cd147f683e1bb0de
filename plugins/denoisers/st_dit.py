"""ST-DiT: a diffusion transformer with factorised spatial and temporal attention over packed, variable-size samples.

Follows Latte (Ma et al., "Latte: Latent Diffusion Transformer for Video Generation", 2024, variant 1) and
Open-Sora's ST-DiT: blocks alternate between spatial self-attention (each frame's tokens attend within that frame)
and temporal self-attention (each spatial location's tokens attend across the frames). A token then reaches the whole
clip through two hops, at a cost of ``O(t (hw)^2 + hw t^2)`` instead of full attention's ``O((t hw)^2)``.

Everything else is DiT's (``plugins/denoisers/dit.py``): adaLN-Zero modulation from timestep + pooled caption, text
cross-attention, 3D RoPE, QK-RMSNorm, zero-initialised output. Factorising only changes *which tokens attend to which*:
the packed sequence is split into one group per (sample, frame) or per (sample, row, column), read from
``PackedSequence.positions`` and ``grid_sizes``; groups of equal length are gathered into one ``[G, L]`` batch and
attended with one SDPA call, so samples never mix and mixed sizes cost a handful of calls, not one per group.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.core.interfaces import Conditioning
from framework.layers.adaln import modulate
from framework.layers.attention import AttentionBackend
from framework.layers.packing import PackedSequence
from framework.layers.presets import TransformerSize
from framework.layers.rope import apply_rope
from plugins.denoisers.dit import DiT, DiTBlock


class AttentionAxis(str, enum.Enum):
    SPATIAL = "spatial"  # one group per (sample, frame): h * w tokens
    TEMPORAL = "temporal"  # one group per (sample, row, column): t tokens


@dataclass(frozen=True)
class GroupedLayout:
    """Attention groups of a packed sequence, bucketed by group length so each bucket is one batched SDPA call."""

    buckets: tuple[Tensor, ...]  # per distinct group length L: [G_L, L] packed token indices, one row per group

    @staticmethod
    @torch.compiler.disable  # reads the pack's layout: eager under torch.compile (framework/training/compilation.py)
    def build(x: PackedSequence, axis: AttentionAxis) -> GroupedLayout:
        """The groups of ``x``'s layout, built once per layout (a sampling run reuses them at every step)."""
        return x.layout_cached(("GroupedLayout", axis), lambda: GroupedLayout._build(x, axis))

    @staticmethod
    def _build(x: PackedSequence, axis: AttentionAxis) -> GroupedLayout:
        t, h, w = x.positions.round().long().unbind(1)  # each [N]
        sample = x.sample_index  # [N]
        max_t, max_h, max_w = (max(s[i] for s in x.grid_sizes) for i in range(3))
        if axis is AttentionAxis.SPATIAL:
            group = sample * max_t + t  # [N] one id per (sample, frame)
            key = (group * max_h + h) * max_w + w  # [N] sorts by group, then row, column
            lengths = [gh * gw for gt, gh, gw in x.grid_sizes for _ in range(gt)]
        else:
            group = (sample * max_h + h) * max_w + w  # [N] one id per (sample, row, column)
            key = group * max_t + t  # [N] sorts by group, then frame
            lengths = [gt for gt, gh, gw in x.grid_sizes for _ in range(gh * gw)]
        order = torch.argsort(key)  # [N] packed index of each token, groups contiguous
        device = order.device
        sizes = torch.tensor(lengths, device=device)  # [G]
        _, counts = torch.unique_consecutive(group[order], return_counts=True)  # [G] tokens found per group
        if counts.shape != sizes.shape or not torch.equal(counts, sizes):
            raise ValueError(
                f"STDiT: token positions do not form the (t, h, w) grids {x.grid_sizes}; positions must be "
                "integer grid indices as built by PackedSequence.from_grids"
            )
        starts = sizes.cumsum(0) - sizes  # [G] first grouped position of each group
        buckets = []
        for length in sorted(set(lengths)):
            first = starts[sizes == length]  # [G_L]
            buckets.append(order[first[:, None] + torch.arange(length, device=device)])  # [G_L, L]
        return GroupedLayout(tuple(buckets))

    @torch.compiler.disable  # loops over the layout's buckets: eager under torch.compile
    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention within each group: ``q, k, v`` [N, H, Dh] in packed order -> [N, H, Dh]."""
        out = torch.empty_like(v)
        for index in self.buckets:  # [G, L]
            qg, kg, vg = (a[index].transpose(1, 2) for a in (q, k, v))  # each [G, H, L, Dh]
            out[index] = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2)  # [G, L, H, Dh]
        return out


class FactorisedBlock(DiTBlock):
    """A DiT block whose self-attention runs within spatial or temporal groups (cross-attention stays per sample)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, axis: AttentionAxis,
                 backend: AttentionBackend) -> None:
        super().__init__(width, num_heads, mlp_ratio, backend)
        self.axis = axis

    def grouped_self_attention(self, x: Tensor, rope: tuple[Tensor, Tensor], layout: GroupedLayout) -> Tensor:
        """DiT's self-attention (same weights: QKV, QK-RMSNorm, RoPE, output) restricted to the layout's groups."""
        attn = self.attn
        q, k, v = attn.qkv(x).unflatten(-1, (3, attn.num_heads, -1)).unbind(1)  # each [N, H, Dh]
        q, k = apply_rope(attn.q_norm(q), *rope), apply_rope(attn.k_norm(k), *rope)  # [N, H, Dh]
        return attn.proj(layout.attention(q, k, v).flatten(1))  # [N, W]

    def forward(self, x: Tensor, c: Tensor, packed: PackedSequence, rope, context: Tensor | tuple[Tensor, Tensor],
                context_mask: Tensor, layout: GroupedLayout) -> Tensor:
        context_kv = context if isinstance(context, tuple) else self.cross.keys_values(context)  # as in DiTBlock
        mod = packed.per_token(self.ada(c))  # [N, 6W]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # each [N, W]
        x = x + gate_a * self.grouped_self_attention(modulate(self.norm1(x), shift_a, scale_a), rope, layout)
        x = x + self.cross(self.norm2(x), packed, context_kv, context_mask)  # [N, W]
        return x + gate_m * self.mlp(modulate(self.norm3(x), shift_m, scale_m))  # [N, W]


class STDiT(DiT):
    """Factorised spatial/temporal DiT (Latte / ST-DiT): blocks alternate per-frame and per-location attention.

    adaLN-Zero, text cross-attention and 3D RoPE as in DiT, with DiT's arguments; ``depth`` counts all blocks: even
    blocks attend spatially, odd ones temporally."""

    def build_blocks(self, size: TransformerSize, mlp_ratio: float, attention: AttentionBackend) -> Iterable[nn.Module]:
        axes = [AttentionAxis.SPATIAL, AttentionAxis.TEMPORAL]
        return (FactorisedBlock(size.width, size.num_heads, mlp_ratio, axes[i % 2], attention)
                for i in range(size.depth))

    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        self.check_bound()
        layouts = {axis: GroupedLayout.build(x, axis) for axis in AttentionAxis}
        h = self.embed(x.tokens)  # [N, W]
        c = self.conditioning_vector(timestep, cond)  # [B, W]
        rope = self.rope.angles(x.positions)  # cos, sin: [N, 1, Dh / 2]
        for block, context in zip(self.blocks, self.block_contexts(cond)):
            h = self.run_block(block, h, c, x, rope, context, cond.context_mask, layouts[block.axis])  # [N, W]
        return self.output(x, h, c)  # [N, token_dim]

    def flops_per_token(self, seqlen: int, context_len: int, frames: int = 1) -> float:
        """Forward FLOPs per video token of the blocks for a clip of ``seqlen`` tokens over ``frames`` latent frames:
        half the blocks attend over ``seqlen / frames`` tokens, the other half over ``frames``."""
        w = self.width
        mlp_ratio = self.blocks[0].mlp[0].out_features / w
        linear = (4 + 2 + 2 * mlp_ratio) * w * w
        spatial, temporal = (self.depth + 1) // 2, self.depth // 2
        attention = 2 * w * (spatial * seqlen / frames + temporal * frames + self.depth * context_len)
        return 2.0 * (self.depth * linear + attention)
