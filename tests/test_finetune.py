"""Fine-tuning (framework/training/finetune.py): LoRA through peft and full fine-tuning with frozen parts, on our DiT
and on a diffusers WanTransformer3DModel, with diffusers' ``load_lora_weights`` as the oracle for the exported keys.
The CLI runs (fit lowers the loss, exact resume, bad input) are in tests/test_finetune_cli.py."""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="optional extra: pip install 'kinetoscope[finetune]'")

from framework.core.interfaces import DenoiserIO  # noqa: E402
from framework.layers.packing import PackedSequence  # noqa: E402
from framework.modules import VideoDiffusion  # noqa: E402
from framework.training.checkpointing import export_safetensors  # noqa: E402
from framework.training.finetune import (  # noqa: E402
    DIFFUSERS_LORA_FILE,
    FullFineTuning,
    LoRA,
    diffusers_lora_state_dict,
    lora_layers,
    save_diffusers_lora,
)
from plugins.compressors.pixel import PixelCompressor  # noqa: E402
from plugins.conditioners.hashed_text import HashedTextConditioner  # noqa: E402
from plugins.denoisers.dit import DiT  # noqa: E402
from plugins.patchers.spacetime import SpacetimePatcher  # noqa: E402
from plugins.samplers.rectified_flow import RectifiedFlow  # noqa: E402
from tests.denoiser_fixtures import random_conditioning  # noqa: E402

TARGETS = ["qkv", "proj", "mlp.0", "mlp.2"]


def tiny_model(**options) -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=2, num_heads=2, **options.pop("dit", {})),
        HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(), learning_rate=1e-2, **options,
    )


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> str:
    """A 'pretrained' model: random weights everywhere (a fresh DiT's zero head would hide every difference)."""
    model = tiny_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trained_modules().parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    export_safetensors(model.state_dict(), path)
    return str(path)


def pack_and_batch(model: VideoDiffusion) -> tuple[PackedSequence, torch.Tensor, object]:
    g = torch.Generator().manual_seed(3)
    latents = [torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 2, 8, 16, generator=g)]  # two sizes in a pack
    x = model.patcher.patchify(latents)
    return x, torch.tensor([0.3, 0.8]), model.conditioner(["a red ball", "waves on a beach at night"])


def randomise_adapters(module: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(module).values():
            for adapter in (layer.lora_A["default"], layer.lora_B["default"]):
                adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=g) * 0.1)


def test_zero_initialised_adapter_changes_nothing(base_weights) -> None:
    """peft starts B at zero: the adapted model's output equals the base's bit for bit."""
    base = tiny_model(finetuning=FullFineTuning(base_weights=base_weights)).eval()
    adapted = tiny_model(finetuning=LoRA(TARGETS, rank=4, alpha=8, base_weights=base_weights)).eval()
    assert len(lora_layers(adapted.denoiser)) == 2 * 5  # per block: attn.qkv, attn.proj, cross.proj, mlp.0, mlp.2
    x, t, _ = pack_and_batch(base)
    with torch.no_grad():
        cond = base.conditioner(["a red ball", "waves"])
        expected = base.denoiser(x, t, cond).tokens
        got = adapted.denoiser(x, t, adapted.conditioner(["a red ball", "waves"])).tokens
    assert expected.abs().max() > 0.1  # the base is not the zero-initialised DiT
    assert torch.equal(got, expected)


def test_only_adapter_parameters_receive_gradients_and_change(base_weights) -> None:
    model = tiny_model(finetuning=LoRA(TARGETS, rank=4, base_weights=base_weights))
    adapters = {name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert adapters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = {"videos": [torch.rand(3, 4, 8, 8) * 2 - 1, torch.rand(3, 2, 8, 16) * 2 - 1], "captions": ["a", "b"]}
    model.log = lambda *args, **kwargs: None  # no trainer attached
    for _ in range(2):  # after one step B is non-zero, so A gets a non-zero gradient too
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad == adapters
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}


def test_full_fine_tune_updates_only_the_unfrozen_parts(base_weights) -> None:
    from tests.test_training_switches import fit

    frozen = ["conditioner.*", "denoiser.blocks.0.*"]
    model = tiny_model(finetuning=FullFineTuning(freeze=frozen, base_weights=base_weights))
    before = {k: v.clone() for k, v in model.trained_modules().state_dict().items()}
    fit(model, steps=3)
    after = model.trained_modules().state_dict()
    for name, value in before.items():
        is_frozen = any(fnmatch.fnmatchcase(name, pattern) for pattern in frozen)
        if is_frozen:
            assert torch.equal(value, after[name]), name
        else:
            assert not torch.equal(value, after[name]), f"{name} did not train"


