"""Fixed generation cases whose outputs were stored before the generation pipeline was split out of VideoDiffusion
(``tests/data/generation_reference.pt``); ``tests/test_generation_reference.py`` checks the code reproduces them.

Every model's weights are set from its parameter *names* (a generator seeded by the name's CRC32), not from the
order modules are built in, so a refactor that builds the same parameters in another order still gets the same
weights, and one that renames a parameter (which would break checkpoints) fails. The cases cover text-to-video,
guidance with negative prompts and rescale, micro-conditions, image-to-video through a prompt row, extension with
given frames (token replacement and channels), SDEdit, every denoiser family, every sampler and the causal VAE.

Run ``python tests/generation_reference.py --write`` only to record new references on purpose.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from framework.core.micro_conditions import MicroCondition
from framework.data.prompts import Prompts, load_prompt_requests
from framework.generation.frame_conditioning import FrameCondition, FrameMaskProbabilities
from framework.generation.tasks import SDEdit
from framework.modules import VideoDiffusion
from plugins.compressors.causal_vae import CausalVAE
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.denoisers.mmdit import MMDiT
from plugins.denoisers.st_dit import STDiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.ddim import DDIM
from plugins.samplers.ddpm import DDPM
from plugins.samplers.dpm_solver import DPMSolverPlusPlus
from plugins.samplers.rectified_flow import RectifiedFlow
from plugins.samplers.rectified_flow_heun import RectifiedFlowHeun

REFERENCE = Path(__file__).parent / "data" / "generation_reference.pt"
SCALE = 0.5  # weights at half the usual 1 / sqrt(fan_in) scale: outputs mostly inside [-1, 1], not clamped
CAPTIONS = ["a red square moving right on a black background", "a blue circle moving up on a white background"]


def set_weights_by_name(model: nn.Module) -> None:
    """Every parameter drawn from a generator seeded by its name: matrices ~ N(0, 1 / fan_in), vectors named
    ``weight`` (norm gains) ~ 1 + N(0, 0.1^2), other vectors (biases, markers) ~ N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            z = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() >= 2:
                value = SCALE * z / (p.numel() / p.shape[0]) ** 0.5
            elif name.endswith("weight") or name.endswith("gain"):
                value = 1 + 0.1 * z
            else:
                value = 0.1 * z
            p.copy_(value.to(p.dtype))


def build(denoiser: nn.Module, sampler: nn.Module, patch=(1, 4, 4), compressor: nn.Module | None = None,
          **kwargs) -> VideoDiffusion:
    model = VideoDiffusion(
        compressor or PixelCompressor(), SpacetimePatcher(*patch), denoiser,
        HashedTextConditioner(width=16, depth=1, num_heads=2, caption_dropout=0.0), sampler, **kwargs)
    set_weights_by_name(model)
    return model.eval()


