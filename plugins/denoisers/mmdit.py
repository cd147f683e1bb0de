"""MM-DiT: a diffusion transformer with joint text-video attention and separate weights per modality.

Follows Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3, 2024), Sec. 4:
video tokens and caption tokens keep two streams with their own adaLN-Zero modulation, QKV/output projections and
MLPs, but attend *jointly*: each sample's video and caption tokens are concatenated into one attention sequence, so
text reads the video as much as the video reads the text (no cross-attention). Both streams are modulated by the
timestep plus the pooled caption. As in SD3, the last block only provides the caption's keys and values (its caption
outputs would be unused, which would also leave parameters without gradients under DDP).

For packed, variable-size input the joint sequence of sample i is ``[video_i (L_i tokens), caption_i (its real
tokens only)]``: padding never enters attention and samples never mix. 3D RoPE rotates the video queries and keys;
caption tokens get no rotation (as in HunyuanVideo / Wan MM-DiT variants).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.activations import TanhGELU
from framework.layers.adaln import AdaLNZeroDenoiser, modulate, modulation, zero_linear
from framework.layers.attention import AttentionBackend, packed_self_attention
from framework.layers.packing import PackedSequence
from framework.layers.presets import TransformerSize
from framework.layers.rope import apply_rope


@dataclass(frozen=True)
class JointLayout:
    """Where each video and caption token sits in the joint per-sample attention sequence."""

    order: Tensor  # [N + M] index into cat([video [N], caption [M]]) of each joint position
    inverse: Tensor  # [N + M] joint position of each video, then caption, token
    joint: PackedSequence  # one sample per video sample, L_i + T_i tokens; tokens are an empty [N + M, 0] placeholder
    caption_sample_index: Tensor  # [M] sample of each caption token

    @staticmethod
    @torch.compiler.disable  # reads the pack's layout: eager under torch.compile (framework/training/compilation.py)
    def build(x: PackedSequence, context_mask: Tensor) -> JointLayout:
        device = x.tokens.device
        video_lengths = x.seqlens
        caption_lengths = context_mask.sum(1).tolist()  # [B] real caption tokens per sample
        n, m = x.tokens.shape[0], int(sum(caption_lengths))
        video_start = x.cu_seqlens.tolist()
        caption_start = [0]
        for length in caption_lengths:
            caption_start.append(caption_start[-1] + length)
        pieces = []
        for i, (lv, lc) in enumerate(zip(video_lengths, caption_lengths)):
            pieces.append(torch.arange(video_start[i], video_start[i] + lv, device=device))
            pieces.append(n + torch.arange(caption_start[i], caption_start[i] + lc, device=device))
        order = torch.cat(pieces)  # [N + M]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n + m, device=device)
        joint_lengths = [lv + lc for lv, lc in zip(video_lengths, caption_lengths)]
        joint = PackedSequence(
            x.tokens.new_empty(n + m, 0),
            torch.tensor([0, *joint_lengths], device=device).cumsum(0),
            torch.zeros(n + m, 3, device=device),
            tuple((1, 1, length) for length in joint_lengths),
        )
        caption_sample_index = torch.repeat_interleave(
            torch.arange(len(caption_lengths), device=device), torch.tensor(caption_lengths, device=device)
        )
        return JointLayout(order, inverse, joint, caption_sample_index)


class Stream(nn.Module):
    """One modality's weights in an MM-DiT block: adaLN, QKV with QK-RMSNorm, output projection and MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, attention_only: bool = False) -> None:
        super().__init__()
        self.num_heads, self.attention_only = num_heads, attention_only
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // num_heads, eps=1e-6)
        self.ada = modulation(width, 2 if attention_only else 6)
        if not attention_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            hidden = int(width * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), TanhGELU(), nn.Linear(hidden, width))

    def qkv_heads(self, x: Tensor, mod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` [n, W], ``mod`` [n, 2W or 6W] -> q, k, v each [n, H, Dh]."""
        shift, scale = mod[:, : 2 * x.shape[1]].chunk(2, dim=-1)  # each [n, W]
        q, k, v = self.qkv(modulate(self.norm1(x), shift, scale)).unflatten(-1, (3, self.num_heads, -1)).unbind(1)
        return self.q_norm(q), self.k_norm(k), v  # each [n, H, Dh]

    def update(self, x: Tensor, attended: Tensor, mod: Tensor) -> Tensor:
        """Residual updates after joint attention: ``attended`` [n, H, Dh] -> new ``x`` [n, W]."""
        _, _, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # each [n, W]
        x = x + gate_a * self.proj(attended.flatten(1))  # [n, W]
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # [n, W]


class MMDiTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, last: bool, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend
        self.video = Stream(width, num_heads, mlp_ratio)
        self.caption = Stream(width, num_heads, mlp_ratio, attention_only=last)

    def forward(self, x: Tensor, text: Tensor, c: Tensor, packed: PackedSequence, rope, layout: JointLayout):
        # x: [N, W] video tokens, text: [M, W] real caption tokens, c: [B, W] per-sample conditioning
        mod_x = packed.per_token(self.video.ada(c))  # [N, 6W]
        mod_t = self.caption.ada(c)[layout.caption_sample_index]  # [M, 6W or 2W]
        qx, kx, vx = self.video.qkv_heads(x, mod_x)  # each [N, H, Dh]
        qx, kx = apply_rope(qx, *rope), apply_rope(kx, *rope)
        qt, kt, vt = self.caption.qkv_heads(text, mod_t)  # each [M, H, Dh]
        q, k, v = (torch.cat([a, b])[layout.order] for a, b in ((qx, qt), (kx, kt), (vx, vt)))  # [N + M, H, Dh]
        out = packed_self_attention(q, k, v, layout.joint, self.backend)[layout.inverse]  # [N + M, H, Dh]
        x = self.video.update(x, out[: x.shape[0]], mod_x)  # [N, W]
        if not self.caption.attention_only:
            text = self.caption.update(text, out[x.shape[0]:], mod_t)  # [M, W]
        return x, text


class MMDiT(AdaLNZeroDenoiser):
    """SD3-style MM-DiT: joint text-video attention with separate per-modality weights, adaLN-Zero, 3D RoPE.

    Arguments as DiT's (``framework.layers.adaln.AdaLNZeroDenoiser``); ``micro_conditions`` modulates both
    streams."""

    def build_blocks(self, size: TransformerSize, mlp_ratio: float, attention: AttentionBackend) -> Iterable[nn.Module]:
        return (MMDiTBlock(size.width, size.num_heads, mlp_ratio, last=i == size.depth - 1, backend=attention)
                for i in range(size.depth))

    def context_embedding(self, io: DenoiserIO) -> nn.Module:
        return nn.Linear(io.context_dim, self.width)

    def initialize_blocks(self) -> None:
        for block in self.blocks:
            for stream in (block.video, block.caption):
                zero_linear(stream.ada[-1])

    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        self.check_bound()
        layout = JointLayout.build(x, cond.context_mask)
        h = self.embed(x.tokens)  # [N, W]
        text = self.context_embed(cond.context[cond.context_mask])  # [M, W] real caption tokens only
        c = self.conditioning_vector(timestep, cond)  # [B, W]
        rope = self.rope.angles(x.positions)  # cos, sin: [N, 1, Dh / 2]
        for block in self.blocks:
            h, text = self.run_block(block, h, text, c, x, rope, layout)  # [N, W], [M, W]
        return self.output(x, h, c)  # [N, token_dim]

    def flops_per_token(self, seqlen: int, context_len: int) -> float:
        """Forward FLOPs per video token of the blocks' video stream (projections, MLP, joint attention over
        ``seqlen + context_len`` keys); the caption stream is left out: it does not grow with the video."""
        w = self.width
        mlp_ratio = self.blocks[0].video.mlp[0].out_features / w
        linear = (4 + 2 * mlp_ratio) * w * w
        attention = 2 * w * (seqlen + context_len)
        return 2.0 * self.depth * (linear + attention)
