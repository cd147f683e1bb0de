"""LoRA fine-tuning through the ``kinetoscope`` CLI (tests/finetune/dit_lora.yaml): fit lowers the loss on the clips
it trains on, its checkpoints hold only the adapters, a stopped run resumed with ``--ckpt_path last`` logs the same
losses as an uninterrupted one, predict loads the pruned checkpoint onto the base and samples with merged adapters,
and bad LoRA settings fail naming the value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="optional extra: pip install 'kinetoscope[finetune]'")

from framework.cli.lightning_cli import cli_main  # noqa: E402
from framework.modules import VideoDiffusion  # noqa: E402
from framework.training.checkpointing import export_safetensors, load_checkpoint_safely  # noqa: E402
from framework.training.finetune import DIFFUSERS_LORA_FILE  # noqa: E402
from framework.training.reliability import read_loss_log  # noqa: E402
from plugins.compressors.pixel import PixelCompressor  # noqa: E402
from plugins.conditioners.hashed_text import HashedTextConditioner  # noqa: E402
from plugins.denoisers.dit import DiT  # noqa: E402
from plugins.patchers.spacetime import SpacetimePatcher  # noqa: E402
from plugins.samplers.rectified_flow import RectifiedFlow  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "finetune" / "dit_lora.yaml"
STEPS = 8


def write_base(folder: Path) -> None:
    """The pretrained model: the config's plugins with random weights, exported like SafeCheckpointIO does."""
    torch.manual_seed(0)
    model = VideoDiffusion(PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
                           HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow())
    with torch.no_grad():
        for p in model.trained_modules().parameters():
            p.normal_(0.0, 0.2)
    export_safetensors(model.state_dict(), folder / "base.safetensors")


def fit(folder: Path, *extra: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr(sys, "argv", ["kinetoscope"])  # cli_main gets its arguments explicitly, not pytest's
        return cli_main(["fit", "-c", str(CONFIG), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(uninterrupted run, run stopped at step 6 and resumed to step 8), each in its own working directory. Step 6
    is mid-epoch (4 batches an epoch): a run stopped at an epoch's end is not resumed exactly even without
    fine-tuning (the resumed run starts one more loader iterator, which draws from the torch RNG)."""
    whole, resumed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("resumed")
    for folder in (whole, resumed):
        write_base(folder)
    fit(whole)
    fit(resumed, "--trainer.max_steps=6")
    fit(resumed, "--ckpt_path=last")
    return whole, resumed


def fixed_noise_loss(model: VideoDiffusion, batches: list[dict]) -> float:
    """The training loss on ``batches`` with the same timesteps and noise every call (8 draws per batch)."""
    model.eval()  # no caption dropout, no adapter dropout
    total = []
    with torch.no_grad():
        for batch in batches:
            clean = model.encode(batch["videos"])
            cond = model.conditioner(batch["captions"])
            for seed in range(8):
                total.append(model.sampler.training_loss(lambda x, t: model.denoiser(x, t, cond), clean,
                                                         generator=torch.Generator().manual_seed(seed)).mean())
    return torch.stack(total).mean().item()


def test_fit_lowers_the_loss_on_its_clips(runs) -> None:
    whole, _ = runs
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(whole)
        mp.setattr(sys, "argv", ["kinetoscope"])
        cli = cli_main(["-c", str(CONFIG)], run=False)  # the model before training: base + zero adapters
    cli.datamodule.setup("fit")
    batches = list(cli.datamodule.train_dataloader())
    model = cli.model
    before = fixed_noise_loss(model, batches)
    checkpoint = load_checkpoint_safely(whole / "runs" / "lora" / "checkpoints" / "last.ckpt")
    model.on_load_checkpoint(checkpoint)  # what Lightning does on load: fill the frozen base in
    model.load_state_dict(checkpoint["state_dict"])
    after = fixed_noise_loss(model, batches)
    assert after < 0.9 * before, (before, after)


def test_checkpoints_hold_only_the_adapters(runs) -> None:
    whole, _ = runs
    checkpoint = load_checkpoint_safely(whole / "runs" / "lora" / "checkpoints" / "last.ckpt")
    keys = set(checkpoint["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k or k == "ema.n_averaged" for k in keys), keys
    base_size = (whole / "base.safetensors").stat().st_size
    assert (whole / "runs" / "lora" / "checkpoints" / "last.safetensors").stat().st_size < base_size / 10
    optimizer_state = checkpoint["optimizer_states"][0]["state"]
    assert sum(1 for _ in optimizer_state) == len([k for k in keys if not k.startswith("ema.")])
    assert (whole / "runs" / "lora" / "lora" / DIFFUSERS_LORA_FILE).is_file()  # written at the end of fit


@pytest.mark.slow
def test_stopped_and_resumed_lora_run_logs_the_same_losses(runs) -> None:
    whole, resumed = runs
    expected = read_loss_log(whole / "runs" / "lora" / "losses.jsonl")
    assert list(expected) == list(range(1, STEPS + 1))
    assert read_loss_log(resumed / "runs" / "lora" / "losses.jsonl") == expected  # float32, bit for bit
    a, b = (load_checkpoint_safely(d / "runs" / "lora" / "checkpoints" / "last.ckpt") for d in runs)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_predict_from_the_lora_checkpoint_writes_a_video(runs) -> None:
    whole, _ = runs
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(whole)
        mp.setattr(sys, "argv", ["kinetoscope"])
        cli_main(["predict", "-c", str(CONFIG), "--ckpt_path", "runs/lora/checkpoints/last.ckpt"])
    videos = list((whole / "runs" / "lora" / "samples").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0


def test_a_resume_onto_another_base_is_refused(runs, tmp_path, capsys) -> None:
    whole, _ = runs
    torch.manual_seed(1)
    other = VideoDiffusion(PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
                           HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow())
    export_safetensors(other.state_dict(), tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="trained against other frozen base weights"):
        fit(tmp_path, f"--ckpt_path={whole / 'runs' / 'lora' / 'checkpoints' / 'last.ckpt'}",
            f"--trainer.max_steps={STEPS + 2}")


@pytest.mark.parametrize(("override", "named"), [
    ("--model.init_args.finetuning.init_args.rank=0", "rank must be an integer > 0, got 0"),
    ("--model.init_args.finetuning.init_args.rank=-4", "rank must be an integer > 0, got -4"),
    ("--model.init_args.finetuning.init_args.target_modules=[qkv,attn.to_q]", "target module 'attn.to_q' matches no"),
])
def test_bad_lora_settings_fail_naming_the_value(override, named, tmp_path, capsys) -> None:
    write_base(tmp_path)
    with pytest.raises((SystemExit, Exception)) as info:
        fit(tmp_path, override)
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None)
    out = capsys.readouterr()
    assert named in f"{info.value}\n{out.out}\n{out.err}"
    assert not (tmp_path / "runs" / "lora" / "checkpoints").exists()
