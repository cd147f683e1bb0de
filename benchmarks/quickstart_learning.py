"""Has the quickstart model learned the synthetic task? Colour AND direction of motion, trained vs untrained.

Runs the README's quickstart (``kinetoscope fit`` then ``kinetoscope predict`` on configs/quickstart.yaml) and
times it, then generates one clip for every (colour, shape, direction) caption at three sizes (1:1, 3:2, 2:3),
with both the trained checkpoint and the same architecture untrained (chance level), and scores each clip with
``framework.metrics.motion_probe``: the detected object colour and the direction of its fitted motion must match the
caption. Also reports how steadily the object moves (monotonic steps) and how much its area flickers.

    python benchmarks/quickstart_learning.py            # train + evaluate, writes benchmarks/results/quickstart_learning.json
    python benchmarks/quickstart_learning.py --skip-train   # evaluate the existing runs/quickstart checkpoint
    python benchmarks/quickstart_learning.py --run-dir /tmp/qs [--skip-train]   # the run (its checkpoints) elsewhere
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from framework.training.ema import load_averaged_weights
from framework.cli.lightning_cli import cli_main
from framework.cli.run_paths import last_checkpoint_folders, last_checkpoints
from framework.data.synthetic import BACKGROUND_COLOURS, DIRECTIONS, OBJECT_COLOURS, SHAPES
from framework.metrics.motion_probe import score_clip

ROOT = Path(__file__).resolve().parents[1]


def run_quickstart(config: Path, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    timings = {}
    for name, args in (("fit", ["fit", "-c", str(config)]),
                       ("predict", ["predict", "-c", str(config), "--ckpt_path", "last"])):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "framework.cli.main", *args, "--trainer.enable_progress_bar=false",
                        f"--trainer.default_root_dir={run_dir}"],  # the whole run, checkpoints included, goes there
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        timings[f"{name}_s"] = round(time.perf_counter() - start, 1)
    timings["total_s"] = round(timings["fit_s"] + timings["predict_s"], 1)
    return timings


def evaluation_prompts(sizes: list[tuple[int, int, int]]) -> list[tuple[str, tuple[int, int, int], int]]:
    backgrounds = list(BACKGROUND_COLOURS)
    prompts = []
    for i, (colour, shape, direction) in enumerate(itertools.product(OBJECT_COLOURS, SHAPES, DIRECTIONS)):
        caption = f"a {colour} {shape} moving {direction} on a {backgrounds[i % len(backgrounds)]} background"
        for j, size in enumerate(sizes):
            prompts.append((caption, size, 1000 + 10 * i + j))
    return prompts


def evaluate(model, prompts, batch_size: int = 24) -> dict:
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        videos = model.generate([p[0] for p in chunk], [p[1] for p in chunk], [p[2] for p in chunk])
        scores += [score_clip(v, caption) for v, (caption, _, _) in zip(videos, chunk)]
    n = len(scores)
    mean = lambda key: sum(float(s[key]) for s in scores) / n
    by_size = {}
    for (caption, size, _), s in zip(prompts, scores):
        by_size.setdefault("x".join(map(str, size)), []).append(s["both_ok"])
    return {
        "clips": n,
        "colour_accuracy": round(mean("colour_ok"), 4),
        "direction_accuracy": round(mean("direction_ok"), 4),
        "colour_and_direction_accuracy": round(mean("both_ok"), 4),
        "mean_monotonic_fraction": round(mean("monotonic_fraction"), 4),
        "mean_area_cv": round(mean("area_cv"), 4),
        "both_ok_by_size_TxHxW": {k: round(sum(v) / len(v), 4) for k, v in by_size.items()},
    }


def build_model(config: Path, checkpoint: Path | None):
    cli = cli_main(["-c", str(config), "--trainer.logger=false"], run=False)
    model = cli.model
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.on_load_checkpoint(state)  # a former in-module EMA (ema.*) moves to the EMACallback state
        model.load_state_dict(state["state_dict"])
        load_averaged_weights(model, state)  # generate with the EMA weights, as predict does
    return model.eval()


def last_checkpoint(config: Path, run_dir: Path) -> Path:
    """The checkpoint ``kinetoscope predict --ckpt_path last`` would load for the run in ``run_dir`` (the newest
    ``last*.ckpt``, found by the CLI's own lookup); exits naming the folder when there is none."""
    cli = cli_main(["-c", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={run_dir}"], run=False)
    found = last_checkpoints(cli.trainer)
    if not found:
        raise SystemExit(f"quickstart_learning: no last*.ckpt in {', '.join(last_checkpoint_folders(cli.trainer))}; "
                         "train first (without --skip-train) or point --run-dir at a trained run")
    return Path(max(found, key=os.path.getmtime))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart.yaml")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs/quickstart")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/quickstart_learning.json")
    args = parser.parse_args()

    timings = None if args.skip_train else run_quickstart(args.config, args.run_dir)
    checkpoint = last_checkpoint(args.config, args.run_dir)
    print(f"scoring {checkpoint}", flush=True)
    sizes = [(8, 16, 16), (8, 16, 24), (8, 24, 16)]
    prompts = evaluation_prompts(sizes)
    L.seed_everything(0, verbose=False)
    untrained = evaluate(build_model(args.config, None), prompts)
    trained = evaluate(build_model(args.config, checkpoint), prompts)
    result = {
        "benchmark": "quickstart_learning",
        "command": "python benchmarks/quickstart_learning.py",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "device": "cpu"},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "config": str(args.config.relative_to(ROOT)),
        "checkpoint": str(checkpoint),
        "quickstart_timing": timings,
        "chance": {"colour_accuracy": round(1 / len(OBJECT_COLOURS), 4),
                   "direction_accuracy": round(1 / len(DIRECTIONS), 4),
                   "colour_and_direction_accuracy": round(1 / (len(OBJECT_COLOURS) * len(DIRECTIONS)), 4)},
        "untrained": untrained,
        "trained": trained,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
