"""CUDA-only paths, skipped without a GPU (the CI machine has none; run ``pytest tests/test_cuda.py`` where one is lent):
Lightning's FSDP1 strategy (``strategy: fsdp``, which refuses CPU) with bf16 autocast and a checkpoint that loads into
an unwrapped model; the xformers and FlexAttention kernels on a mixed-size pack against the per-sample SDPA reference,
forward and backward (what AUTO needs before it picks them); the compiled DiT in bf16 on the GPU against the eager one."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from framework.layers.attention import AttentionBackend, packed_self_attention, xformers_available
from framework.training.compilation import compile_in_place
from framework.data.datamodules import SyntheticVideoDataModule
from framework.core.interfaces import Conditioning, DenoiserIO
from plugins.denoisers.dit import DiT
from tests.denoiser_fixtures import random_conditioning, random_denoiser
from tests.test_attention import MIXED, pack_of, qkv
from tests.test_training_switches import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fsdp_strategy_trains_in_bf16_and_its_checkpoint_loads_into_an_unwrapped_model(tmp_path) -> None:
    L.seed_everything(0)
    model, initial = tiny_model(), tiny_model().state_dict()
    dtypes: list[torch.dtype] = []
    model.denoiser.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    data = SyntheticVideoDataModule(num_samples=8, sizes=((4, 8, 8), (2, 8, 16)), batch_size=4, seed=0)
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy="fsdp", precision="bf16-mixed", max_steps=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # autocast ran the denoiser in bf16 under FSDP
    path = tmp_path / "fsdp.ckpt"
    trainer.save_checkpoint(path)  # one file with full (gathered) weights on a single device
    restored = tiny_model()
    restored.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])  # strict
    weights = restored.state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    changed = [name for name, w in weights.items() if not torch.equal(w, initial[name])]
    assert len(changed) > 10, f"training under FSDP changed only {changed}"


def assert_matches_per_sample_sdpa_forward_and_backward(backend: AttentionBackend) -> None:
    """``backend`` against per-sample SDPA on a mixed pack in bf16, output and the gradients of q, k, v.

    bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3); the kernels accumulate in fp32 but round their
    bf16 inputs and outputs in different places, so outputs of order 1 may differ by a few bf16 ulps (2e-2) and the
    gradients, one more product and sum away, by twice that."""
    packed = MIXED.to("cuda")
    q, k, v = (x.cuda() for x in qkv(MIXED, dtype=torch.bfloat16))  # [N, H, Dh]
    weight = torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = {}
    for candidate in (backend, AttentionBackend.SDPA_LOOP):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = packed_self_attention(*inputs, packed, candidate)  # [N, H, Dh]
        grads = torch.autograd.grad((out.float() * weight).sum(), inputs)
        results[candidate] = (out, grads)
    (out_x, grads_x), (out_s, grads_s) = results[backend], results[AttentionBackend.SDPA_LOOP]
    torch.testing.assert_close(out_x.float(), out_s.float(), rtol=2e-2, atol=2e-2)
    for name, got, expected in zip("qkv", grads_x, grads_s):
        torch.testing.assert_close(got.float(), expected.float(), rtol=5e-2, atol=5e-2, msg=f"grad {name}")


# These two tests are what benchmarks/record_verified_backends.py (run by benchmarks/gpu_check.sh) requires before
# AttentionBackend.AUTO may pick the kernel on this GPU: keep their names in step with its REQUIRED_TESTS.
@pytest.mark.skipif(not xformers_available(), reason="xformers is not importable")
def test_xformers_matches_per_sample_sdpa_forward_and_backward_on_a_mixed_pack() -> None:
    assert_matches_per_sample_sdpa_forward_and_backward(AttentionBackend.XFORMERS)


def test_flex_matches_per_sample_sdpa_forward_and_backward_on_a_mixed_pack() -> None:
    assert_matches_per_sample_sdpa_forward_and_backward(AttentionBackend.FLEX)


def test_compiled_dit_in_bf16_matches_eager_on_the_gpu() -> None:
    io = DenoiserIO(token_dim=16, context_dim=32, pooled_dim=32)
    eager = random_denoiser(DiT, io, randomise=False, width=64, depth=2, num_heads=4)
    with torch.no_grad():  # random_denoiser's std 0.2 makes activations too large for bf16 at these tolerances
        for p in eager.parameters():  # (leaving the zero init would leave most weights without effect)
            p.normal_(0.0, 0.05)
    eager.cuda()
    compiled = random_denoiser(DiT, io, randomise=False, width=64, depth=2, num_heads=4).cuda()
    compiled.load_state_dict(eager.state_dict())
    compile_in_place(compiled)
    tokens = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))  # [N, 16]
    x = pack_of([(2, 8, 8), (2, 8, 8)], dim=16).with_tokens(tokens).to("cuda")  # equal sizes: fully traced path
    cpu_cond = random_conditioning(io, [5, 5], seed=1)
    cond = Conditioning(cpu_cond.context.cuda(), cpu_cond.context_mask.cuda(), cpu_cond.pooled.cuda())
    t = torch.rand(2, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    outputs = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, cond).tokens  # [N, 16]
        loss = out.float().pow(2).mean()
        loss.backward()
        outputs.append((out.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (out_e, grads_e), (out_c, grads_c) = outputs
    assert out_c.dtype == out_e.dtype and out_c.shape == (x.tokens.shape[0], 16)
    torch.testing.assert_close(out_c, out_e, rtol=3e-2, atol=3e-2)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (grads_c[name] - grad).abs().max() / scale < 0.1, f"gradient of {name}"
