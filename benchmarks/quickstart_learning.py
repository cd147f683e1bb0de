"""Has the quickstart model learned the synthetic task? Colour, direction of motion and shape, over several seeds.

Runs the README's quickstart (``kinetoscope fit`` then ``kinetoscope predict`` on configs/quickstart.yaml) once per
seed, each in its own run directory (``<run-dir>/seed<N>``, with ``--seed_everything N``), and times it (wall and CPU
time of the fit, with the system load around it). Then, per seed, it generates one clip for every
(colour, shape, direction) caption at three sizes (1:1, 3:2, 2:3), with both the trained checkpoint and the same
architecture untrained (chance level), and scores each clip with ``framework.metrics.motion_probe``: the detected
object colour, the direction of its fitted motion and its shape (square vs circle) must match the caption. Also
reports how steadily the object moves (monotonic steps) and how much its area flickers. The summary gives the mean,
minimum and maximum over the seeds; one run cannot carry a headline (training on CPU is deterministic per machine,
but a different seed or CPU gives a different run).

    python benchmarks/quickstart_learning.py                  # seeds 0 1 2: train + evaluate
    python benchmarks/quickstart_learning.py --seeds 0 1 2 3  # more seeds
    python benchmarks/quickstart_learning.py --skip-train     # evaluate the existing runs/quickstart_learning/seed<N>

Each run writes a new file under benchmarks/results/quickstart_learning/ (``benchmarks/results_store.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_store import RESULTS, save_result  # noqa: E402

from framework.cli.lightning_cli import cli_main  # noqa: E402
from framework.data.synthetic import BACKGROUND_COLOURS, DIRECTIONS, OBJECT_COLOURS, SHAPES  # noqa: E402
from framework.metrics.motion_probe import score_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMING_FILE = "quickstart_timing.json"  # written into each seed's run dir, read back by --skip-train


def _run_timed(args: list[str], cwd: Path, threads: int | None) -> dict:
    """Run one CLI command in ``cwd``: its wall time, its own CPU time (user + system, from wait4, so parallel runs
    do not mix) and the 1-minute load average before and after (the machine may be shared)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the child
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(cwd / "kinetoscope_stderr.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "framework.cli.main", *args, "--trainer.enable_progress_bar=false"],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (cwd / "kinetoscope_stderr.log").read_text()[-3000:]
        raise RuntimeError(f"`kinetoscope {' '.join(args)}` in {cwd} failed:\n{tail}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2)}


def run_quickstart(config: Path, seed_dir: Path, seed: int, threads: int | None) -> dict:
    """fit, then predict from its last checkpoint, in ``seed_dir``: the config's relative paths (runs/quickstart/...)
    land under it, so seeds never share a checkpoint. The timings are also written to ``seed_dir``."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    timings: dict = {"seed": seed, "threads": threads}
    for name, args in (("fit", ["fit", "-c", str(config), f"--seed_everything={seed}"]),
                       ("predict", ["predict", "-c", str(config), f"--seed_everything={seed}", "--ckpt_path", "last"])):
        timings[name] = _run_timed(args, seed_dir, threads)
    (seed_dir / TIMING_FILE).write_text(json.dumps(timings, indent=2) + "\n")
    return timings


def evaluation_prompts(sizes: list[tuple[int, int, int]]) -> list[tuple[str, tuple[int, int, int], int]]:
    backgrounds = list(BACKGROUND_COLOURS)
    prompts = []
    for i, (colour, shape, direction) in enumerate(itertools.product(OBJECT_COLOURS, SHAPES, DIRECTIONS)):
        caption = f"a {colour} {shape} moving {direction} on a {backgrounds[i % len(backgrounds)]} background"
        for j, size in enumerate(sizes):
            prompts.append((caption, size, 1000 + 10 * i + j))
    return prompts


def evaluate(model, prompts, object_size: int, batch_size: int = 24) -> dict:
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        videos = model.generate([p[0] for p in chunk], [p[1] for p in chunk], [p[2] for p in chunk])
        scores += [score_clip(v, caption, object_size=object_size) for v, (caption, _, _) in zip(videos, chunk)]
    n = len(scores)
    mean = lambda key: sum(float(s[key]) for s in scores) / n
    by_size, by_direction = {}, {}
    for (caption, size, _), s in zip(prompts, scores):
        by_size.setdefault("x".join(map(str, size)), []).append(s["direction_ok"])
        by_direction.setdefault(s["expected_direction"], []).append(s["direction"])
    return {
        "clips": n,
        "colour_accuracy": round(mean("colour_ok"), 4),
        "direction_accuracy": round(mean("direction_ok"), 4),
        "shape_accuracy": round(mean("shape_ok"), 4),
        "colour_and_direction_accuracy": round(mean("both_ok"), 4),
        "mean_monotonic_fraction": round(mean("monotonic_fraction"), 4),
        "mean_area_cv": round(mean("area_cv"), 4),
        "direction_accuracy_by_size_TxHxW": {k: round(sum(v) / len(v), 4) for k, v in by_size.items()},
        # what the probe saw for each captioned direction (None: no object, static: no motion)
        "detected_direction_by_caption": {
            k: {str(d): v.count(d) for d in sorted(set(v), key=str)} for k, v in by_direction.items()},
    }


def build_model(config: Path, seed: int, checkpoint: Path | None):
    cli = cli_main(["-c", str(config), "--trainer.logger=false", f"--seed_everything={seed}"], run=False)
    model = cli.model
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
    return model.eval(), cli.datamodule.dataset.object_size


def summary(per_seed: list[dict], key: str) -> dict:
    values = [run[key] for run in per_seed]
    return {"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values), "runs": len(values)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart.yaml")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs/quickstart_learning",
                        help="each seed trains in <run-dir>/seed<N>")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full training run per seed")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fits run at once (default 1: the fit times are then those of the README job)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per fit (default: torch's own)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the checkpoints already in --run-dir")
    parser.add_argument("--sizes", default="8x16x16,8x16x24,8x24x16",
                        help="generated sizes TxHxW, comma-separated: one clip per caption at each")
    parser.add_argument("--no-untrained", action="store_true",
                        help="score only the trained checkpoints (the untrained model depends only on config and seed)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = args.config.resolve()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the evaluation here too

    seed_dirs = {seed: (args.run_dir / f"seed{seed}").resolve() for seed in args.seeds}
    if not args.skip_train:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda seed: run_quickstart(config, seed_dirs[seed], seed, args.threads), args.seeds))

    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    prompts = evaluation_prompts(sizes)
    per_seed = []
    for seed, seed_dir in seed_dirs.items():
        checkpoints = sorted(seed_dir.glob("**/checkpoints/last.ckpt"))
        if len(checkpoints) != 1:
            raise SystemExit(f"{seed_dir}: expected one checkpoints/last.ckpt from the fit, found {len(checkpoints)}"
                             " (run without --skip-train to train it)")
        timing_file = seed_dir / TIMING_FILE
        L.seed_everything(seed, verbose=False)
        model, object_size = build_model(config, seed, None)
        untrained = None if args.no_untrained else evaluate(model, prompts, object_size)
        model, object_size = build_model(config, seed, checkpoints[0])
        trained = evaluate(model, prompts, object_size)
        per_seed.append({"seed": seed, "run_dir": str(seed_dir),
                         "timing": json.loads(timing_file.read_text()) if timing_file.exists() else None,
                         "untrained": untrained, "trained": trained})
        print(f"seed {seed}: direction {trained['direction_accuracy']:.3f} shape {trained['shape_accuracy']:.3f} "
              f"colour {trained['colour_accuracy']:.3f}", flush=True)

    metrics = ("colour_accuracy", "direction_accuracy", "shape_accuracy", "colour_and_direction_accuracy")
    result = {
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "seeds": args.seeds,
        "sizes_TxHxW": args.sizes.split(","),
        "chance": {"colour_accuracy": round(1 / len(OBJECT_COLOURS), 4),
                   "direction_accuracy": round(1 / len(DIRECTIONS), 4),
                   "shape_accuracy": round(1 / len(SHAPES), 4),
                   "colour_and_direction_accuracy": round(1 / (len(OBJECT_COLOURS) * len(DIRECTIONS)), 4)},
        "trained": {key: summary([run["trained"] for run in per_seed], key) for key in metrics},
        "untrained": None if args.no_untrained else {
            key: summary([run["untrained"] for run in per_seed], key) for key in metrics},
        "per_seed": per_seed,
    }
    path = save_result("quickstart_learning", result, args.results_dir)
    print(json.dumps({k: result[k] for k in ("trained", "untrained")}, indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
