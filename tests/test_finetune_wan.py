"""examples/wan_lora.yaml end to end on a tiny random Wan pipeline folder (tests/pretrained_fixtures.py) and a
manifest written by ``kinetoscope scan``: ``kinetoscope fit`` trains only the adapters of the diffusers transformer
(loaded from the folder), its checkpoint holds only them, and the adapter file it leaves, loaded into
``WanPipeline`` from the same folder with ``load_lora_weights``, gives the transformer output of our fine-tuned
denoiser. Nothing is downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="optional extra: pip install 'kinetoscope[finetune]'")
diffusers = pytest.importorskip("diffusers", reason="optional extra: pip install 'kinetoscope[diffusers]'")
pytest.importorskip("transformers", reason="optional extra: pip install 'kinetoscope[text]'")

from framework.cli.lightning_cli import cli_main  # noqa: E402
from framework.cli.main import main  # noqa: E402
from framework.layers.packing import PackedSequence  # noqa: E402
from framework.training.checkpointing import load_checkpoint_safely  # noqa: E402
from framework.training.finetune import DIFFUSERS_LORA_FILE, lora_layers  # noqa: E402
from framework.training.reliability import read_loss_log  # noqa: E402
from tests.manifest_media import write_numbered_mp4  # noqa: E402
from tests.pretrained_fixtures import save_tiny_wan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "wan_lora.yaml"
FOLDER = "models/Wan2.1-T2V-1.3B-Diffusers"  # where the config looks, relative to the working directory
TINY = [  # 5-frame 32x32 clips (Wan's VAE: 1 + 4k frames, 8x space), a short text encoding, a high learning rate
    "--data.init_args.buckets.resolutions=[32]", "--data.init_args.buckets.aspect_ratios=[1.0]",
    "--data.init_args.buckets.frame_counts=[5]", "--data.init_args.tokens_per_batch=64",
    "--model.init_args.conditioner.init_args.max_length=16", "--model.init_args.learning_rate=1e-2",
    "--model.init_args.warmup_steps=0", "--trainer.max_steps=3", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.logger=false",
    # predict with --ckpt_path FILE takes the model's arguments from the checkpoint's hyperparameters over the
    # command line (LightningCLI._parse_ckpt_path), so the sampling settings are fixed at fit time
    "--model.init_args.sampling_steps=3",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan_lora")
    save_tiny_wan(root / FOLDER)
    clips = root / "data" / "clips"
    clips.mkdir(parents=True)
    for i, caption in enumerate(["a red square moving left", "a blue circle moving up", "a green square",
                                 "a yellow circle on the black background"]):
        write_numbered_mp4(clips / f"clip{i}.mp4", frames=12, height=32, width=32, fps=16.0)
        (clips / f"clip{i}.txt").write_text(caption)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "argv", ["kinetoscope"])
        assert main(["scan", "data/clips", "-o", "data/manifest.csv", "--no-progress"]) == 0
        cli_main(["fit", "-c", str(CONFIG), *TINY])
    return root


def test_fit_trains_only_the_adapters_and_checkpoints_only_them(fitted) -> None:
    losses = read_loss_log(fitted / "runs" / "wan_lora" / "losses.jsonl")
    assert list(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    checkpoint = load_checkpoint_safely(fitted / "runs" / "wan_lora" / "checkpoints" / "last.ckpt")
    keys = set(checkpoint["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    assert {k.split(".")[4] for k in keys} == {"attn1", "attn2"}  # denoiser.transformer.blocks.N.attnX...
    assert len(keys) == 2 * 2 * 4 * 2  # blocks x (self, text) attention x (q, k, v, out) x (A, B)


def test_the_exported_adapter_loads_into_wan_pipeline_with_the_same_transformer_output(fitted) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(fitted)
        mp.setattr(sys, "argv", ["kinetoscope"])
        cli = cli_main(["-c", str(CONFIG), *TINY], run=False)  # the same model as fit built: base + zero adapters
    model = cli.model
    checkpoint = load_checkpoint_safely(fitted / "runs" / "wan_lora" / "checkpoints" / "last.ckpt")
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    assert any(layer.lora_B["default"].weight.abs().max() > 0 for layer in lora_layers(model.denoiser).values())

    pipe = diffusers.WanPipeline.from_pretrained(str(fitted / FOLDER))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 2, 4, 6, generator=g)  # [B, c, t, h, w]
    text = torch.randn(2, 16, 16, generator=g)
    timestep = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        base = pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                return_dict=False)[0]
        pipe.load_lora_weights(str(fitted / "runs" / "wan_lora" / "lora"), weight_name=DIFFUSERS_LORA_FILE)
        theirs = pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                  return_dict=False)[0]
        # ours through the packed denoiser contract: tokens are latent positions, t in [0, 1]
        packed = PackedSequence.from_grids([x.permute(1, 2, 3, 0) for x in latents])
        from framework.core.interfaces import Conditioning
        cond = Conditioning(text, torch.ones(2, 16, dtype=torch.bool), torch.zeros(2, 1))
        ours_packed = model.denoiser(packed, timestep / 1000, cond)
        ours = torch.stack([tokens.reshape(2, 4, 6, 4).permute(3, 0, 1, 2) for tokens in ours_packed.split()])
    assert (theirs - base).abs().max() > 1e-4  # the trained adapter changes the output
    # Same weights and ops on both sides (peft LoRA layers in the same diffusers model): float32 regrouping only.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


def test_predict_with_the_fine_tune_equals_wan_pipeline_with_the_adapter(fitted) -> None:
    """``kinetoscope predict`` from the LoRA checkpoint (base from the folder, adapters merged) writes the video
    ``WanPipeline`` makes after ``load_lora_weights`` of the exported file, for the same noise, steps and guidance."""
    from safetensors.torch import load_file

    caption, negative, (frames, height, width), steps, scale, seed = "a red square moving left", "blurry static", \
        (5, 16, 32), 3, 5.0, 7  # steps: TINY; guidance: the config's
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(fitted)
        mp.setattr(sys, "argv", ["kinetoscope"])
        main(["predict", "-c", str(CONFIG), *TINY, "--ckpt_path", "runs/wan_lora/checkpoints/last.ckpt",
              f"--data.init_args.prompts.captions=[{caption}]", f"--data.init_args.prompts.negative_prompt={negative}",
              f"--data.init_args.prompts.frames={frames}", f"--data.init_args.prompts.height={height}",
              f"--data.init_args.prompts.width={width}", f"--data.init_args.prompts.seed={seed}"])
    index = fitted / "runs" / "wan_lora" / "samples" / "index.jsonl"
    [row] = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    [name] = [f for f in row["files"] if f.endswith(".safetensors")]
    ours = load_file(str(index.parent / name))["video"]  # [3, T, H, W] in [-1, 1], lossless

    pipe = diffusers.WanPipeline.from_pretrained(str(fitted / FOLDER))
    pipe.load_lora_weights(str(fitted / "runs" / "wan_lora" / "lora"), weight_name=DIFFUSERS_LORA_FILE)
    noise = torch.randn(4, 2, 2, 4, generator=torch.Generator().manual_seed(seed))  # what predict draws for the seed
    theirs = pipe(caption, negative_prompt=negative, height=height, width=width, num_frames=frames,
                  num_inference_steps=steps, guidance_scale=scale, latents=noise[None], max_sequence_length=16,
                  output_type="pt").frames[0]
    theirs = theirs.permute(1, 0, 2, 3) * 2 - 1  # [T, 3, H, W] in [0, 1] -> [3, T, H, W] in [-1, 1]
    assert ours.shape == theirs.shape == (3, frames, height, width)
    # fp32 on CPU; merged (ours) vs unmerged (peft in the pipeline) adapters and reordered reductions: rounding
    # only, the 1e-4 bound for whole videos as in tests/test_pretrained_models.py.
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert ours.std() > 0.01
