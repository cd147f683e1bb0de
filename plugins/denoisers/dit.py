"""DiT: a diffusion transformer with full spacetime attention over packed, variable-size samples.

Follows Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023): adaLN-Zero blocks whose scale, shift and
gate come from the timestep (here plus a pooled text vector), zero-initialised so each block starts as the identity.
Added for video and text: cross-attention to the caption tokens (PixArt-alpha style), 3D RoPE over (t, h, w), and
RMS-normalised queries and keys, which keep attention logits bounded at high learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from framework.layers.activations import TanhGELU
from framework.layers.attention import AttentionBackend, packed_cross_attention, packed_self_attention
from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO
from framework.core.micro_conditions import MicroCondition, MicroConditionEmbedder, sinusoidal_features
from framework.layers.packing import PackedSequence
from framework.layers.rope import Rope3D, apply_rope
from plugins.denoisers.presets import Preset, resolve_size


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``t`` [B] in [0, 1] (scaled by 1000 as in DDPM-era models) -> [B, dim]."""
    return sinusoidal_features(1000.0 * t.float(), dim, max_period)  # [B, dim]


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
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

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


class DiT(Denoiser):
    """Full spacetime-attention diffusion transformer (adaLN-Zero, text cross-attention, 3D RoPE)."""

    def __init__(
        self,
        preset: Preset | None = None,
        width: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        attention: AttentionBackend = AttentionBackend.AUTO,
        gradient_checkpointing: bool = False,
        micro_conditions: list[MicroCondition] | None = None,
    ) -> None:
        """``preset`` (S, B, L, XL: DiT's sizes) sets width, depth and heads; any of them given explicitly overrides
        it, and with neither the size is S (384 wide, 12 deep, 6 heads). ``micro_conditions`` (e.g. ``[FPS,
        ORIGINAL_HEIGHT, ORIGINAL_WIDTH]``) conditions every block on those per-sample scalars
        (``framework/core/micro_conditions.py``)."""
        super().__init__()
        size = resolve_size("DiT", preset, width, depth, num_heads)
        width, depth, num_heads = size.width, size.depth, size.num_heads
        self.width, self.depth, self.num_heads = width, depth, num_heads
        self.gradient_checkpointing = gradient_checkpointing
        self.rope = Rope3D(width // num_heads)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio, attention) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.micro_conditions = tuple(micro_conditions or ())
        self.micro_embed = MicroConditionEmbedder(self.micro_conditions, width) if self.micro_conditions else None
        self.io: DenoiserIO | None = None

    def bind(self, io: DenoiserIO) -> None:
        self.io = io
        self.embed = nn.Linear(io.token_dim, self.width)
        self.context_embed = nn.Sequential(nn.Linear(io.context_dim, self.width), TanhGELU(),
                                           nn.Linear(self.width, self.width))
        self.pooled_embed = nn.Sequential(nn.Linear(io.pooled_dim, self.width), nn.SiLU(),
                                          nn.Linear(self.width, self.width))
        self.head = nn.Linear(self.width, io.token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for linear layers; zero for every adaLN projection and the output head, as in DiT, so each block
        starts as the identity and the untrained model predicts zero, which keeps early training stable."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
            # Zero cross-attention output too (as PixArt-alpha does): caption features then enter the residual
            # stream only as far as they help, instead of as random noise at step 0.
            nn.init.zeros_(block.cross.proj.weight)
        # The pooled caption enters the same vector as the timestep. LayerNorm-ed text features are ~30x larger
        # than the timestep embedding at init and would act as large per-sample noise on every block's
        # modulation; starting this path at zero lets it grow only as far as the caption helps.
        for layer in (self.pooled_embed[-1], self.final_ada[-1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.micro_embed is not None:  # zero output: micro-conditions start without effect
            self.micro_embed.initialize_weights()

    def conditioning_vector(self, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The per-sample vector every adaLN modulation reads: timestep + pooled caption (+ micro-conditions)."""
        c = self.time_embed(timestep_embedding(timestep, 256)) + self.pooled_embedding(cond)  # [B, W]
        if self.micro_embed is not None:
            c = c + self.micro_embed(cond.micro_conditions)  # [B, W]
        return c

    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        if self.io is None:
            raise RuntimeError("DiT.bind(DenoiserIO) must be called before forward (VideoDiffusion does this)")
        h = self.embed(x.tokens)  # [N, W]
        c = self.conditioning_vector(timestep, cond)  # [B, W]
        rope = self.rope.angles(x.positions)  # cos, sin: [N, 1, Dh / 2]
        for block, context in zip(self.blocks, self.block_contexts(cond)):
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, c, x, rope, context, cond.context_mask, use_reentrant=False)
            else:
                h = block(h, c, x, rope, context, cond.context_mask)  # [N, W]
        shift, scale = x.per_token(self.final_ada(c)).chunk(2, dim=-1)  # each [N, W]
        return x.with_tokens(self.head(modulate(self.final_norm(h), shift, scale)))  # [N, token_dim]

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
