"""The ablation report: results.csv, results.json, results.md (mean ± std over seeds) and the loss and metric plots,
read from each run's CSVLogger metrics."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"
RESULTS_JSON = "results.json"
LOSS_CURVES_PNG = "loss_curves.png"
METRIC_BARS_PNG = "metric_bars.png"
METRICS = ("final_train_loss", "train_loss_last_quarter", "final_val_loss", "probe_both_ok", "probe_colour_ok",
           "probe_direction_ok")


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


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def write_report(output: Path, axes: list[str], results: list[dict], extra_args: list[str]) -> None:
    """results.csv/.json/.md and the two plots; ``extra_args`` (what followed ``--``) is stated in the table's header."""
    output.mkdir(parents=True, exist_ok=True)
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
        "Mean ± sample standard deviation over seeds. Every run trained its composed config with "
        + (f"`{' '.join(extra_args)}`" if extra_args else "no extra arguments") + ".\n\n" + "\n".join(lines) + "\n"
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
