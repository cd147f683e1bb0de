"""DiT: a diffusion transformer with full spacetime attention over packed, variable-size samples.

Follows Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023): adaLN-Zero blocks whose scale, shift and
gate come from the timestep (here plus a pooled text vector), zero-initialised so each block starts as the identity.
Added for video and text: cross-attention to the caption tokens (PixArt-alpha style), 3D RoPE over (t, h, w), and
RMS-normalised queries and keys, which keep attention logits bounded at high learning rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.activations import TanhGELU
from framework.layers.adaln import AdaLNZeroDenoiser, modulate, modulation, zero_linear
from framework.layers.attention import AttentionBackend, packed_cross_attention, packed_self_attention
from framework.layers.packing import PackedSequence
from framework.layers.presets import TransformerSize
from framework.layers.rope import apply_rope


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // num_heads, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, packed: PackedSequence, rope: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(1)  # each [N, H, Dh]
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)  # [N, H, Dh]
        out = packed_self_attention(q, k, v, packed, self.backend)  # [N, H, Dh]
        return self.proj(out.flatten(1))  # [N, W]


class CrossAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.q_norm = nn.RMSNorm(width // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // num_heads, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Caption keys and values, each [B, L, H, Dh], from the embedded caption [B, L, W]."""
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(2)  # each [B, L, H, Dh]
        return self.k_norm(k), v

    def forward(self, x: Tensor, packed: PackedSequence, keys_values: tuple[Tensor, Tensor], context_mask: Tensor):
        q = self.q_norm(self.q(x).unflatten(-1, (self.num_heads, -1)))  # [N, H, Dh]
        out = packed_cross_attention(q, *keys_values, context_mask, packed, self.backend)  # [N, H, Dh]
        return self.proj(out.flatten(1))  # [N, W]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the caption, adaLN-Zero MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, num_heads, backend)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, num_heads, backend)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), TanhGELU(), nn.Linear(hidden, width))
        self.ada = modulation(width, 6)

    def forward(self, x: Tensor, c: Tensor, packed: PackedSequence, rope, context: Tensor | tuple[Tensor, Tensor],
                context_mask: Tensor):
        # c: [B, W] per-sample conditioning; modulation is computed per sample, then spread over its tokens.
        # context: the embedded caption [B, L, W], or its keys and values for this block (DiT.prepare)
        context_kv = context if isinstance(context, tuple) else self.cross.keys_values(context)
        mod = packed.per_token(self.ada(c))  # [N, 6W]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # each [N, W]
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), packed, rope)  # [N, W]
        x = x + self.cross(self.norm2(x), packed, context_kv, context_mask)  # [N, W]
        return x + gate_m * self.mlp(modulate(self.norm3(x), shift_m, scale_m))  # [N, W]


@dataclass(kw_only=True)
class PreparedConditioning(Conditioning):
    """A Conditioning plus what a DiT derives from it alone, computed once per sampling run (``DiT.prepare``) instead
    of at every step; valid only for the DiT (and weights) that prepared it."""

    pooled_embedding: Tensor  # [B, W] the pooled caption's share of the adaLN input
    context_kv: tuple[tuple[Tensor, Tensor], ...]  # per block: caption keys, values [B, L, H, Dh]


class DiT(AdaLNZeroDenoiser):
    """Full spacetime-attention diffusion transformer (adaLN-Zero, text cross-attention, 3D RoPE).

    Arguments (``framework.layers.adaln.AdaLNZeroDenoiser``): ``preset`` S/B/L/XL or ``width``, ``depth``,
    ``num_heads``; ``mlp_ratio``; ``attention`` backend; ``gradient_checkpointing``; ``micro_conditions``."""

    def build_blocks(self, size: TransformerSize, mlp_ratio: float, attention: AttentionBackend) -> Iterable[nn.Module]:
        return (DiTBlock(size.width, size.num_heads, mlp_ratio, attention) for _ in range(size.depth))

    def context_embedding(self, io: DenoiserIO) -> nn.Module:
        return nn.Sequential(nn.Linear(io.context_dim, self.width), TanhGELU(), nn.Linear(self.width, self.width))

    def initialize_blocks(self) -> None:
        for block in self.blocks:
            zero_linear(block.ada[-1])
            # Zero cross-attention output too (as PixArt-alpha does): caption features then enter the residual
            # stream only as far as they help, instead of as random noise at step 0.
            nn.init.zeros_(block.cross.proj.weight)

    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        self.check_bound()
        h = self.embed(x.tokens)  # [N, W]
        c = self.conditioning_vector(timestep, cond)  # [B, W]
        rope = self.rope.angles(x.positions)  # cos, sin: [N, 1, Dh / 2]
        for block, context in zip(self.blocks, self.block_contexts(cond)):
            h = self.run_block(block, h, c, x, rope, context, cond.context_mask)  # [N, W]
        return self.output(x, h, c)  # [N, token_dim]

    def pooled_embedding(self, cond: Conditioning) -> Tensor:
        """The pooled caption's share of the adaLN input [B, W] (prepared, or computed now)."""
        if isinstance(cond, PreparedConditioning):
            return cond.pooled_embedding
        return self.pooled_embed(cond.pooled)

    def block_contexts(self, cond: Conditioning) -> tuple[Tensor | tuple[Tensor, Tensor], ...]:
        """Per block, its caption keys and values when prepared; else the embedded caption [B, L, W], from which each
        block computes them in its own forward (where FSDP has gathered that block's weights)."""
        if isinstance(cond, PreparedConditioning):
            return cond.context_kv
        return (self.context_embed(cond.context),) * len(self.blocks)

    def prepare(self, cond: Conditioning) -> PreparedConditioning:
        """The pooled-caption embedding and every block's caption keys and values (unchanged if already prepared)."""
        if isinstance(cond, PreparedConditioning):
            return cond
        context = self.context_embed(cond.context)  # [B, L, W]
        return PreparedConditioning(
            context=cond.context, context_mask=cond.context_mask, pooled=cond.pooled,
            micro_conditions=cond.micro_conditions, pooled_embedding=self.pooled_embed(cond.pooled),
            context_kv=tuple(block.cross.keys_values(context) for block in self.blocks))

    def flops_per_token(self, seqlen: int, context_len: int) -> float:
        """Forward FLOPs per video token (2 per multiply-add) of the blocks: projections, MLP and attention.

        The caption's key/value projections and embedders are left out: they do not grow with the video."""
        w = self.width
        mlp_ratio = self.blocks[0].mlp[0].out_features / w
        linear = (4 + 2 + 2 * mlp_ratio) * w * w  # qkv + out, cross q + out, MLP in + out (multiply-adds)
        attention = 2 * w * (seqlen + context_len)  # scores and weighted values, self and cross
        return 2.0 * self.depth * (linear + attention)
