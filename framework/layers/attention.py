"""Attention over packed sequences that never mixes samples.

One call, several kernels, all computing the same block-diagonal attention:

* ``dense``     every sample has the same length: view the pack as ``[B, L]`` and run one SDPA call (fastest on CPU);
* ``sdpa_loop`` one SDPA call per sample: exact FLOP parity with the unpacked batch, works everywhere, has backward;
* ``xformers``  ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (CUDA only: xformers has no CPU kernel);
* ``flex``      FlexAttention with a document mask, through ``torch.compile`` (unfused otherwise), its block mask built
                once per pack layout (cached by ``cu_seqlens``) instead of per call. torch 2.13 has no FlexAttention
                backward on CPU: there it is inference only, and asking for a gradient raises.

``AttentionBackend.AUTO`` picks only kernels that have run on the device at hand. ``dense`` for uniform packs and
``sdpa_loop`` otherwise are torch's own SDPA, run by the CPU suite. On CUDA, ``xformers`` or ``flex`` are picked only
when a record in ``verified_backends.json`` (``benchmarks/results/``, or the file ``KINETOSCOPE_VERIFIED_BACKENDS``
names) says that they passed the equality tests (``tests/test_cuda.py``, run by ``benchmarks/gpu_check.sh``) on a
device of the same name with the same torch and xformers versions; with no such record, ``sdpa_loop``.
Padding to the longest sample or a dense block mask was measured at 3.4-3.6x the FLOPs on CPU, so neither is offered.
"""

from __future__ import annotations

import enum
import functools
import json
import os
from collections import OrderedDict
from pathlib import Path

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


VERIFIED_BACKENDS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "verified_backends.json"


def verified_backends_file() -> Path:
    return Path(os.environ.get("KINETOSCOPE_VERIFIED_BACKENDS", VERIFIED_BACKENDS_FILE))


def device_signature(device: torch.device) -> dict[str, str | None]:
    """What a verification holds for: the device's name and the torch and xformers builds that ran on it."""
    try:
        from importlib.metadata import version

        xformers_version = version("xformers") if xformers_available() else None
    except Exception:  # metadata missing: an xformers we cannot name is not a verified one
        xformers_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device_name": name, "torch": torch.__version__, "xformers": xformers_version}


def verified_backends(device: torch.device, path: Path | None = None) -> frozenset[AttentionBackend]:
    """Backends recorded as verified on a device like ``device`` (same name, torch and, for xformers, xformers).

    The file holds ``{"records": [{"device_name", "torch", "xformers", "backends": [...], ...}]}``; see
    ``benchmarks/record_verified_backends.py``, which writes it from the CUDA tests' results."""
    path = path or verified_backends_file()
    records = _read_records(path)
    here = device_signature(device)
    found: set[AttentionBackend] = set()
    for record in records:
        if record.get("device_name") != here["device_name"] or record.get("torch") != here["torch"]:
            continue
        for name in record.get("backends", []):
            try:
                backend = AttentionBackend(name)
            except ValueError:
                raise ValueError(f"{path}: unknown attention backend {name!r} (known: "
                                 f"{[b.value for b in AttentionBackend if b is not AttentionBackend.AUTO]})") from None
            if backend is AttentionBackend.XFORMERS and record.get("xformers") != here["xformers"]:
                continue  # verified with another xformers build
            found.add(backend)
    return frozenset(found)


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["records"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a verified-backends file ({{'records': [...]}}): {err}") from err


def record_verified_backends(
    backends: set[AttentionBackend], device: torch.device, evidence: str, path: Path | None = None
) -> dict:
    """Record that ``backends`` passed their equality tests on ``device``; replaces an earlier record of the same
    device, torch and xformers. Returns the record."""
    path = path or verified_backends_file()
    records = _read_records(path)
    here = device_signature(device)
    record = {**here, "backends": sorted(b.value for b in backends), "verified_by": evidence}
    records = [r for r in records if {k: r.get(k) for k in here} != here] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"records": records}, indent=2) + "\n")
    return record


def resolve_backend(backend: AttentionBackend, packed: PackedSequence, device: torch.device) -> AttentionBackend:
    if backend is not AttentionBackend.AUTO:
        if backend is AttentionBackend.DENSE and not packed.is_uniform:
            raise ValueError(f"attention backend 'dense' needs equal-length samples, got lengths {packed.seqlens}")
        if backend is AttentionBackend.XFORMERS and (device.type != "cuda" or not xformers_available()):
            raise RuntimeError("attention backend 'xformers' needs a CUDA device and an importable xformers")
        return backend
    if packed.is_uniform:
        return AttentionBackend.DENSE
    if device.type == "cuda":
        return _auto_cuda_backend(device)
    return AttentionBackend.SDPA_LOOP


@functools.cache
def _auto_cuda_backend(device: torch.device) -> AttentionBackend:
    """AUTO's kernel for mixed-length packs on this GPU; the record is read once per device and process."""
    return choose_mixed_length_backend(verified_backends(device), xformers_available())


def choose_mixed_length_backend(verified: frozenset[AttentionBackend], xformers_importable: bool) -> AttentionBackend:
    """The fastest verified kernel for a mixed-length pack on a GPU: xformers, then FlexAttention, else SDPA per
    sample, which is torch's own kernel and the reference every other one is tested against."""
    if AttentionBackend.XFORMERS in verified and xformers_importable:
        return AttentionBackend.XFORMERS
    if AttentionBackend.FLEX in verified:
        return AttentionBackend.FLEX
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


@functools.cache
def _compiled_flex_attention(device_type: str):
    """FlexAttention through torch.compile, built once per device type: eager FlexAttention materialises the full
    score matrix. On CPU with static shapes: with torch 2.13 the CPU FlexAttention template fails to build (a C++
    compile error) once a second pack length makes torch.compile trace it with symbolic sizes, so each pack length
    there compiles its own kernel (seconds each; up to torch's recompile limit, then eager)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


# Block masks by (cu_seqlens, device): a denoiser calls attention once per layer and per sampling step on the same pack,
# and building a mask (vmap over the mask function) costs more than the attention on small packs.
_FLEX_MASKS: OrderedDict[tuple[tuple[int, ...], str], object] = OrderedDict()
_FLEX_MASKS_KEPT = 32


def flex_block_mask(packed: PackedSequence, device: torch.device):
    """The document mask of ``packed`` (a token attends only to tokens of its own sample), cached by layout."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (tuple(packed.cu_seqlens.tolist()), str(device))
    if key in _FLEX_MASKS:
        _FLEX_MASKS.move_to_end(key)
        return _FLEX_MASKS[key]
    doc = packed.sample_index.to(device)  # [N]

    def same_sample(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    n = key[0][-1]
    _FLEX_MASKS[key] = mask = create_block_mask(same_sample, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
    if len(_FLEX_MASKS) > _FLEX_MASKS_KEPT:
        _FLEX_MASKS.popitem(last=False)
    return mask


def _flex_self_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedSequence) -> Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise NotImplementedError(
            f"attention backend 'flex': torch {torch.__version__} has no FlexAttention backward on CPU; "
            "train on CPU with 'sdpa_loop' (or 'auto'), use 'flex' there for inference only")
    if not torch.is_grad_enabled():  # torch refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    mask = flex_block_mask(packed, q.device)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, N, Dh]
    return _compiled_flex_attention(q.device.type)(q, k, v, block_mask=mask)[0].transpose(0, 1)  # [N, H, Dh]


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
