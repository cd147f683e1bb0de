"""Packed attention never mixes samples and equals per-sample softmax attention, for every kernel; the DiT and the
text conditioner built on it give the same per-sample results however a batch is composed."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from framework.layers import attention
from framework.layers.attention import (
    AttentionBackend,
    choose_mixed_length_backend,
    device_signature,
    flex_block_mask,
    packed_cross_attention,
    packed_self_attention,
    resolve_backend,
    verified_backends,
    xformers_available,
)
from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.packing import PackedSequence
from plugins.conditioners.hashed_text import HashedTextConditioner, HashingTokenizer
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher

HEADS, HEAD_DIM = 2, 8
CPU = torch.device("cpu")


def pack_of(sizes: list[tuple[int, int, int]], dim: int = 1) -> PackedSequence:
    return PackedSequence.from_grids([torch.zeros(*s, dim) for s in sizes])


MIXED = pack_of([(1, 2, 3), (2, 3, 3), (1, 1, 1), (1, 1, 5)])  # lengths 6, 18, 1, 5
UNIFORM = pack_of([(1, 2, 3), (3, 2, 1), (2, 3, 1)])  # lengths 6, 6, 6


def qkv(packed: PackedSequence, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = packed.tokens.shape[0]
    return tuple(torch.randn(n, HEADS, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for one sample, [L, H, Dh] each, in float64."""
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))  # [H, L, Dh]
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(0, 1)  # [Lq, H, Dh]


def reference_self_attention(q, k, v, packed):
    return torch.cat([reference_attention(*parts) for parts in zip(packed.split(q), packed.split(k), packed.split(v))])


def run_backend(backend, *args, fn=packed_self_attention):
    """Forward of one backend (FlexAttention has no CPU backward, so every forward here runs without gradients)."""
    with torch.no_grad():
        return fn(*args, backend=backend)


SELF_CASES = [
    pytest.param(AttentionBackend.DENSE, UNIFORM, id="dense-uniform"),
    pytest.param(AttentionBackend.SDPA_LOOP, MIXED, id="sdpa_loop-mixed"),
    pytest.param(AttentionBackend.SDPA_LOOP, UNIFORM, id="sdpa_loop-uniform"),
    pytest.param(AttentionBackend.FLEX, MIXED, id="flex-mixed"),
    pytest.param(AttentionBackend.AUTO, MIXED, id="auto-mixed"),
    pytest.param(AttentionBackend.AUTO, UNIFORM, id="auto-uniform"),
]


