"""``kinetoscope ablate``: config-driven ablations — base config x overlay files per axis x seeds, with a report.

An *axis* is a folder of overlay YAML files (``configs/ablations/sampler/ddim.yaml``, ...); each overlay is a partial
config deep-merged onto the base config. Several axes give their cartesian product; every combination runs once per
seed. Each run is a ``kinetoscope fit`` in its own subprocess (``framework.cli.lightning_cli.cli_main``), followed by the
evaluation that is available without extra weights: the final train (and validation, if logged) loss from the
CSVLogger and, when the prompts are synthetic captions, the motion probe (``framework/metrics/motion_probe.py``) on a
few generated clips. Layout of the output folder::

    <output>/runs/<combination>__seed<k>/config.yaml    the composed config the run trained
    <output>/runs/<combination>__seed<k>/fit.log        the subprocess's stdout and stderr
    <output>/runs/<combination>__seed<k>/done.json      written atomically when the run finished: its results
    <output>/results.csv  results.json  results.md  loss_curves.png  metric_bars.png

A run whose ``done.json`` exists is skipped, so an interrupted ablation restarts where it stopped (a run that has a
folder but no ``done.json`` was interrupted and is trained again from scratch).

Overlays and ``class_path``: when an overlay changes a node's ``class_path`` (e.g. ``DDIM`` for ``RectifiedFlow``),
an overlay that gives ``init_args`` replaces the node's arguments; one that gives only ``class_path`` keeps the
base's ``init_args``, and any key the new class does not accept (or a misspelt key in the overlay) raises
``OverlayError`` naming the overlay file, the node and the keys: they are never silently passed to the wrong class.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import inspect
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"
RESULTS_JSON = "results.json"
LOSS_CURVES_PNG = "loss_curves.png"
METRIC_BARS_PNG = "metric_bars.png"
DONE_MARKER = "done.json"
METRICS = ("final_train_loss", "train_loss_last_quarter", "final_val_loss", "probe_both_ok", "probe_colour_ok",
           "probe_direction_ok")


class OverlayError(ValueError):
    """An overlay does not compose with the base config (unknown class, init_args the class does not accept)."""


# ------------------------------------------------------------------------------------------------ composition
def resolve_class(class_path: str) -> type:
    """A class from a full import path or a registered plugin's class name (``DDIM``), as the CLI resolves it."""
    from framework.core.registry import default_registry

    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise OverlayError(f"cannot import class_path {class_path!r}: {err}") from None
    matches = [info.cls for info in default_registry().list() if info.cls.__name__ == class_path]
    if not matches:
        names = sorted(info.cls.__name__ for info in default_registry().list())
        raise OverlayError(f"class_path {class_path!r} is neither an import path nor a plugin; plugins: {', '.join(names)}")
    return matches[0]


