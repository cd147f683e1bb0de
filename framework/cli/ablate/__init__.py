"""``kinetoscope ablate``: config-driven ablations — base config x overlay files per axis x seeds, with a report.

An *axis* is a folder of overlay YAML files (``configs/ablations/sampler/ddim.yaml``, ...); each overlay is a partial
config deep-merged onto the base config. Several axes give their cartesian product; every combination runs once per
seed. Each run is a ``kinetoscope fit`` in its own subprocess (``framework.cli.lightning_cli.cli_main``), followed by the
evaluation that is available without extra weights: the final train (and validation, if logged) loss from the
CSVLogger and, when the prompts are synthetic captions, the motion probe (``framework/metrics/motion_probe.py``) on a
few generated clips. Layout of the output folder::

    <output>/runs/<combination>__seed<k>/config.yaml    the resolved config the run trained (--print_config of the
                                                        composed config plus the arguments after `--`)
    <output>/runs/<combination>__seed<k>/fit.log        the subprocess's stdout and stderr
    <output>/runs/<combination>__seed<k>/done.json      written atomically when the run finished: its results and
                                                        the digest of config.yaml and --probe-clips
    <output>/results.csv  results.json  results.md  loss_curves.png  metric_bars.png

A run is skipped when its ``done.json`` holds the digest of the run's resolved config (and ``--probe-clips``) as it
would be now, so an interrupted ablation restarts where it stopped, while a changed overlay, base config or argument
after ``--`` trains the run again (a folder without ``done.json`` was interrupted and is trained again from scratch).

The package: ``overlays`` (composition, ``OverlayError``), ``runner`` (plan, resolved configs, subprocesses,
``done.json``), ``report`` (CSV, JSON, Markdown, plots); ``ablate_command`` here is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from framework.cli.ablate.overlays import OverlayError, compose, load_yaml, merge_overlay
from framework.cli.ablate.report import LOSS_CURVES_PNG, METRIC_BARS_PNG, RESULTS_CSV, RESULTS_MARKDOWN
from framework.cli.ablate.runner import DONE_MARKER, AblationSettings, run_ablation

__all__ = ["DONE_MARKER", "AblationSettings", "OverlayError", "ablate_command", "compose", "load_yaml",
           "merge_overlay", "run_ablation"]


def ablate_command(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="kinetoscope ablate",
        description="Run a base config under every combination of overlay files (one folder per axis) and seeds; "
        "write results.csv, results.md and plots. Arguments after `--` go to every `kinetoscope fit`; a finished run "
        "is skipped only if its resolved config (overlays and these arguments included) is unchanged.",
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