# ------------------------------------------------------------------------------------------------ self-attention
@pytest.mark.parametrize("backend, packed", SELF_CASES)
def test_self_attention_matches_per_sample_reference(backend, packed):
    q, k, v = qkv(packed)
    with torch.no_grad():
        out = run_backend(backend, q, k, v, packed)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference_self_attention(q, k, v, packed), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "backend, packed",
    [pytest.param(AttentionBackend.SDPA_LOOP, MIXED, id="sdpa_loop"), pytest.param(AttentionBackend.DENSE, UNIFORM, id="dense")],
)
def test_self_attention_gradients_match_reference(backend, packed):
    q, k, v = (x.double().requires_grad_() for x in qkv(packed, seed=1))
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((packed_self_attention(q, k, v, packed, backend) * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((reference_self_attention(q, k, v, packed) * weight).sum(), (q, k, v))
    for name, got, expected in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")
    assert all(g.abs().max() > 1e-3 for g in grads)


@pytest.mark.parametrize(
    "backend, packed",
    [
        pytest.param(AttentionBackend.DENSE, UNIFORM, id="dense"),
        pytest.param(AttentionBackend.SDPA_LOOP, MIXED, id="sdpa_loop"),
        pytest.param(AttentionBackend.FLEX, MIXED, id="flex"),
        pytest.param(AttentionBackend.XFORMERS, MIXED, id="xformers"),
    ],
)
def test_no_attention_across_sample_boundaries(backend, packed):
    q, k, v = qkv(packed, seed=3)
    if backend is AttentionBackend.XFORMERS:
        if not (torch.cuda.is_available() and xformers_available()):
            pytest.skip("xformers needs CUDA and an importable xformers (resolve_backend raising on CPU is tested)")
        q, k, v, packed = q.cuda(), k.cuda(), v.cuda(), packed.to("cuda")
    before = run_backend(backend, q, k, v, packed)
    # replace sample 1's keys and values by very different (large) values
    lo, hi = packed.cu_seqlens[1].item(), packed.cu_seqlens[2].item()
    k2, v2 = k.clone(), v.clone()
    k2[lo:hi] = 50.0 * torch.randn_like(k2[lo:hi])
    v2[lo:hi] = 1000.0 + torch.randn_like(v2[lo:hi])
    after = run_backend(backend, q, k2, v2, packed)
    changed = [not torch.equal(a, b) for a, b in zip(packed.split(before), packed.split(after))]
    assert changed[1], "sample 1's own output must change (otherwise this test proves nothing)"
    assert not any(changed[:1] + changed[2:]), f"samples other than 1 changed: {changed}"


# ----------------------------------------------------------------------------------------------- cross-attention
def context_for(batch: int, length: int = 7, seed: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, length, HEADS, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, length, HEADS, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
    valid = [length, 1, 4, 3, 5][:batch]  # every row keeps at least one real token
    mask = torch.arange(length)[None] < torch.tensor(valid)[:, None]  # [B, L] bool
    return k, v, mask


def reference_cross_attention(q, k, v, mask, packed):
    return torch.cat([reference_attention(qi, k[i, mask[i]], v[i, mask[i]]) for i, qi in enumerate(packed.split(q))])


CROSS_CASES = [
    pytest.param(AttentionBackend.DENSE, UNIFORM, id="dense-uniform"),
    pytest.param(AttentionBackend.SDPA_LOOP, MIXED, id="sdpa_loop-mixed"),
    pytest.param(AttentionBackend.SDPA_LOOP, UNIFORM, id="sdpa_loop-uniform"),
    pytest.param(AttentionBackend.FLEX, MIXED, id="flex-mixed"),
]


@pytest.mark.parametrize("backend, packed", CROSS_CASES)
def test_cross_attention_matches_reference_and_ignores_masked_context(backend, packed):
    q = qkv(packed, seed=5)[0]
    k, v, mask = context_for(packed.num_samples)
    out = run_backend(backend, q, k, v, mask, packed, fn=packed_cross_attention)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_cross_attention(q, k, v, mask, packed), rtol=0, atol=1e-5)

    # masked-out context tokens may hold anything (padding, garbage): the output must not change
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 30.0 * torch.randn_like(k2[~mask])
    v2[~mask] = 1e4
    out2 = run_backend(backend, q, k2, v2, mask, packed, fn=packed_cross_attention)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    # ... while a real context token does matter
    k3 = k.clone()
    k3[0, 0] += 3.0
    out3 = run_backend(backend, q, k3, v, mask, packed, fn=packed_cross_attention)
    assert not torch.allclose(packed.split(out3)[0], packed.split(out)[0], atol=1e-4)
    assert torch.equal(torch.cat(packed.split(out3)[1:]), torch.cat(packed.split(out)[1:]))


# ------------------------------------------------------------------------------------------------ backend choice
def test_resolve_backend():
    assert resolve_backend(AttentionBackend.AUTO, UNIFORM, CPU) is AttentionBackend.DENSE
    assert resolve_backend(AttentionBackend.AUTO, MIXED, CPU) is AttentionBackend.SDPA_LOOP
    assert resolve_backend(AttentionBackend.SDPA_LOOP, UNIFORM, CPU) is AttentionBackend.SDPA_LOOP
    assert resolve_backend(AttentionBackend.FLEX, MIXED, CPU) is AttentionBackend.FLEX
    with pytest.raises(RuntimeError, match="xformers.*CUDA"):
        resolve_backend(AttentionBackend.XFORMERS, MIXED, CPU)
    with pytest.raises(RuntimeError, match="xformers.*CUDA"):
        resolve_backend(AttentionBackend.XFORMERS, UNIFORM, CPU)
    with pytest.raises(ValueError, match=r"dense.*equal-length.*\(6, 18, 1, 5\)"):
        resolve_backend(AttentionBackend.DENSE, MIXED, CPU)
    with pytest.raises(ValueError, match="dense"):
        packed_self_attention(*qkv(MIXED), MIXED, AttentionBackend.DENSE)


XFORMERS, FLEX, SDPA_LOOP = AttentionBackend.XFORMERS, AttentionBackend.FLEX, AttentionBackend.SDPA_LOOP


@pytest.mark.parametrize("verified, importable, expected", [
    (set(), True, SDPA_LOOP),  # nothing verified: never an unrun xformers path, even where xformers imports
    ({XFORMERS}, False, SDPA_LOOP),  # verified, but not importable in this environment
    ({XFORMERS}, True, XFORMERS),
    ({FLEX}, True, FLEX),
    ({XFORMERS, FLEX}, False, FLEX),
    ({XFORMERS, FLEX}, True, XFORMERS),
])
def test_auto_on_a_gpu_chooses_only_among_verified_backends(verified, importable, expected):
    assert choose_mixed_length_backend(frozenset(verified), importable) is expected


def write_records(path, *records):
    path.write_text(json.dumps({"records": list(records)}))
    return path


def test_verified_backends_hold_only_for_the_same_device_torch_and_xformers(tmp_path):
    here = device_signature(CPU)
    assert here == {"device_name": "cpu", "torch": torch.__version__, "xformers": here["xformers"]}
    path = write_records(
        tmp_path / "verified.json",
        {**here, "backends": ["flex"]},
        {**here, "xformers": "0.0.0-another-build", "backends": ["xformers"]},  # another xformers: not this one
        {**here, "torch": "1.0.0", "backends": ["dense"]},  # another torch
        {**here, "device_name": "NVIDIA H100 80GB HBM3", "backends": ["sdpa_loop"]},  # another device
    )
    assert verified_backends(CPU, path) == {FLEX}
    assert verified_backends(CPU, tmp_path / "absent.json") == frozenset()
    (tmp_path / "bad.json").write_text('{"backends": ["flex"]}')
    with pytest.raises(ValueError, match=r"bad\.json.*records"):
        verified_backends(CPU, tmp_path / "bad.json")
    write_records(tmp_path / "unknown.json", {**here, "backends": ["magic"]})
    with pytest.raises(ValueError, match=r"unknown\.json.*'magic'"):
        verified_backends(CPU, tmp_path / "unknown.json")


def test_auto_on_cuda_reads_the_record_for_the_device_at_hand(tmp_path, monkeypatch):
    """resolve_backend(AUTO) on a CUDA device, with the device's signature faked (no GPU here)."""
    gpu = {"device_name": "NVIDIA H100 80GB HBM3", "torch": torch.__version__, "xformers": "0.0.33"}
    monkeypatch.setattr(attention, "device_signature", lambda device: gpu)
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    cuda = torch.device("cuda", 0)
    path = tmp_path / "verified.json"
    monkeypatch.setenv("KINETOSCOPE_VERIFIED_BACKENDS", str(path))
    for records, expected in [
        ([], SDPA_LOOP),
        ([{**gpu, "device_name": "NVIDIA A100-SXM4-40GB", "backends": ["xformers"]}], SDPA_LOOP),
        ([{**gpu, "backends": ["flex"]}], FLEX),
        ([{**gpu, "backends": ["flex", "xformers"]}], XFORMERS),
    ]:
        write_records(path, *records)
        attention._auto_cuda_backend.cache_clear()
        assert resolve_backend(AttentionBackend.AUTO, MIXED, cuda) is expected, records
        assert resolve_backend(AttentionBackend.AUTO, UNIFORM, cuda) is AttentionBackend.DENSE
    attention._auto_cuda_backend.cache_clear()


JUNIT_CASE = {
    "pass": '<testcase classname="tests.test_cuda" name="{}" time="1.0"/>',
    "fail": '<testcase classname="tests.test_cuda" name="{}" time="1.0"><failure message="x"/></testcase>',
    "skip": '<testcase classname="tests.test_cuda" name="{}" time="0.0"><skipped message="x"/></testcase>',
}


def test_gpu_check_records_only_the_kernels_whose_equality_tests_passed(tmp_path):
    """benchmarks/record_verified_backends.py, as benchmarks/gpu_check.sh runs it (here with --device cpu)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "verified_backends.json"

    def record(xformers: str, flex: str) -> frozenset:
        cases = [JUNIT_CASE[xformers].format("test_xformers_matches_per_sample_sdpa_forward_and_backward_on_a_mixed_pack"),
                 JUNIT_CASE[flex].format("test_flex_matches_per_sample_sdpa_forward_and_backward_on_a_mixed_pack")]
        junit = tmp_path / "test_cuda.xml"
        junit.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
        subprocess.run([sys.executable, str(repo / "benchmarks" / "record_verified_backends.py"), "--junit", str(junit),
                        "--device", "cpu", "--out", str(out)], check=True, capture_output=True, timeout=240)
        return verified_backends(CPU, out)

    assert record("skip", "pass") == {FLEX}  # a skipped test verifies nothing
    assert record("pass", "fail") == {XFORMERS}  # a new run on the same device replaces its record ...
    assert len(json.loads(out.read_text())["records"]) == 1  # ... dropping a kernel that no longer passes


# -------------------------------------------------------------------------------------------- FlexAttention
def test_flex_block_mask_is_built_once_per_layout():
    first = flex_block_mask(MIXED, CPU)
    assert flex_block_mask(pack_of([(1, 2, 3), (2, 3, 3), (1, 1, 1), (1, 1, 5)]), CPU) is first  # same cu_seqlens
    assert flex_block_mask(pack_of([(1, 1, 5), (1, 2, 3), (2, 3, 3), (1, 1, 1)]), CPU) is not first  # reordered


def test_flex_runs_compiled_and_says_clearly_that_cpu_has_no_backward():
    q, k, v = (x.requires_grad_() for x in qkv(MIXED))
    with pytest.raises(NotImplementedError, match="flex.*no FlexAttention backward on CPU.*sdpa_loop"):
        packed_self_attention(q, k, v, MIXED, AttentionBackend.FLEX)
    with torch.no_grad():  # inference on CPU works, and equals the per-sample SDPA path
        flex = packed_self_attention(q, k, v, MIXED, AttentionBackend.FLEX)
        loop = packed_self_attention(q, k, v, MIXED, AttentionBackend.SDPA_LOOP)
    # float32 softmax attention over at most 18 keys: both kernels round to ~1e-7 relative; outputs are O(1)
    torch.testing.assert_close(flex, loop, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------- DiT, end to end
def make_dit(attention=AttentionBackend.AUTO) -> DiT:
    torch.manual_seed(0)
    dit = DiT(width=64, depth=2, num_heads=4, attention=attention)
    dit.bind(DenoiserIO(token_dim=48, context_dim=32, pooled_dim=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised adaLN and output layers would make the output trivially zero
        for layer in [block.ada[-1] for block in dit.blocks] + [dit.final_ada[-1], dit.head]:
            layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=g))
    return dit.eval()


def dit_inputs(shapes, context_lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(*s, generator=g) for s in shapes]
    b, length = len(shapes), max(context_lengths)
    context = torch.randn(b, length, 32, generator=g)
    mask = torch.arange(length)[None] < torch.tensor(context_lengths)[:, None]
    context[~mask] = 100.0  # padding garbage, must be ignored
    cond = Conditioning(context, mask, torch.randn(b, 32, generator=g))
    timestep = torch.rand(b, generator=g)
    return latents, timestep, cond


@pytest.mark.parametrize(
    "shapes, context_lengths",
    [
        pytest.param([(3, 2, 8, 8), (3, 1, 8, 12), (3, 3, 4, 4), (3, 1, 4, 4)], [5, 2, 7, 1], id="mixed"),
        pytest.param([(3, 2, 8, 8), (3, 2, 8, 8)], [3, 6], id="uniform"),
    ],
)
def test_dit_packed_batch_equals_samples_run_alone(shapes, context_lengths):
    dit, patcher = make_dit(), SpacetimePatcher(1, 4, 4)
    latents, timestep, cond = dit_inputs(shapes, context_lengths)
    with torch.no_grad():
        packed = patcher.patchify(latents)
        batched = dit(packed, timestep, cond)
        assert batched.tokens.shape == packed.tokens.shape
        assert batched.grid_sizes == packed.grid_sizes
        outputs = batched.split()
        assert batched.tokens.abs().mean() > 1e-2, "perturbed DiT should give a non-trivial output"
        assert not torch.allclose(outputs[0][:1], outputs[1][:1], atol=1e-3)
        for i, (latent, n) in enumerate(zip(latents, context_lengths)):
            alone_cond = Conditioning(cond.context[i:i + 1, :n], cond.context_mask[i:i + 1, :n], cond.pooled[i:i + 1])
            alone = dit(patcher.patchify([latent]), timestep[i:i + 1], alone_cond)
            torch.testing.assert_close(outputs[i], alone.tokens, rtol=0, atol=1e-5, msg=lambda m, i=i: f"sample {i}: {m}")


def test_dit_backends_agree_on_a_mixed_pack():
    patcher = SpacetimePatcher(1, 4, 4)
    latents, timestep, cond = dit_inputs([(3, 2, 8, 8), (3, 1, 8, 12)], [4, 2], seed=7)
    with torch.no_grad():
        packed = patcher.patchify(latents)
        loop = make_dit(AttentionBackend.SDPA_LOOP)(packed, timestep, cond).tokens
        flex = make_dit(AttentionBackend.FLEX)(packed, timestep, cond).tokens
    torch.testing.assert_close(flex, loop, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- text conditioner
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hashed_text_pooled_output_independent_of_batch_companions(dtype):
    torch.manual_seed(0)
    conditioner = HashedTextConditioner(width=32, depth=2, num_heads=4, caption_dropout=0.5).to(dtype).eval()
    caption = "a red square moves left on a blue background"
    with torch.no_grad():
        alone = conditioner([caption])
        short = conditioner(["dots", caption])
        long = conditioner([caption, "a much longer caption " * 3 + "that pads every other caption in the batch", ""])
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    n = alone.context.shape[1]
    assert alone.context_mask.all()
    for cond, row in ((short, 1), (long, 0)):
        assert cond.context_mask[row].sum() == n
        torch.testing.assert_close(cond.pooled[row], alone.pooled[0], rtol=0, atol=atol)
        torch.testing.assert_close(cond.context[row, :n], alone.context[0], rtol=0, atol=atol)
    assert long.context.shape[1] > n and not long.context_mask[0, n:].any()
    assert alone.pooled.shape == (1, 32) and alone.context.shape == (1, n, 32)
    # different captions give different pooled vectors (the encoder is not trivially constant)
    assert not torch.allclose(short.pooled[0], short.pooled[1], atol=1e-4)


def test_hashing_tokenizer_is_deterministic_and_consistent():
    tok = HashingTokenizer(num_buckets=4096, max_length=8)
    expected_red = 2 + zlib.crc32(b"red") % 4094
    a, b = tok.encode("A red ball."), tok.encode("RED car, red")
    assert a == [HashingTokenizer.CLS, 2 + zlib.crc32(b"a") % 4094, expected_red, 2 + zlib.crc32(b"ball") % 4094,
                 2 + zlib.crc32(b".") % 4094]
    assert b[1] == b[4] == expected_red  # same word, same id, wherever it appears (case-insensitive)
    assert HashingTokenizer(num_buckets=4096, max_length=8).encode("A red ball.") == a  # a fresh instance agrees
    assert tok.encode("") == [HashingTokenizer.CLS]
    assert len(tok.encode("one two three four five six seven eight nine ten")) == 8  # truncated to max_length
    assert all(2 <= i < 4096 for i in tok.encode("every word maps into the bucket range !?")[1:])

    ids, mask = tok(["A red ball.", "", "RED car, red"])
    assert ids.shape == mask.shape == (3, 5) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0].tolist() == a and ids[1].tolist() == [1, 0, 0, 0, 0]
    assert mask.sum(1).tolist() == [5, 1, 5]
    assert torch.equal(mask, ids != 0)