def solid_video(frames: int, height: int, width: int, seed: int) -> Tensor:
    """A deterministic smooth clip [3, frames, H, W] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, frames, 2, 2, generator=g) * 2 - 1  # [3, T, 2, 2]
    return nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


# Each case: a model and what it generates; returns the videos [3, T, H, W] (CPU float32).
def text_to_video_dit() -> list[Tensor]:
    model = build(DiT(width=32, depth=2, num_heads=2), RectifiedFlow(shift=3.0), sampling_steps=3)
    return model.generate(CAPTIONS, [(4, 16, 16), (4, 16, 24)], [0, 7])


def negative_prompt_stdit_ddim() -> list[Tensor]:
    model = build(STDiT(width=32, depth=2, num_heads=2), DDIM(num_train_timesteps=100, prediction="v", eta=0.5, noise_seed=3),
                  patch=(1, 4, 4), sampling_steps=4, guidance_scale=3.0, guidance_rescale=0.7)
    return model.generate(CAPTIONS, [(3, 16, 16), (2, 8, 16)], [1, 2],
                          negative_prompts=["blurry", ""])


def micro_conditions_mmdit_dpm() -> list[Tensor]:
    micro = [MicroCondition.FPS, MicroCondition.ORIGINAL_HEIGHT, MicroCondition.ORIGINAL_WIDTH]
    model = build(MMDiT(width=32, depth=2, num_heads=2, micro_conditions=micro),
                  DPMSolverPlusPlus(num_train_timesteps=100, prediction="v"), sampling_steps=4, output_fps=12.0)
    return model.generate(CAPTIONS + ["one frame"], [(4, 16, 16), (2, 16, 16), (1, 16, 16)], [4, 5, 6],
                          fps=[4.0, None, None], original_sizes=[(720, 1280), None, (32, 32)])


def extend_with_given_frames_heun() -> list[Tensor]:
    model = build(DiT(width=32, depth=1, num_heads=2), RectifiedFlowHeun(shift=2.0), patch=(2, 4, 4),
                  sampling_steps=3, frame_conditioning=FrameMaskProbabilities())
    given = solid_video(6, 16, 16, seed=11)  # [3, 6, 16, 16]
    first = FrameCondition(given, torch.tensor([True, True, False, False, False, False]))
    last = FrameCondition(given, torch.tensor([False, False, False, True, True, True]))  # a partly given token too
    return model.generate(CAPTIONS, [(6, 16, 16)] * 2, [8, 9], frame_conditions=[first, last])


def given_frames_as_channels() -> list[Tensor]:
    model = build(DiT(width=32, depth=1, num_heads=2), RectifiedFlow(prediction="clean"), patch=(4, 4, 4),
                  sampling_steps=3, frame_conditioning=FrameMaskProbabilities(channels=True))
    given = solid_video(4, 16, 16, seed=12)
    return model.generate(CAPTIONS[:1], [(4, 16, 16)], [10],
                          frame_conditions=[FrameCondition(given, torch.tensor([True, False, False, False]))])


def sdedit_rectified_flow() -> list[Tensor]:
    model = build(DiT(width=32, depth=1, num_heads=2), RectifiedFlow(shift=3.0), sampling_steps=4)
    videos = [solid_video(4, 16, 16, seed=13), solid_video(4, 16, 16, seed=14)]
    return model.generate(CAPTIONS, [(4, 16, 16)] * 2, [12, 13],
                          sdedits=[SDEdit(v, 0.6) for v in videos])


def ddpm_causal_vae() -> list[Tensor]:
    vae = CausalVAE(latent_channels=4, base_channels=8, res_blocks=1, temporal_factor=2, spatial_factor=4,
                    tiling=None)
    model = build(DiT(width=32, depth=1, num_heads=2), DDPM(num_train_timesteps=50, prediction="v", noise_seed=5),
                  patch=(1, 2, 2), compressor=vae, sampling_steps=5, guidance_scale=2.0)
    return model.generate(CAPTIONS[:1], [(5, 16, 16)], [14])


def prompt_rows(tmp: Path) -> list[Tensor]:
    """``predict_step`` on prompt rows: text-to-video with a per-row guidance and negative prompt, image-to-video
    from a PNG (lossless, so its pixels are exact), and micro-conditions from the row."""
    model = build(DiT(width=32, depth=1, num_heads=2, micro_conditions=[MicroCondition.FPS]),
                  RectifiedFlow(shift=3.0), sampling_steps=3, frame_conditioning=FrameMaskProbabilities())
    frame = solid_video(1, 16, 16, seed=15)[:, 0]  # [3, H, W]
    Image.fromarray(((frame + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(tmp / "first.png")
    rows = [
        {"caption": CAPTIONS[0], "seed": 3, "guidance": 2.5, "negative_prompt": "static"},
        {"caption": CAPTIONS[1], "seed": 4, "task": "image_to_video", "image": "first.png", "fps": 24},
        {"caption": "", "seed": 5, "frames": 2, "width": 24},
    ]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"frames": 4, "height": 16, "width": 16, **r}) + "\n"
                                               for r in rows))
    requests = load_prompt_requests(Prompts(file=tmp / "prompts.jsonl"))
    out = []
    for request in requests:
        (item,) = predict_rows(model, [request])
        assert item.error is None, item.error
        out.append(item.video)
    return out


def predict_rows(model: VideoDiffusion, requests):
    """How ``kinetoscope predict`` turns prompt rows into videos."""
    return model.predict_step(requests, 0)


CLI_MODEL = ["--model.init_args.denoiser.init_args.width=32", "--model.init_args.denoiser.init_args.depth=2",
             "--model.init_args.denoiser.init_args.num_heads=2", "--model.init_args.conditioner.init_args.width=16",
             "--model.init_args.conditioner.init_args.num_heads=2", "--model.init_args.sampling_steps=3"]


def cli_predict(tmp: Path, model_args: list[str], checkpoint: Path | None = None) -> list[Tensor]:
    """``kinetoscope predict -c configs/quickstart.yaml`` (shrunk by ``CLI_MODEL``; its EMACallback holds no average
    for a checkpoint without one) from a checkpoint of named
    weights, with a negative prompt: the PNG frame grids it writes, as uint8 [H, W, 3] (lossless, unlike MP4)."""
    import lightning as L
    import numpy as np

    from framework.cli.main import main

    if checkpoint is None:
        model = build(DiT(width=32, depth=2, num_heads=2), RectifiedFlow(shift=3.0, prediction="clean"),
                      patch=(8, 4, 4))
        checkpoint = tmp / "named.ckpt"
        torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": L.__version__}, checkpoint)
    out = tmp / f"samples_{checkpoint.stem}"
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    main(["predict", "-c", str(config), "--ckpt_path", str(checkpoint), *CLI_MODEL, *model_args,
          "--data.init_args.prompts.negative_prompt=a still frame", "--trainer.logger=false",
          f"--trainer.callbacks.output_dir={out}", "--trainer.callbacks.formats=[gif]",
          "--trainer.callbacks.upscale=1", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"])
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    grids = [next(f for f in row["files"] if f.endswith(".png")) for row in rows]
    return [torch.from_numpy(np.array(Image.open(out / name).convert("RGB"))) for name in grids]


CASES: dict[str, Callable[..., list[Tensor]]] = {
    "text_to_video_dit": text_to_video_dit,
    "negative_prompt_stdit_ddim": negative_prompt_stdit_ddim,
    "micro_conditions_mmdit_dpm": micro_conditions_mmdit_dpm,
    "extend_with_given_frames_heun": extend_with_given_frames_heun,
    "given_frames_as_channels": given_frames_as_channels,
    "sdedit_rectified_flow": sdedit_rectified_flow,
    "ddpm_causal_vae": ddpm_causal_vae,
}


def run_all(tmp: Path) -> dict[str, list[Tensor]]:
    results = {name: case() for name, case in CASES.items()}
    results["prompt_rows"] = prompt_rows(tmp)
    results["cli_predict"] = cli_predict(tmp, [])
    return results


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="overwrite the stored references")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp))
    for name, videos in results.items():
        print(name, [tuple(v.shape) for v in videos], "std", [round(float(v.float().std()), 3) for v in videos])
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: [v.clone() for v in videos] for name, videos in results.items()}, REFERENCE)
        print("wrote", REFERENCE)