def test_bad_input_names_the_value() -> None:
    for rank in (0, -2):
        with pytest.raises(ValueError, match=f"rank must be an integer > 0, got {rank}"):
            LoRA(TARGETS, rank=rank)
    with pytest.raises(ValueError, match="target module 'to_qkv' matches no linear layer of the denoiser DiT"):
        tiny_model(finetuning=LoRA(["qkv", "to_qkv"], rank=2))
    with pytest.raises(ValueError, match="freeze pattern 'denoiser.block.*' matches no parameter"):
        tiny_model(finetuning=FullFineTuning(freeze=["denoiser.block.*"]))
    with pytest.raises(FileNotFoundError, match="base_weights .*missing.safetensors does not exist"):
        tiny_model(finetuning=LoRA(TARGETS, base_weights="/nonexistent/missing.safetensors"))


def test_base_weights_of_another_configuration_are_refused(tmp_path) -> None:
    other = VideoDiffusion(PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
                           HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow())
    path = tmp_path / "depth1.safetensors"
    export_safetensors(other.state_dict(), path)
    with pytest.raises(ValueError, match=f"base_weights {path} lacks .* weights of this model, e.g. denoiser.blocks.1"):
        tiny_model(finetuning=LoRA(TARGETS, base_weights=str(path)))


def test_merged_adapters_give_the_unmerged_output(base_weights) -> None:
    model = tiny_model(finetuning=LoRA(TARGETS, rank=4, alpha=8, base_weights=base_weights)).eval()
    x, t, _ = pack_and_batch(model)
    with torch.no_grad():
        cond = model.conditioner(["a red ball", "waves"])
        base = model.denoiser(x, t, cond).tokens
        randomise_adapters(model.denoiser)
        unmerged = model.denoiser(x, t, cond).tokens
        model.finetuning.merge(model.denoiser)
        assert all(layer.merged for layer in lora_layers(model.denoiser).values())
        merged = model.denoiser(x, t, cond).tokens
        model.finetuning.unmerge(model.denoiser)
        again = model.denoiser(x, t, cond).tokens
    # W x + B (A x) vs (W + B A) x in float32: the sums are regrouped, so each layer differs by a few ulp of its
    # output; through 2 blocks of width 32 that stays far below 1e-5 of the output's scale.
    scale = unmerged.abs().max()
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=1e-5 * scale)
    assert (unmerged - base).abs().max() > 1e-2 * scale  # the adapters change the output


