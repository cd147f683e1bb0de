"""``kinetoscope ablate``: shipped overlays compose and train, an ablation writes its report and resumes without
repeating work, and an overlay that changes ``class_path`` cannot carry the old class's ``init_args`` silently."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from framework.cli.ablate import (
    DONE_MARKER,
    AblationSettings,
    OverlayError,
    compose,
    load_yaml,
    merge_overlay,
    run_ablation,
)
from framework.cli.lightning_cli import cli_main
from framework.cli.main import main
from framework.data.buckets import Bucket

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "configs" / "ablations"
BASE = ABLATIONS / "base_tiny.yaml"
OVERLAYS = sorted(ABLATIONS.glob("*/*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])


def test_shipped_axes_exist() -> None:
    axes = {p.parent.name for p in OVERLAYS}
    assert {"patch", "denoiser", "sampler", "batching"} <= axes
    samplers = {load_yaml(p)["model"]["init_args"]["sampler"]["class_path"] for p in (ABLATIONS / "sampler").glob("*.yaml")}
    assert samplers == {"RectifiedFlow", "RectifiedFlowHeun", "DDIM", "DPMSolverPlusPlus"}
    denoisers = {load_yaml(p)["model"]["init_args"]["denoiser"]["class_path"] for p in (ABLATIONS / "denoiser").glob("*.yaml")}
    assert denoisers == {"DiT", "STDiT", "MMDiT"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_overlay_composes_and_runs_fast_dev_run(overlay: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = compose(load_yaml(BASE), [overlay])
    config["trainer"]["callbacks"] = []
    path = tmp_path / "composed.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "-c", str(path), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # the overlay's settings reached the objects that were built
    model, data = cli.model, cli.datamodule
    node = load_yaml(overlay)
    if overlay.parent.name == "sampler":
        assert type(model.sampler).__name__ == node["model"]["init_args"]["sampler"]["class_path"]
    if overlay.parent.name == "denoiser":
        assert type(model.denoiser).__name__ == node["model"]["init_args"]["denoiser"]["class_path"]
    if overlay.parent.name == "patch":
        args = node["model"]["init_args"]["patcher"]["init_args"]
        assert model.patcher.patch_size == (args["patch_t"], args["patch_h"], args["patch_w"])
    if overlay.stem == "packed":
        batches = data.batch_sampler().batches()
        shapes = [{data.dataset.shape_of(i) for i in batch} for batch in batches]
        assert any(len(s) > 1 for s in shapes), "packed batches should mix shapes"
        for batch in batches:
            tokens = sum(data.geometry.tokens(Bucket(*data.dataset.shape_of(i))) for i in batch)
            assert tokens <= data.tokens_per_batch or len(batch) == 1
    if overlay.stem == "buckets":
        assert all(len({data.dataset.shape_of(i) for i in batch}) == 1 for batch in data.batch_sampler().batches())


# ------------------------------------------------------------------------------------------ class_path changes
def test_changing_class_path_keeps_no_incompatible_init_args(tmp_path) -> None:
    base = load_yaml(BASE)  # sampler: RectifiedFlow {shift: 3.0}
    only_class = tmp_path / "ddim_class_only.yaml"
    only_class.write_text("model:\n  init_args:\n    sampler:\n      class_path: DDIM\n")
    with pytest.raises(OverlayError) as info:
        compose(base, [only_class])
    message = str(info.value)
    assert str(only_class) in message
    assert "model.init_args.sampler" in message
    assert "['shift']" in message and "RectifiedFlow" in message and "DDIM" in message
    assert "zero_terminal_snr" in message  # lists what DDIM takes

    misspelt = tmp_path / "ddim_typo.yaml"
    misspelt.write_text("model:\n  init_args:\n    sampler:\n      class_path: DDIM\n      init_args: {etta: 0.5}\n")
    with pytest.raises(OverlayError, match=r"ddim_typo\.yaml.*\['etta'\]"):
        compose(base, [misspelt])

    # a misspelt key under an unchanged class_path is caught while composing too, before any run trains
    typo = tmp_path / "patch_typo.yaml"
    typo.write_text("model:\n  init_args:\n    patcher:\n      init_args: {patch_hh: 2}\n")
    with pytest.raises(OverlayError, match=r"model\.init_args\.patcher.*\['patch_hh'\].*patch_typo\.yaml"):
        compose(base, [typo])

    # compatible arguments carry over when only class_path changes; given init_args replace the base's
    heun = tmp_path / "heun.yaml"
    heun.write_text("model:\n  init_args:\n    sampler:\n      class_path: RectifiedFlowHeun\n")
    assert compose(base, [heun])["model"]["init_args"]["sampler"] == {"class_path": "RectifiedFlowHeun",
                                                                      "init_args": {"shift": 3.0}}
    ddim = compose(base, [ABLATIONS / "sampler" / "ddim.yaml"])["model"]["init_args"]["sampler"]
    assert ddim["init_args"] == {"prediction": "V", "beta_schedule": "COSINE", "zero_terminal_snr": True}


def test_merge_replaces_scalars_and_lists_and_keeps_siblings() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 4}
    assert merge_overlay(base, {"a": {"c": [3]}}, Path("x.yaml")) == {"a": {"b": 1, "c": [3]}, "d": 4}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 4}  # not modified


def test_cli_reports_overlay_error(tmp_path, capsys) -> None:
    axis = tmp_path / "bad"
    axis.mkdir()
    (axis / "ddim.yaml").write_text("model:\n  init_args:\n    sampler:\n      class_path: DDIM\n")
    code = main(["ablate", "-c", str(BASE), "--axis", str(axis), "-o", str(tmp_path / "out")])
    assert code == 1
    assert "ddim.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()  # failed before any training


# ------------------------------------------------------------------------------------------ a whole ablation
@pytest.mark.slow
def test_ablation_writes_report_and_resumes(tmp_path) -> None:
    """2 overlays x 2 seeds, 4 training steps each, in subprocesses (~10 s each: mostly importing torch)."""
    axis = tmp_path / "sampler"
    axis.mkdir()
    for name in ("rectified_flow", "ddim"):
        (axis / f"{name}.yaml").write_text((ABLATIONS / "sampler" / f"{name}.yaml").read_text())
    output = tmp_path / "ablation"
    settings = AblationSettings(BASE, [axis], [0, 1], output, probe_clips=2,
                                extra_args=["--trainer.max_steps=4", "--trainer.log_every_n_steps=1"])
    logged: list[str] = []
    results = run_ablation(settings, log=logged.append)

    assert len(results) == 4
    with open(output / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["sampler"], r["seed"]) for r in rows) == [("ddim", "0"), ("ddim", "1"),
                                                              ("rectified_flow", "0"), ("rectified_flow", "1")]
    for row in rows:
        assert row["steps"] == "4"
        assert float(row["final_train_loss"]) > 0
        assert 0.0 <= float(row["probe_both_ok"]) <= 1.0
        run_dir = output / "runs" / row["run"]
        losses = [r["train/loss"] for r in csv.DictReader(open(run_dir / "logs" / "version_0" / "metrics.csv"))
                  if r["train/loss"]]
        assert float(row["final_train_loss"]) == pytest.approx(float(losses[-1]))
        assert float(row["train_loss_last_quarter"]) == pytest.approx(float(losses[-1]))  # 4 points: the last one
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"] == int(row["seed"])
    # different seeds train differently
    by_sampler = {}
    for row in rows:
        by_sampler.setdefault(row["sampler"], set()).add(row["final_train_loss"])
    assert all(len(v) == 2 for v in by_sampler.values())

    assert json.loads((output / "results.json").read_text()) == results
    table = (output / "results.md").read_text()
    assert "| sampler=ddim | 2 |" in table and "| sampler=rectified_flow | 2 |" in table
    assert "±" in table
    for png in ("loss_curves.png", "metric_bars.png"):
        assert (output / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # re-run: every run has its done marker, so nothing trains again and the report is the same
    markers = {p: p.stat().st_mtime_ns for p in output.glob(f"runs/*/{DONE_MARKER}")}
    assert len(markers) == 4
    logged.clear()
    again = run_ablation(settings, log=logged.append)
    assert again == results
    assert all("skipped" in line for line in logged), logged
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert json.loads(next(iter(markers)).read_text())["steps"] == 4

    # an interrupted run (folder without done.json) is trained again from scratch; the others are not
    interrupted = output / "runs" / "sampler-ddim__seed1"
    (interrupted / DONE_MARKER).unlink()
    (interrupted / "logs" / "version_0" / "metrics.csv").write_text("step,train/loss\n999,123.0\n")
    logged.clear()
    resumed = run_ablation(settings, log=logged.append)
    assert [line for line in logged if "training" in line] == ["[2/4] sampler-ddim__seed1: training"]
    without_time = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert without_time(resumed) == without_time(results)  # same seed, same config: the same numbers again


@pytest.mark.slow
def test_finished_runs_are_keyed_by_their_resolved_config(tmp_path, capsys) -> None:
    """Through `kinetoscope ablate`: the same arguments after `--` skip the finished run; changed ones train it again
    and the report states (and shows the results of) what actually ran."""
    axis = tmp_path / "sampler"
    axis.mkdir()
    (axis / "rectified_flow.yaml").write_text((ABLATIONS / "sampler" / "rectified_flow.yaml").read_text())
    output = tmp_path / "ablation"

    def ablate(steps: int) -> tuple[str, list[dict]]:
        capsys.readouterr()
        assert main(["ablate", "-c", str(BASE), "--axis", str(axis), "-o", str(output), "--probe-clips", "0", "--",
                     f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1"]) == 0
        with open(output / "results.csv", newline="") as f:
            return capsys.readouterr().out, list(csv.DictReader(f))

    out, rows = ablate(1)
    assert "training" in out and [r["steps"] for r in rows] == ["1"]
    out, rows = ablate(1)
    assert "done with this config, skipped" in out and [r["steps"] for r in rows] == ["1"]
    out, rows = ablate(2)
    assert "config changed since it finished, training again" in out and [r["steps"] for r in rows] == ["2"]
    run_dir = output / "runs" / "sampler-rectified_flow__seed0"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert "`--trainer.max_steps=2 --trainer.log_every_n_steps=1`" in (output / "results.md").read_text()
