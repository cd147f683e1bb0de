"""Does the fps micro-condition work? Train on clips at two frame rates whose motion per frame differs, then check
that the model reads the rate.

Data: ``SyntheticMovingShapes`` with ``frame_rates=[4, 8]``: the object moves 8 pixels per second, so 2 pixels per
frame at 4 fps and 1 at 8 fps, under the same caption. Only the frame rate tells the two apart. Two models, trained
side by side in one run on the same batches (the quickstart recipe: pixel-space DiT 128 wide, 4 deep, 8x4x4 pixel tubes,
clean-data rectified flow, EMA):

* ``fps_conditioned``: the DiT with ``micro_conditions: [FPS]``;
* ``baseline``: the same DiT without micro-conditions.

Measured on held-out clips (a seed never trained on), each model's EMA weights:

1. **denoising loss** (the training loss, same timesteps and noise) with the clips' true frame rate vs with the
   rates swapped (4 <-> 8). A model that uses the rate does worse with the wrong one; the baseline cannot tell;
2. **generated motion**: the same captions and seeds sampled at 4 fps and at 8 fps; ``motion_probe.track_object``
   measures the object's speed in pixels per frame (|least-squares centroid velocity|). The data has 2.0 at 4 fps
   and 1.0 at 8 fps; a model that ignores the rate makes both the same.

    OMP_NUM_THREADS=1 python benchmarks/micro_conditions.py   # -> benchmarks/results/micro_conditions.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from framework.training.ema import EMACallback
from framework.data.datamodules import SyntheticVideoDataModule
from framework.data.synthetic import SyntheticMovingShapes
from framework.metrics.motion_probe import track_object
from framework.core.micro_conditions import MicroCondition, MicroConditions
from framework.modules import VideoDiffusion
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import FlowPrediction, RectifiedFlow

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "micro_conditions.json"
FRAME_RATES = (4.0, 8.0)  # 2 and 1 pixels per frame
CLIP = (8, 24, 24)  # frames, height, width: 2 px/frame over 8 frames fits


def build(micro: bool) -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(8, 4, 4),
        DiT(width=128, depth=4, num_heads=4, micro_conditions=[MicroCondition.FPS] if micro else None),
        HashedTextConditioner(width=64, depth=1, num_heads=4, caption_dropout=0.1),
        RectifiedFlow(shift=3.0, prediction=FlowPrediction.CLEAN),
        learning_rate=2e-3, warmup_steps=100, cosine_decay=False, fused_optimizer=True, sampling_steps=25, guidance_scale=4.0,
    )


def train(model: VideoDiffusion, steps: int, batch_size: int) -> tuple[float, EMACallback]:
    data = SyntheticVideoDataModule(num_samples=steps * batch_size, sizes=[CLIP], speed=1, fps=8.0,
                                    frame_rates=FRAME_RATES, batch_size=batch_size, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[ema := EMACallback(decay=0.995)])
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start, ema


def denoising_loss(model: VideoDiffusion, videos: list[torch.Tensor], captions: list[str], fps: list[float],
                   repeats: int) -> float:
    """Mean training loss of the EMA weights with these frame rates (same timesteps and noise for every call)."""
    denoiser, conditioner = model.denoiser, model.conditioner  # the EMA weights while train() has them swapped in
    clean = model.encode(videos)
    cond = conditioner(captions)
    if denoiser.micro_conditions:
        cond = cond.with_micro_conditions(MicroConditions.build(fps, [tuple(v.shape[-2:]) for v in videos]))
    total = 0.0
    for seed in range(repeats):
        generator = torch.Generator().manual_seed(seed)
        total += model.sampler.training_loss(lambda x, t: denoiser(x, t, cond), clean, generator).mean().item()
    return total / repeats


def generated_speed(model: VideoDiffusion, captions: list[str], fps: float, steps: int) -> dict:
    outputs = model.generate(captions, [CLIP] * len(captions), list(range(len(captions))), steps=steps,
                             fps=[fps] * len(captions))
    tracks = [track_object(video) for video in outputs]
    speeds = [float(torch.tensor(t.velocity).norm()) for t in tracks if t.visible_frames >= 2]
    return {"mean_speed_px_per_frame": round(sum(speeds) / max(len(speeds), 1), 3), "tracked_clips": len(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clips", type=int, default=64, help="held-out clips (half at each rate)")
    parser.add_argument("--loss-repeats", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()

    held_out = SyntheticMovingShapes(args.clips, [CLIP], speed=1, fps=8.0, frame_rates=FRAME_RATES, seed=987654)
    items = [held_out[i] for i in range(args.clips)]
    videos, captions = [item["video"] for item in items], [item["caption"] for item in items]
    true_fps = [item["fps"] for item in items]
    swapped_fps = [FRAME_RATES[1] if r == FRAME_RATES[0] else FRAME_RATES[0] for r in true_fps]
    data_speed = {f"{r:g}": held_out.pixel_steps[i] for i, r in enumerate(FRAME_RATES)}

    results = {}
    for name, micro in (("fps_conditioned", True), ("baseline", False)):
        model = build(micro)
        fit_s, ema = train(model, args.steps, args.batch_size)
        model.eval()
        with torch.no_grad(), ema.averaged_weights(model):
            report = {
                "fit_s": round(fit_s, 1),
                "denoising_loss_true_fps": round(denoising_loss(model, videos, captions, true_fps,
                                                                args.loss_repeats), 5),
                "denoising_loss_swapped_fps": round(denoising_loss(model, videos, captions, swapped_fps,
                                                                   args.loss_repeats), 5),
            }
            report["swapped_vs_true"] = round(report["denoising_loss_swapped_fps"]
                                              / report["denoising_loss_true_fps"] - 1, 4)
            prompts = captions[: args.clips // 2]
            report["generated"] = {f"{r:g}fps": generated_speed(model, prompts, r, args.sampling_steps)
                                   for r in FRAME_RATES}
        results[name] = report
        print(name, json.dumps(report), flush=True)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    output = {
        "benchmark": "micro_conditions",
        "command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/micro_conditions.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": "cpu"},
        "commit": commit,
        "train": {"steps": args.steps, "batch_size": args.batch_size, "clip": CLIP, "frame_rates": FRAME_RATES},
        "data_speed_px_per_frame": data_speed,
        "held_out": {"clips": args.clips, "seed": 987654, "loss_repeats": args.loss_repeats,
                     "sampling_steps": args.sampling_steps},
        "results": results,
        "note": "CPU, 2 cores shared with other jobs; timings are noisy",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
