"""Attention over packed sequences that never mixes samples.

One call, several kernels, all computing the same block-diagonal attention:

* ``dense``     every sample has the same length: view the pack as ``[B, L]`` and run one SDPA call (fastest on CPU);
* ``sdpa_loop`` one SDPA call per sample: exact FLOP parity with the unpacked batch, works everywhere, has backward;
* ``xformers``  ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (CUDA only: xformers has no CPU kernel);
* ``flex``      FlexAttention with a document mask (measured with torch 2.13: no backward on CPU, so CPU inference only).

``AttentionBackend.AUTO`` picks ``dense`` for uniform packs, ``xformers`` on CUDA when installed, else ``sdpa_loop``.
Padding to the longest sample or a dense block mask was measured at 3.4-3.6x the FLOPs on CPU, so neither is offered.
"""

from __future__ import annotations

import enum
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.layers.packing import PackedSequence


class AttentionBackend(str, enum.Enum):
    AUTO = "auto"
    DENSE = "dense"
    SDPA_LOOP = "sdpa_loop"
    XFORMERS = "xformers"
    FLEX = "flex"


@functools.cache
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # xformers may be installed but built for another torch: treat as absent
        return False
    return True


def resolve_backend(backend: AttentionBackend, packed: PackedSequence, device: torch.device) -> AttentionBackend:
    if backend is not AttentionBackend.AUTO:
        if backend is AttentionBackend.DENSE and not packed.is_uniform:
            raise ValueError(f"attention backend 'dense' needs equal-length samples, got lengths {packed.seqlens}")
        if backend is AttentionBackend.XFORMERS and (device.type != "cuda" or not xformers_available()):
            raise RuntimeError("attention backend 'xformers' needs a CUDA device and an importable xformers")
        return backend
    if packed.is_uniform:
        return AttentionBackend.DENSE
    if device.type == "cuda" and xformers_available():
        return AttentionBackend.XFORMERS
    return AttentionBackend.SDPA_LOOP


def packed_self_attention(
    q: Tensor, k: Tensor, v: Tensor, packed: PackedSequence, backend: AttentionBackend = AttentionBackend.AUTO
) -> Tensor:
    """Block-diagonal self-attention. ``q, k, v``: [N, heads, head_dim] -> [N, heads, head_dim].

    The dense path takes its sizes from tensor shapes, so torch.compile traces it for any uniform layout; the others
    loop over the layout and run eagerly under torch.compile (framework/training/compilation.py)."""
    backend = resolve_backend(backend, packed, q.device)
    if backend is AttentionBackend.DENSE:
        b = packed.cu_seqlens.shape[0] - 1
        q, k, v = (x.unflatten(0, (b, -1)).transpose(1, 2) for x in (q, k, v))  # [B, H, L, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, Dh]
        return out.transpose(1, 2).flatten(0, 1)  # [N, H, Dh]
    return _packed_self_attention_loop(q, k, v, packed, backend)


@torch.compiler.disable
def _packed_self_attention_loop(
    q: Tensor, k: Tensor, v: Tensor, packed: PackedSequence, backend: AttentionBackend
) -> Tensor:
    if backend is AttentionBackend.SDPA_LOOP:
        out = [_sdpa(qi, ki, vi) for qi, ki, vi in zip(packed.split(q), packed.split(k), packed.split(v))]  # [L_i, H, Dh]
        return torch.cat(out)
    if backend is AttentionBackend.XFORMERS:
        from xformers.ops import fmha

        bias = fmha.BlockDiagonalMask.from_seqlens(list(packed.seqlens))
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]  # [N, H, Dh]
    if backend is AttentionBackend.FLEX:
        return _flex_self_attention(q, k, v, packed)
    raise AssertionError(backend)


def _flex_self_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedSequence) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = packed.sample_index  # [N]

    def same_sample(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    n = q.shape[0]
    mask = create_block_mask(same_sample, B=None, H=None, Q_LEN=n, KV_LEN=n, device=q.device)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, N, Dh]
    return flex_attention(q, k, v, block_mask=mask)[0].transpose(0, 1)  # [N, H, Dh]


def packed_cross_attention(
    q: Tensor, k: Tensor, v: Tensor, context_mask: Tensor, packed: PackedSequence,
    backend: AttentionBackend = AttentionBackend.AUTO,
) -> Tensor:
    """Each sample's video tokens attend to its own text tokens.

    ``q``: [N, H, Dh] packed video tokens; ``k, v``: [B, L, H, Dh] per-sample context; ``context_mask``: [B, L] bool,
    True where a context token is real. Returns [N, H, Dh].
    """
    backend = resolve_backend(backend, packed, q.device)
    if backend is AttentionBackend.DENSE:  # sizes from shapes: traced by torch.compile for any uniform layout
        qb = q.unflatten(0, (k.shape[0], -1)).transpose(1, 2)  # [B, H, Lq, Dh]
        out = F.scaled_dot_product_attention(
            qb, k.transpose(1, 2), v.transpose(1, 2), attn_mask=context_mask[:, None, None, :]
        )  # [B, H, Lq, Dh]
        return out.transpose(1, 2).flatten(0, 1)  # [N, H, Dh]
    return _packed_cross_attention_loop(q, k, v, context_mask, packed, backend)


@torch.compiler.disable  # loops over the pack's layout: eager under torch.compile (framework/training/compilation.py)
def _packed_cross_attention_loop(
    q: Tensor, k: Tensor, v: Tensor, context_mask: Tensor, packed: PackedSequence, backend: AttentionBackend
) -> Tensor:
    if backend is AttentionBackend.XFORMERS:
        from xformers.ops import fmha

        kv_lens = context_mask.sum(1).tolist()
        bias = fmha.BlockDiagonalMask.from_seqlens(list(packed.seqlens), kv_lens)
        kc, vc = k[context_mask][None], v[context_mask][None]  # [1, sum(kv_lens), H, Dh]
        return fmha.memory_efficient_attention(q[None], kc, vc, attn_bias=bias)[0]
    # sdpa_loop and flex: the context is short, so a per-sample loop over the valid keys is cheap and exact
    # (unbind, not k[i]: indexing one sample's keys would zero-fill a [B, L, H, Dh] gradient per sample)
    out = []
    for qi, ki, vi, keep in zip(packed.split(q), k.unbind(0), v.unbind(0), context_mask.unbind(0)):
        out.append(_sdpa(qi, ki[keep], vi[keep]))  # [L_i, H, Dh]
    return torch.cat(out)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One sample's attention: ``[Lq, H, Dh]``, ``[Lk, H, Dh]`` x2 -> ``[Lq, H, Dh]``.

    Called with a batch dimension of 1: on CPU (torch 2.13) 3-D inputs fall back to the unfused math kernel, measured
    3x slower (forward + backward, 1152 tokens, 4 heads of 64) than the fused kernel that 4-D inputs get."""
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, L, Dh]
    return F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)  # [Lq, H, Dh]
