"""Scaling study: held-out diffusion loss vs counted training compute over a ladder of model sizes.

The seed's claim is that quality improves with training compute. This trains a ladder of denoisers (tiny versions
of the S/B/L/XL presets, scaled down so the whole sweep runs on a CPU in minutes) with the same recipe on the
built-in synthetic dataset and records, every ``--eval-every`` steps, the rectified-flow loss on a held-out set
(fixed clips, timesteps and noise, so every model and step is scored on identical problems) against the training
FLOPs spent so far. FLOPs are counted with ``framework.training.flop_count`` (PyTorch's FlopCounterMode plus the CPU
attention kernel it misses) on one real training step (forward + backward; the optimizer's elementwise work is
left out), not estimated from a formula.

    pip install matplotlib   # for the plot
    python benchmarks/scaling_study.py                      # writes benchmarks/results/scaling_study.{json,png}
    python benchmarks/scaling_study.py --denoiser STDiT     # same sweep for another architecture

The learning rate is the same for every size (not tuned per size), which favours the small models; the study shows
the loss-vs-compute frontier of this recipe, not tuned scaling laws.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from framework.data.datamodules import collate_videos
from framework.data.synthetic import SyntheticMovingShapes
from framework.training.flop_count import counting_mode
from framework.core.interfaces import Denoiser
from framework.modules import VideoDiffusion
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.denoisers.mmdit import MMDiT
from plugins.denoisers.st_dit import STDiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow

ROOT = Path(__file__).resolve().parents[1]
# (name, width, depth, heads): the presets' ladder (S < B < L < XL grows width and depth) at CPU scale;
# head size 16 throughout, as the presets keep head size near 64.
LADDER = [("tiny-S", 32, 2, 2), ("tiny-B", 48, 3, 3), ("tiny-L", 64, 4, 4), ("tiny-XL", 96, 4, 6)]
DENOISERS: dict[str, type[Denoiser]] = {"DiT": DiT, "STDiT": STDiT, "MMDiT": MMDiT}
CLIP_SIZE = (8, 16, 16)  # one clip size, so every step costs the same FLOPs


def build(denoiser: str, width: int, depth: int, heads: int) -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(patch_t=1, patch_h=4, patch_w=4),
        DENOISERS[denoiser](width=width, depth=depth, num_heads=heads),
        HashedTextConditioner(width=32, depth=1, num_heads=2, caption_dropout=0.1),
        RectifiedFlow(shift=3.0),
    )


def batch_loss(module: VideoDiffusion, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    clean = module.encode(batch["videos"])
    cond = module.conditioner(batch["captions"])
    return module.sampler.training_loss(lambda x, t: module.denoiser(x, t, cond), clean, generator).mean()


def training_flops(module: VideoDiffusion, batch: dict) -> int:
    with counting_mode() as counter:
        batch_loss(module, batch, torch.Generator().manual_seed(0)).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def held_out_loss(module: VideoDiffusion, batches: list[dict], seeds: int) -> float:
    module.eval()
    losses = [batch_loss(module, b, torch.Generator().manual_seed(s)).item() for b in batches for s in range(seeds)]
    module.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--denoiser", choices=sorted(DENOISERS), default="DiT")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling_study.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_set = SyntheticMovingShapes(num_samples=args.steps * args.batch_size, sizes=[CLIP_SIZE], seed=0)
    eval_set = SyntheticMovingShapes(num_samples=args.eval_clips, sizes=[CLIP_SIZE], seed=12345)
    eval_batches = [collate_videos([eval_set[i] for i in range(j, min(j + 8, len(eval_set)))])
                    for j in range(0, len(eval_set), 8)]

    runs = []
    for name, width, depth, heads in LADDER:
        module = build(args.denoiser, width, depth, heads).train()
        first = collate_videos([train_set[i] for i in range(args.batch_size)])
        flops_per_step = training_flops(module, first)
        params = sum(p.numel() for p in module.denoiser.parameters())
        params_trained = [p for p in module.trained_modules().parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params_trained, lr=args.learning_rate, betas=(0.9, 0.99))
        warmup = max(1, args.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        curve = [{"step": 0, "train_flops": 0, "held_out_loss": held_out_loss(module, eval_batches, args.eval_seeds)}]
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            indices = range((step - 1) * args.batch_size, step * args.batch_size)
            loss = batch_loss(module, collate_videos([train_set[i] for i in indices]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params_trained, 1.0)
            optimizer.step()
            schedule.step()
            if step % args.eval_every == 0 or step == args.steps:
                curve.append({"step": step, "train_flops": step * flops_per_step,
                              "held_out_loss": held_out_loss(module, eval_batches, args.eval_seeds)})
        seconds = time.perf_counter() - start
        run = {"name": name, "width": width, "depth": depth, "num_heads": heads, "denoiser_parameters": params,
               "train_flops_per_step": flops_per_step, "train_seconds": round(seconds, 1), "curve": curve}
        runs.append(run)
        print(f"{name:8s} params {params:8d}  GFLOPs/step {flops_per_step / 1e9:7.3f}  "
              f"held-out loss {curve[0]['held_out_loss']:.4f} -> {curve[-1]['held_out_loss']:.4f}  ({seconds:.0f} s)")

    finals = [r["curve"][-1]["held_out_loss"] for r in runs]
    # the compute frontier: the lowest loss reached by any model within each compute budget
    points = sorted((p["train_flops"], p["held_out_loss"], r["name"]) for r in runs for p in r["curve"][1:])
    frontier, best = [], float("inf")
    for flops, loss, name in points:
        if loss < best:
            best = loss
            frontier.append({"train_flops": flops, "held_out_loss": loss, "model": name})
    result = {
        "what": "held-out rectified-flow loss vs counted training FLOPs over a ladder of model sizes, same recipe",
        "command": f"python benchmarks/scaling_study.py --denoiser {args.denoiser} --steps {args.steps}",
        "device": "cpu", "threads": args.threads,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"clip_size": CLIP_SIZE},
        "runs": runs, "compute_frontier": frontier,
        "final_loss_decreases_with_size": all(a > b for a, b in zip(finals, finals[1:])),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"final losses {[round(f, 4) for f in finals]}; decreasing with size: "
          f"{result['final_loss_decreases_with_size']}; wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in result["runs"]:
        pts = run["curve"][1:]
        ax.plot([p["train_flops"] for p in pts], [p["held_out_loss"] for p in pts], marker="o", markersize=3,
                label=f"{run['name']} ({run['denoiser_parameters'] / 1e3:.0f}k params)")
    frontier = result["compute_frontier"]
    ax.plot([p["train_flops"] for p in frontier], [p["held_out_loss"] for p in frontier], "k--", lw=1,
            label="compute frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (counted, forward + backward)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{result['config']['denoiser']} on synthetic clips {tuple(result['config']['clip_size'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
