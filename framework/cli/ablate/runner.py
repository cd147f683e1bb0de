"""Running an ablation: the plan (axes x seeds), each run's resolved config, one ``kinetoscope fit`` subprocess per run
that is not finished with that config, and its evaluation (``done.json``)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from framework.cli.ablate.overlays import OverlayError, compose, load_yaml
from framework.cli.ablate.report import METRICS, last_logged, read_loss_curve, write_report

DONE_MARKER = "done.json"


def redirect_outputs(config: dict, run_dir: Path, seed: int) -> dict:
    """Point every output of ``config`` into ``run_dir`` (logger, checkpoints, samples) and set the seed."""
    config = copy.deepcopy(config)
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "logs", "version": 0},
    }
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") or {}
        for key in ("dirpath", "output_dir"):
            if key in init_args:
                init_args[key] = str(run_dir / Path(str(init_args[key])).name)
    return config



# ------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class RunSpec:
    combination: dict[str, str]  # axis -> overlay name
    overlays: tuple[Path, ...]
    seed: int

    @property
    def name(self) -> str:
        combo = "__".join(f"{axis}-{choice}" for axis, choice in self.combination.items()) or "base"
        return f"{combo}__seed{self.seed}"

    @property
    def combination_name(self) -> str:
        return " / ".join(f"{axis}={choice}" for axis, choice in self.combination.items()) or "base"


def axis_overlays(axis_dir: Path) -> list[Path]:
    overlays = sorted(Path(axis_dir).glob("*.yaml")) + sorted(Path(axis_dir).glob("*.yml"))
    if not overlays:
        raise OverlayError(f"axis folder {axis_dir} has no *.yaml overlay files")
    return overlays


def plan_runs(axes: list[Path], seeds: list[int]) -> list[RunSpec]:
    """The cartesian product of the axes' overlays, once per seed."""
    names = [Path(axis).name for axis in axes]
    if len(set(names)) != len(names):
        raise OverlayError(f"axis folders must have distinct names, got {', '.join(map(str, axes))}")
    per_axis = [[(Path(axis).name, overlay) for overlay in axis_overlays(axis)] for axis in axes]
    runs = []
    for choice in itertools.product(*per_axis):
        for seed in seeds:
            runs.append(RunSpec({axis: overlay.stem for axis, overlay in choice},
                                tuple(overlay for _, overlay in choice), seed))
    return runs


# ------------------------------------------------------------------------------------------------------- run
@dataclass
class AblationSettings:
    base: Path
    axes: list[Path]
    seeds: list[int]
    output: Path
    probe_clips: int = 4
    extra_args: list[str] = field(default_factory=list)  # given to every `fit` (e.g. --trainer.max_steps=50)


def resolved_config(config: dict, extra_args: list[str], staging: Path) -> str:
    """The full config ``kinetoscope fit -c <config> <extra_args>`` trains (every default filled in, plugin names
    resolved), as ``--print_config`` writes it: what a finished run is keyed by, and what its subprocess trains."""
    from framework.cli.lightning_cli import cli_main

    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text(yaml.safe_dump(config, sort_keys=False))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI's notes on args/sys.argv and deprecations, once per run
            cli_main(["fit", "-c", str(staging), *extra_args, "--trainer.enable_progress_bar=false", "--print_config"])
    except SystemExit as exit:
        if exit.code not in (0, None):  # the parser has printed why
            raise OverlayError(f"the config composed for {staging.stem} does not parse with the arguments after "
                               f"`--` ({' '.join(extra_args) or 'none'}); the error is above") from None
    finally:
        staging.unlink(missing_ok=True)
    return printed.getvalue()


def run_digest(config_text: str, probe_clips: int) -> str:
    """What a finished run is keyed by: its resolved config and how many clips its probe scored."""
    return hashlib.sha256(f"{config_text}\n# probe_clips: {probe_clips}\n".encode("utf-8")).hexdigest()


