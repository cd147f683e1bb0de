"""examples/real_clips.yaml trains the quickstart model on a manifest: generated files here, the shared real clips
when present. (It lives outside configs/ because it needs a manifest; tests/test_cli.py runs every configs/ YAML.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.cli.lightning_cli import cli_main
from manifest_media import mixed_media, write_manifest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "real_clips.yaml"
SHARED = REPO.parent / "shared" / "data" / "videos" / "manifest.csv"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def fast_dev_run(manifest: Path, tmp_path: Path, monkeypatch, *extra: str):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    return cli_main(["fit", "-c", str(CONFIG), f"--data.init_args.manifest={manifest}", "--trainer.fast_dev_run=true",
                     "--data.init_args.tokens_per_batch=1024",  # a small step: this checks wiring, not speed
                     "--data.init_args.num_workers=0", f"--trainer.default_root_dir={tmp_path}", *QUIET, *extra])


def test_real_clips_config_trains_on_a_generated_manifest(tmp_path, monkeypatch):
    """Packed batching here (bucketed batching is the config's default and runs in test_manifest.py)."""
    rows, broken = mixed_media(tmp_path / "media")
    manifest = write_manifest(tmp_path / "media" / "manifest.csv", rows)
    cli = fast_dev_run(manifest, tmp_path, monkeypatch, "--data.init_args.batching=PACKED")
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # files found bad when the dataset is built (all of these are: no metadata columns, so each is probed)
    assert sorted(Path(p).name for p in cli.datamodule.skipped_samples.paths) == sorted(broken)


def test_real_clips_config_needs_a_manifest_to_train(tmp_path, monkeypatch, capsys):
    from framework.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    assert main(["fit", "-c", str(CONFIG), "--trainer.fast_dev_run=true", *QUIET]) == 2
    assert "manifest" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_file(), reason=f"real clips not present ({SHARED})")
def test_real_clips_config_on_the_shared_clips(tmp_path, monkeypatch):
    cli = fast_dev_run(SHARED, tmp_path, monkeypatch)
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