def accepted_init_args(cls: type) -> set[str] | None:
    """Names ``cls(...)`` accepts as keywords; None when it takes ``**kwargs`` (anything goes)."""
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def merge_overlay(base: object, overlay: object, source: Path, where: str = "") -> object:
    """Deep-merge ``overlay`` onto ``base`` (a new object; lists and scalars replace). Where the overlay changes a
    node's ``class_path``, its ``init_args`` (if given) replace the base's; ``init_args`` the new class does not
    accept, kept from the base or set by the overlay, raise ``OverlayError``."""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return copy.deepcopy(overlay)
    merged = copy.deepcopy(base)
    new_class = overlay.get("class_path")
    if new_class is not None and new_class != base.get("class_path"):
        cls = resolve_class(new_class)
        accepted = accepted_init_args(cls)
        replaces = "init_args" in overlay  # the overlay spells out the new class's arguments: the base's are dropped
        inherited = {} if replaces else dict(base.get("init_args") or {})
        given = dict(overlay.get("init_args") or {})
        if accepted is not None:
            stale = sorted(k for k in inherited if k not in accepted)
            unknown = sorted(k for k in given if k not in accepted)
            problems = []
            if stale:
                problems.append(f"would keep init_args {stale} of the base's {base.get('class_path')}")
            if unknown:
                problems.append(f"sets init_args {unknown}")
            if problems:
                raise OverlayError(
                    f"overlay {source}: at {where or '<root>'} class_path {new_class} "
                    f"{' and '.join(problems)}, which {cls.__name__} does not accept "
                    f"(it takes: {', '.join(sorted(accepted)) or 'nothing'}); give this node its init_args in the overlay"
                )
        merged["class_path"] = new_class
        merged["init_args"] = {**inherited, **given}
        if not merged["init_args"]:
            del merged["init_args"]
        for key, value in overlay.items():
            if key not in ("class_path", "init_args"):
                merged[key] = merge_overlay(merged.get(key), value, source, f"{where}.{key}".lstrip("."))
        return merged
    for key, value in overlay.items():
        merged[key] = merge_overlay(merged.get(key), value, source, f"{where}.{key}".lstrip("."))
    return merged


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise OverlayError(f"cannot read {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OverlayError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def compose(base: dict, overlays: list[Path]) -> dict:
    """The base config with each overlay merged on in order; every ``init_args`` key checked against its class."""
    config = copy.deepcopy(base)
    for path in overlays:
        config = merge_overlay(config, load_yaml(path), path)
    check_init_args(config, overlays)
    return config


def check_init_args(node: object, overlays: list[Path], where: str = "") -> None:
    """Raise ``OverlayError`` for an ``init_args`` key its ``class_path`` does not accept (a typo in an overlay
    would otherwise only fail once that run's subprocess parses it, after other runs have trained)."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            check_init_args(item, overlays, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("class_path"), str) and isinstance(node.get("init_args"), dict):
        cls = resolve_class(node["class_path"])
        accepted = accepted_init_args(cls)
        unknown = sorted(k for k in node["init_args"] if accepted is not None and k not in accepted)
        if unknown:
            sources = ", ".join(str(p) for p in overlays) or "the base config"
            raise OverlayError(
                f"{where or '<root>'}: init_args {unknown} are not arguments of {node['class_path']} (it takes: "
                f"{', '.join(sorted(accepted or ()))}); composed from the base config and {sources}"
            )
    for key, value in node.items():
        check_init_args(value, overlays, f"{where}.{key}".lstrip("."))


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
    extra_args: list[str] = field(default_factory=list)  # appended to every `fit` (e.g. --trainer.max_steps=50)


def run_ablation(settings: AblationSettings, log=print) -> list[dict]:
    """Run every (combination, seed) not finished yet, then write the CSV, Markdown table and plots."""
    base = load_yaml(settings.base)
    runs = plan_runs(settings.axes, settings.seeds)
    configs = {run.name: compose(base, list(run.overlays)) for run in runs}  # every overlay error before any work
    results = []
    for index, run in enumerate(runs, 1):
        run_dir = settings.output / "runs" / run.name
        marker = run_dir / DONE_MARKER
        if marker.exists():
            log(f"[{index}/{len(runs)}] {run.name}: done, skipped")
        else:
            log(f"[{index}/{len(runs)}] {run.name}: training")
            if run_dir.exists():  # an interrupted run: start it over, so no stale log rows mix into its curve
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            config_path = run_dir / "config.yaml"
            config_path.write_text(yaml.safe_dump(redirect_outputs(configs[run.name], run_dir, run.seed), sort_keys=False))
            started = time.perf_counter()
            with open(run_dir / "fit.log", "w") as fit_log:
                process = subprocess.run(
                    [sys.executable, "-m", "framework.cli.ablate", "--run-one", str(run_dir),
                     "--probe-clips", str(settings.probe_clips), "--", *settings.extra_args],
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
    write_report(settings.output, runs, results)
    return results


def read_loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, train losses) from the run's CSVLogger metrics.csv."""
    metrics = run_dir / "logs" / "version_0" / "metrics.csv"
    steps, losses = [], []
    if metrics.exists():
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    steps.append(int(row["step"]))
                    losses.append(float(row["train/loss"]))
    return steps, losses


def last_logged(run_dir: Path, column: str) -> float | None:
    metrics = run_dir / "logs" / "version_0" / "metrics.csv"
    value = None
    if metrics.exists():
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    value = float(row[column])
    return value


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


def run_one(run_dir: Path, probe_clips: int, extra_args: list[str]) -> None:
    """The subprocess side: fit ``run_dir/config.yaml``, evaluate, then write ``done.json`` atomically."""
    import torch

    from framework.cli.lightning_cli import cli_main
    from framework.training.ema import ema_weights

    started = time.perf_counter()
    cli = cli_main(["fit", "-c", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false", *extra_args])
    result: dict[str, object] = {
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


# ---------------------------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def write_report(output: Path, runs: list[RunSpec], results: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    axes = list(runs[0].combination) if runs else []
    columns = ["run", *axes, "seed", *METRICS, "steps", "wall_s"]
    with open(output / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)

    (output / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")

    groups: dict[str, list[dict]] = {}
    for row in results:
        groups.setdefault(row["combination"], []).append(row)
    shown = [m for m in METRICS if any(row.get(m) is not None for row in results)]
    lines = [f"| combination | seeds | {' | '.join(shown)} |", "|" + "---|" * (len(shown) + 2)]
    for name, rows in groups.items():
        cells = [mean_std([r[m] for r in rows]) for m in shown]
        lines.append(f"| {name} | {len(rows)} | {' | '.join(cells)} |")
    (output / RESULTS_MARKDOWN).write_text(
        "Mean ± sample standard deviation over seeds.\n\n" + "\n".join(lines) + "\n"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for row in results:
        steps, losses = read_loss_curve(output / "runs" / row["run"])
        if steps:
            axis.plot(steps, losses, label=row["run"], marker="." if len(steps) < 20 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("train/loss")
    axis.set_title("Training loss per run")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(output / LOSS_CURVES_PNG, dpi=100)
    plt.close(figure)

    figure, panels = plt.subplots(1, max(1, len(shown)), figsize=(4 * max(1, len(shown)), 4), squeeze=False)
    names = list(groups)
    for panel, metric in zip(panels[0], shown):
        values = [[r[metric] for r in groups[n] if r[metric] is not None] for n in names]
        means = [statistics.mean(v) if v else 0.0 for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        panel.bar(range(len(names)), means, yerr=stds, capsize=3)
        panel.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        panel.set_title(metric)
    figure.tight_layout()
    figure.savefig(output / METRIC_BARS_PNG, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------- CLI
def ablate_command(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="kinetoscope ablate",
        description="Run a base config under every combination of overlay files (one folder per axis) and seeds; "
        "write results.csv, results.md and plots. Arguments after `--` go to every `kinetoscope fit`.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="the base config (a full fit config)")
    parser.add_argument("--axis", type=Path, action="append", required=True,
                        help="a folder of overlay *.yaml files (repeat for several axes: their cartesian product)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (seed_everything), default 0")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the ablation's folder")
    parser.add_argument("--probe-clips", type=int, default=4,
                        help="clips generated per run for the motion probe (0: no probe)")
    args = parser.parse_args(argv)
    try:
        run_ablation(AblationSettings(args.config, args.axis, args.seeds, args.output, args.probe_clips, extra))
    except (OverlayError, RuntimeError) as err:
        print(f"kinetoscope ablate: {err}", file=sys.stderr)
        return 1
    print(f"results: {args.output / RESULTS_CSV}, {args.output / RESULTS_MARKDOWN}, "
          f"{args.output / LOSS_CURVES_PNG}, {args.output / METRIC_BARS_PNG}")
    return 0


def _run_one_main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m framework.cli.ablate --run-one")
    parser.add_argument("--run-one", type=Path, required=True)
    parser.add_argument("--probe-clips", type=int, default=4)
    args = parser.parse_args(argv)
    run_one(args.run_one, args.probe_clips, extra)
    return 0


if __name__ == "__main__":
    sys.exit(_run_one_main(sys.argv[1:]))