def run_ablation(settings: AblationSettings, log=print) -> list[dict]:
    """Run every (combination, seed) not finished with its current resolved config, then write the CSV, Markdown
    table and plots. A run is skipped only when its ``done.json`` was written for the same resolved config (the
    composed overlays plus the arguments after ``--``): a changed override trains it again."""
    base = load_yaml(settings.base)
    runs = plan_runs(settings.axes, settings.seeds)
    configs = {run.name: compose(base, list(run.overlays)) for run in runs}  # every overlay error before any work
    results = []
    for index, run in enumerate(runs, 1):
        run_dir = settings.output / "runs" / run.name
        marker = run_dir / DONE_MARKER
        resolved = resolved_config(redirect_outputs(configs[run.name], run_dir, run.seed), settings.extra_args,
                                   settings.output / "runs" / f".{run.name}.composed.yaml")
        finished = json.loads(marker.read_text()) if marker.exists() else None
        if finished is not None and finished.get("run_sha256") == run_digest(resolved, settings.probe_clips):
            log(f"[{index}/{len(runs)}] {run.name}: done with this config, skipped")
        else:
            why = "config changed since it finished, training again" if finished is not None else "training"
            log(f"[{index}/{len(runs)}] {run.name}: {why}")
            if run_dir.exists():  # interrupted or stale: start over, so no old log rows mix into its curve
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(resolved)
            started = time.perf_counter()
            with open(run_dir / "fit.log", "w") as fit_log:
                process = subprocess.run(
                    [sys.executable, "-m", "framework.cli.ablate.runner", "--run-one", str(run_dir),
                     "--probe-clips", str(settings.probe_clips)],
                    stdout=fit_log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            if process.returncode != 0:
                tail = (run_dir / "fit.log").read_text()[-3000:]
                raise RuntimeError(f"ablation run {run.name} failed (exit {process.returncode}); "
                                   f"log: {run_dir / 'fit.log'}\n{tail}")
            result = json.loads(marker.read_text())
            log(f"    finished in {time.perf_counter() - started:.1f} s: final train loss "
                f"{result.get('final_train_loss')}")
        result = json.loads(marker.read_text())
        results.append({"run": run.name, "combination": run.combination_name, **run.combination, "seed": run.seed,
                        **{m: result.get(m) for m in METRICS}, "steps": result.get("steps"),
                        "wall_s": result.get("wall_s")})
    write_report(settings.output, list(runs[0].combination) if runs else [], results, settings.extra_args)
    return results


def probe_score(model, prompts, clips: int) -> dict[str, float] | None:
    """Mean motion-probe scores over ``clips`` generated clips, cycling through the prompts' captions; None when the
    captions are not synthetic ones (the probe needs a known colour and direction)."""
    from framework.metrics.motion_probe import parse_caption, score_clip

    captions = list(getattr(prompts, "captions", None) or [])
    if clips <= 0 or not captions:
        return None
    try:
        for caption in captions:
            parse_caption(caption)
    except ValueError:
        return None
    chosen = [captions[i % len(captions)] for i in range(clips)]
    size = (prompts.frames, prompts.height, prompts.width)
    videos = model.generate(chosen, [size] * clips, list(range(clips)))  # list of [3, T, H, W]
    scores = [score_clip(video, caption) for video, caption in zip(videos, chosen)]
    return {f"probe_{key}": sum(float(s[key]) for s in scores) / clips for key in ("both_ok", "colour_ok", "direction_ok")}


def run_one(run_dir: Path, probe_clips: int) -> None:
    """The subprocess side: fit ``run_dir/config.yaml`` (the resolved config), evaluate, then write ``done.json``
    atomically with the config's digest."""
    import torch

    from framework.cli.lightning_cli import cli_main
    from framework.training.ema import ema_weights

    started = time.perf_counter()
    config_text = (run_dir / "config.yaml").read_text()
    cli = cli_main(["fit", "-c", str(run_dir / "config.yaml")])
    result: dict[str, object] = {
        "run_sha256": run_digest(config_text, probe_clips),
        "steps": int(cli.trainer.global_step),
        "final_train_loss": last_logged(run_dir, "train/loss"),
        "final_val_loss": last_logged(run_dir, "val/loss"),
    }
    _, losses = read_loss_curve(run_dir)
    if losses:  # one batch's loss is noisy: the mean over the last quarter of the logged points is steadier
        tail = losses[-max(1, len(losses) // 4):]
        result["train_loss_last_quarter"] = sum(tail) / len(tail)
    if result["final_train_loss"] is None and "train/loss" in cli.trainer.callback_metrics:
        result["final_train_loss"] = float(cli.trainer.callback_metrics["train/loss"])
    prompts = getattr(cli.datamodule, "prompts", None)
    if prompts is not None and hasattr(cli.model, "generate"):
        torch.manual_seed(0)
        with ema_weights(cli.trainer, cli.model):  # the averaged weights, as predict would use
            result.update(probe_score(cli.model, prompts, probe_clips) or {})
    result["wall_s"] = round(time.perf_counter() - started, 2)
    temporary = run_dir / (DONE_MARKER + ".tmp")
    temporary.write_text(json.dumps(result, indent=2))
    os.replace(temporary, run_dir / DONE_MARKER)  # atomic: a crash leaves no half-written marker


def _run_one_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m framework.cli.ablate.runner --run-one")
    parser.add_argument("--run-one", type=Path, required=True)
    parser.add_argument("--probe-clips", type=int, default=4)
    args = parser.parse_args(argv)
    run_one(args.run_one, args.probe_clips)
    return 0


if __name__ == "__main__":
    sys.exit(_run_one_main(sys.argv[1:]))