def test_activation_checkpointing_gives_the_same_loss_and_gradients(base_weights) -> None:
    """LoRA layers inside checkpointed blocks: recomputation in backward reproduces forward (adapter dropout too:
    non-reentrant checkpointing restores the RNG state)."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model(dit={"gradient_checkpointing": checkpointing},
                           finetuning=LoRA(TARGETS, rank=4, dropout=0.1, base_weights=base_weights)).train()
        randomise_adapters(model.denoiser)
        x, t, cond = pack_and_batch(model)
        torch.manual_seed(11)
        loss = model.sampler.training_loss(lambda x, t: model.denoiser(x, t, cond), x,
                                           generator=torch.Generator().manual_seed(2)).mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:  # the same ops on the same values, recomputed: equal up to kernel reordering
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_holds_only_the_adapters_and_loads_back_exactly(base_weights) -> None:
    model = tiny_model(finetuning=LoRA(TARGETS, rank=4, base_weights=base_weights), ema_decay=0.9)
    randomise_adapters(model.denoiser)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    saved = set(checkpoint["state_dict"])
    assert saved and all(".lora_A." in k or ".lora_B." in k or k == "ema.n_averaged" for k in saved), saved
    assert {k for k in saved if k.startswith("ema.module.")}  # the adapters' EMA copies are kept
    fresh = tiny_model(finetuning=LoRA(TARGETS, rank=4, base_weights=base_weights), ema_decay=0.9)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the frozen weights were filled in
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    stranger = tiny_model(finetuning=LoRA(TARGETS, rank=4))  # another (random) base
    with pytest.raises(ValueError, match="trained against other frozen base weights"):
        stranger.on_load_checkpoint(copy.deepcopy({**checkpoint, "state_dict": dict(checkpoint["state_dict"])}))


# ------------------------------------------------------------------------------------------ diffusers oracle
diffusers = pytest.importorskip("diffusers", reason="optional extra: pip install 'kinetoscope[diffusers]'")


def wan_denoiser(path):
    """Our Wan denoiser plugin on a tiny random transformer folder (with Wan's zero-initialised parts randomised,
    which would make every comparison trivial)."""
    from plugins.denoisers.diffusers_transformer import DiffusersVideoTransformer

    tiny_wan(path)
    return DiffusersVideoTransformer(path, subfolder=None).eval()


def tiny_wan(path) -> nn.Module:
    from tests.pretrained_fixtures import tiny_wan_transformer

    torch.manual_seed(0)
    model = tiny_wan_transformer(in_channels=4, text_dim=16)
    with torch.no_grad():  # Wan's zero-initialised parts would make the comparison trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model.eval()


def wan_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g), "timestep": torch.tensor([700.0]),
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g), "return_dict": False}


def test_saved_adapter_loads_into_the_diffusers_pipeline_with_the_same_output(tmp_path) -> None:
    """Our LoRA on the Wan denoiser plugin, exported, then ``WanPipeline.load_lora_weights`` on a fresh copy of the
    base: the pipeline's transformer gives our adapted transformer's output (tests/test_finetune_wan.py does the
    same after a ``kinetoscope fit``)."""
    base_dir = tmp_path / "transformer"
    holder = wan_denoiser(base_dir)
    lora = LoRA(["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "ffn.net.2"],
                rank=4, alpha=2.0)
    lora.apply(nn.ModuleDict({"denoiser": holder}))
    randomise_adapters(holder)
    keys = diffusers_lora_state_dict(holder)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.blocks.1.ffn.net.2.lora_B.weight" in keys
    written = lora.export(holder, tmp_path / "lora")
    assert written.name == DIFFUSERS_LORA_FILE

    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                                 transformer=diffusers.WanTransformer3DModel.from_pretrained(base_dir).eval())
    with torch.no_grad():
        before = pipe.transformer(**wan_inputs())[0]
        pipe.load_lora_weights(str(tmp_path / "lora"))
        theirs = pipe.transformer(**wan_inputs())[0]
        ours = holder.transformer(**wan_inputs())[0]
    assert (ours - before).abs().max() > 1e-3  # the adapter matters
    # Same weights, same ops (peft's LoRA layers on both sides): equal up to float32 regrouping.
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6 * ours.abs().max().item())


def test_zero_adapter_and_only_adapter_gradients_on_a_diffusers_transformer(tmp_path) -> None:
    holder = wan_denoiser(tmp_path / "t")
    with torch.no_grad():
        before = holder.transformer(**wan_inputs())[0]
    lora = LoRA(["to_q", "to_k", "to_v"], rank=2)
    lora.apply(nn.ModuleDict({"denoiser": holder}))
    out = holder.transformer(**wan_inputs())[0]
    assert torch.equal(out.detach(), before)
    out.square().mean().backward()
    with_grad = {name for name, p in holder.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in holder.named_parameters() if ".lora_" in name}
    assert len(with_grad) == 2 * 3 * 2 * 2  # A and B, q/k/v, self and cross attention, 2 blocks


def test_export_of_our_dit_uses_its_module_paths(base_weights, tmp_path) -> None:
    model = tiny_model(finetuning=LoRA(["qkv"], rank=2, base_weights=base_weights))
    path = save_diffusers_lora(model.denoiser, tmp_path / "dit_lora.safetensors")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == [f"transformer.blocks.{i}.attn.qkv.lora_{ab}.weight" for i in (0, 1)
                                    for ab in "AB"]
        assert f.get_tensor("transformer.blocks.0.attn.qkv.lora_A.weight").shape == (2, 32)


def test_activation_checkpointing_of_a_diffusers_transformer_gives_the_same_loss_and_gradients(tmp_path) -> None:
    """The Wan denoiser plugin's ``gradient_checkpointing`` (diffusers' per-block checkpointing) with LoRA inside."""
    from plugins.denoisers.diffusers_transformer import DiffusersVideoTransformer

    tiny_wan(tmp_path / "t")
    results = []
    for checkpointing in (False, True):
        denoiser = DiffusersVideoTransformer(tmp_path / "t", subfolder=None, gradient_checkpointing=checkpointing)
        LoRA(["to_q", "to_v", "ffn.net.2"], rank=2).apply(nn.ModuleDict({"denoiser": denoiser}))
        randomise_adapters(denoiser)
        denoiser.train()
        out = denoiser.transformer(**wan_inputs())[0]
        loss = out.square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-5, atol=1e-7, msg=name)
