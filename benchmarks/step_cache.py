"""Step caches, cached vs uncached: sampling speed-up and PSNR to the uncached videos, same prompts, seeds and steps.

Two models: the quickstart model from a checkpoint (``--ckpt``, e.g. ``runs/quickstart/checkpoints/last.ckpt`` after
``kinetoscope fit -c configs/quickstart.yaml``; its EMA average is used when the checkpoint holds one) and a larger
randomly initialised DiT (``--large-preset``, weights drawn off the adaLN-Zero init so every block does work).
Every configuration generates the same prompts with the same seeds; runs are interleaved (uncached, cache A,
cache B, ..., repeated) because the CPU is shared, and the ratio of median times is the speed-up, with every run
kept. PSNR is over the decoded videos in [-1, 1] (peak-to-peak 2), per video, against the uncached video.

    python benchmarks/step_cache.py --ckpt runs/quickstart/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_store import save_result  # noqa: E402
from framework.core.interfaces import Denoiser  # noqa: E402
from framework.generation.pipeline import GenerationPipeline  # noqa: E402
from plugins.denoisers.step_cache import FirstBlockCache, TimestepEmbeddingCache  # noqa: E402

CAPTIONS = ["a red square moving right on a black background", "a green circle moving left on a white background",
            "a blue square moving down on a gray background", "a yellow circle moving up on a black background"]


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float((video - reference).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def with_denoiser(pipe: GenerationPipeline, denoiser: Denoiser) -> GenerationPipeline:
    return GenerationPipeline(pipe.compressor, pipe.patcher, denoiser, pipe.conditioner, pipe.sampler,
                              pipe.frame_embedding, sampling_steps=pipe.sampling_steps,
                              guidance_scale=pipe.guidance_scale, guidance_rescale=pipe.guidance_rescale,
                              output_fps=pipe.output_fps)


def compare(pipe: GenerationPipeline, caches: dict[str, Denoiser], size: tuple[int, int, int], steps: int,
            runs: int) -> dict:
    """Generate the prompts uncached and with each cache, ``runs`` times interleaved -> times, speed-ups, PSNR."""
    pipes = {"uncached": pipe, **{name: with_denoiser(pipe, cache) for name, cache in caches.items()}}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    videos, skip = {}, {}
    seeds = list(range(len(CAPTIONS)))
    for _ in range(runs):
        for name, p in pipes.items():
            skipped = calls = 0
            start = time.perf_counter()
            out = []
            for caption, seed in zip(CAPTIONS, seeds):  # one prompt at a time, as predict runs them
                out += p.generate([caption], [size], [seed], steps=steps)
                if name != "uncached":
                    skipped, calls = skipped + p.denoiser.state.skipped, calls + p.denoiser.state.calls
            times[name].append(time.perf_counter() - start)
            videos[name] = out
            skip[name] = skipped / calls if calls else 0.0
    base = statistics.median(times["uncached"])
    result = {}
    for name in pipes:
        scores = [psnr(v, r) for v, r in zip(videos[name], videos["uncached"])]
        result[name] = {
            "times_s": [round(t, 3) for t in times[name]], "median_s": round(statistics.median(times[name]), 3),
            "speedup": round(base / statistics.median(times[name]), 3), "skipped_call_share": round(skip[name], 3),
            "psnr_db_per_video": [round(s, 2) for s in scores],
            "psnr_db_min": round(min(scores), 2),
        }
        print(f"  {name:40s} {result[name]['median_s']:7.2f} s  x{result[name]['speedup']:.2f}  "
              f"skipped {skip[name]:.0%}  PSNR min {min(scores):.1f} dB", flush=True)
    return result


def caches_for(denoiser: Denoiser, fbc: list[float], tea: list[float], warmup: int) -> dict[str, Denoiser]:
    out: dict[str, Denoiser] = {}
    for th in fbc:
        out[f"FirstBlockCache(threshold={th})"] = FirstBlockCache(denoiser, threshold=th, warmup_steps=warmup)
    for th in tea:
        out[f"TimestepEmbeddingCache(threshold={th})"] = TimestepEmbeddingCache(denoiser, threshold=th,
                                                                                  warmup_steps=warmup)
    return out


def quickstart(ckpt: Path):
    from framework.core.registry import default_registry
    from framework.modules import VideoDiffusion
    from framework.training.ema import load_averaged_weights

    default_registry()
    model = VideoDiffusion.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    ema = load_averaged_weights(model, torch.load(ckpt, map_location="cpu", weights_only=True))
    return model.eval(), ema


def large_random(preset: str):
    from framework.core.interfaces import DenoiserIO
    from framework.layers.presets import Preset
    from plugins.compressors.pixel import PixelCompressor
    from plugins.conditioners.hashed_text import HashedTextConditioner
    from plugins.denoisers.dit import DiT
    from plugins.patchers.spacetime import SpacetimePatcher
    from plugins.samplers.rectified_flow import RectifiedFlow

    torch.manual_seed(0)
    compressor, patcher = PixelCompressor(), SpacetimePatcher(patch_t=1, patch_h=4, patch_w=4)
    conditioner, denoiser = HashedTextConditioner(width=64, depth=1, num_heads=4), DiT(preset=Preset[preset])
    denoiser.bind(DenoiserIO(patcher.token_dim(3), conditioner.context_dim, conditioner.pooled_dim))
    with torch.no_grad():
        for p in denoiser.parameters():  # off the adaLN-Zero init (where every block is the identity)
            p.normal_(0.0, 0.02)
    return GenerationPipeline(compressor, patcher, denoiser.eval(), conditioner.eval(), RectifiedFlow(shift=3.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a quickstart checkpoint")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fbc", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument("--tea", type=float, nargs="*", default=[0.1, 0.3, 0.6])
    parser.add_argument("--large-preset", default="S")
    parser.add_argument("--large-size", type=int, nargs=3, default=[8, 32, 32])
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    if not args.ckpt.is_file():
        sys.exit(f"step_cache: no checkpoint at {args.ckpt} (train one: kinetoscope fit -c configs/quickstart.yaml)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    payload: dict = {"steps": args.steps, "runs": args.runs, "warmup_steps": args.warmup, "prompts": CAPTIONS}

    model, ema = quickstart(args.ckpt)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    print(f"quickstart ({args.ckpt}, step {ckpt['global_step']}, EMA: {ema}), 8x16x16:")
    pipe = model.pipeline()
    payload["quickstart"] = {"checkpoint": str(args.ckpt), "global_step": ckpt["global_step"], "ema": ema,
                             "size": [8, 16, 16], "results": compare(
                                 pipe, caches_for(model.denoiser, args.fbc, args.tea, args.warmup), (8, 16, 16),
                                 args.steps, args.runs)}
    if not args.skip_large:
        large = large_random(args.large_preset)
        size = tuple(args.large_size)
        print(f"random DiT-{args.large_preset}, {size}:")
        payload["large_random"] = {"preset": args.large_preset, "size": list(size), "results": compare(
            large, caches_for(large.denoiser, args.fbc, args.tea, args.warmup), size, args.steps, args.runs)}
    print(save_result("step_cache", payload))


if __name__ == "__main__":
    main()
