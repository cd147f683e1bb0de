"""The ``kinetoscope`` command end to end: every shipped config trains, predict writes decodable videos, checkpoints
restore the model, and bad input fails with a message that says what is wrong.

Configs write to relative paths (runs/...), so every test runs in a temporary working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from framework.cli.lightning_cli import cli_main
from framework.data.video_io import read_video

REPO = Path(__file__).resolve().parents[1]
# Overlay files of `kinetoscope ablate` (configs/ablations/<axis>/*.yaml) are partial configs: tests/test_ablate.py
# runs each composed with its base.
CONFIGS = sorted(p for p in REPO.glob("configs/**/*.yaml") if p.parent.parent != REPO / "configs" / "ablations")
QUICKSTART = REPO / "configs" / "quickstart.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
BUILTIN_PLUGINS = {
    "compressor": "PixelCompressor",
    "patcher": "SpacetimePatcher",
    "denoiser": "DiT",
    "conditioner": "HashedTextConditioner",
    "sampler": "RectifiedFlow",
}
CAPTION = "a red square moving right on a black background"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """cli_main(args) gets its arguments explicitly; pytest's own sys.argv must not look like extra CLI input."""
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])


def callback_args(config: Path, class_name: str) -> dict:
    """init_args of the first trainer callback whose class_path ends with ``class_name``."""
    for cb in yaml.safe_load(config.read_text())["trainer"].get("callbacks", []):
        if cb["class_path"].split(".")[-1] == class_name:
            return cb.get("init_args", {})
    raise AssertionError(f"{config.name} has no {class_name} callback")


def failure_text(args: list[str], capsys) -> str:
    """Run the CLI expecting a failure; return the exception message plus everything printed."""
    with pytest.raises((SystemExit, Exception)) as info:
        cli_main(args)
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None), "the CLI exited successfully"
    out = capsys.readouterr()
    return f"{info.value}\n{out.out}\n{out.err}"


def run_root(config: Path) -> Path:
    """The config's ``trainer.default_root_dir``: its relative output folders lie under it."""
    return Path(yaml.safe_load(config.read_text())["trainer"]["default_root_dir"])


def write_overlay(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ configs
def test_configs_are_found() -> None:
    assert QUICKSTART in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_runs_a_fast_dev_run(config: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", "-c", str(config), "--trainer.fast_dev_run=true", "--trainer.logger=false",
         f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    assert cli.trainer.global_step == 1
    loss = cli.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------- fit, then predict
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two training steps of the quickstart config in a fresh working directory -> (run dir, the fitted CLI)."""
    run_dir = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setattr(sys, "argv", ["kinetoscope"])
        cli = cli_main(
            ["fit", "-c", str(QUICKSTART), "--trainer.max_steps=2", "--data.init_args.batch_size=4",
             "--data.init_args.num_samples=64", *QUIET]
        )
    assert cli.trainer.global_step == 2
    return run_dir, cli


def test_checkpoint_dir_is_relative_and_lands_under_the_run_root(trained) -> None:
    run_dir, _ = trained
    dirpath = callback_args(QUICKSTART, "ModelCheckpoint")["dirpath"]
    assert not Path(dirpath).is_absolute()
    assert (run_dir / run_root(QUICKSTART) / dirpath / "last.ckpt").is_file()


def test_predict_writes_decodable_videos(trained, monkeypatch) -> None:
    run_dir, _ = trained
    monkeypatch.chdir(run_dir)
    writer = callback_args(QUICKSTART, "VideoWriter")
    upscale, out_dir = writer["upscale"], run_dir / run_root(QUICKSTART) / writer["output_dir"]
    assert upscale == 8
    cli_main(
        ["predict", "-c", str(QUICKSTART), "--ckpt_path", "last",
         f"--data.init_args.prompts.captions=[{json.dumps(CAPTION)}]",
         "--data.init_args.prompts.frames=8", "--data.init_args.prompts.height=16",
         "--data.init_args.prompts.width=24", "--model.init_args.sampling_steps=5", *QUIET]
    )
    rows = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["caption"], row["frames"], row["height"], row["width"]) == (CAPTION, 8, 16, 24)
    files = {Path(name).suffix: out_dir / name for name in row["files"]}
    assert set(files) == {".mp4", ".gif", ".png"}
    assert all(f.is_file() and f.stat().st_size > 0 for f in files.values())
    video, fps = read_video(files[".mp4"])
    assert tuple(video.shape) == (3, 8, 16 * upscale, 24 * upscale)
    assert fps == pytest.approx(8.0)
    assert video.min() >= -1 and video.max() <= 1


def test_prediction_index_has_one_row_per_prompt(trained, tmp_path, monkeypatch) -> None:
    run_dir, _ = trained
    dirpath = run_root(QUICKSTART) / callback_args(QUICKSTART, "ModelCheckpoint")["dirpath"]
    (tmp_path / dirpath).mkdir(parents=True)
    shutil.copy(run_dir / dirpath / "last.ckpt", tmp_path / dirpath / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    captions = [CAPTION, "a green circle moving left on a white background"]
    cli_main(
        ["predict", "-c", str(QUICKSTART), "--ckpt_path", "last",
         f"--data.init_args.prompts.captions={json.dumps(captions)}", "--data.init_args.prompts.samples_per_prompt=2",
         "--data.init_args.prompts.frames=8", "--data.init_args.prompts.height=8",
         "--data.init_args.prompts.width=8", "--model.init_args.sampling_steps=2", *QUIET]
    )
    out_dir = tmp_path / run_root(QUICKSTART) / callback_args(QUICKSTART, "VideoWriter")["output_dir"]
    rows = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines() if line.strip()]
    assert [r["caption"] for r in rows] == [captions[0], captions[0], captions[1], captions[1]]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert len({r["seed"] for r in rows}) == 4  # each sample of a prompt gets its own seed
    for r in rows:
        assert (r["frames"], r["height"], r["width"]) == (8, 8, 8)
        assert len(r["files"]) == 3 and all((out_dir / name).is_file() for name in r["files"])


def test_checkpoint_restores_the_same_model(trained) -> None:
    from framework.modules import VideoDiffusion
    from framework.core.registry import default_registry

    run_dir, cli = trained
    default_registry()
    dirpath = run_root(QUICKSTART) / callback_args(QUICKSTART, "ModelCheckpoint")["dirpath"]
    loaded = VideoDiffusion.load_from_checkpoint(run_dir / dirpath / "last.ckpt", weights_only=True)
    for name in BUILTIN_PLUGINS:
        assert type(getattr(loaded, name)) is type(getattr(cli.model, name)), name
    assert loaded.denoiser.width == cli.model.denoiser.width == 128  # init_args come back from the config
    assert loaded.hparams.sampling_steps == cli.model.hparams.sampling_steps == 25
    trained_state, loaded_state = cli.model.state_dict(), loaded.state_dict()
    assert trained_state.keys() == loaded_state.keys()
    for key, value in trained_state.items():
        assert torch.equal(value.cpu(), loaded_state[key]), key


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def unknown_denoiser(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overlay = write_overlay(
        tmp_path / "bad.yaml", "model:\n  init_args:\n    denoiser:\n      class_path: NoSuchDenoiser\n"
    )
    return ["fit", "-c", str(QUICKSTART), "-c", str(overlay), "--trainer.fast_dev_run=true", *QUIET]


def test_unknown_plugin_name_fails_naming_it(unknown_denoiser, capsys) -> None:
    assert "NoSuchDenoiser" in failure_text(unknown_denoiser, capsys)


def test_unknown_plugin_name_lists_the_valid_choices(unknown_denoiser, capsys) -> None:
    text = failure_text(unknown_denoiser, capsys)
    assert "DiT" in text


def test_wrong_argument_type_fails_naming_the_key(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    overlay = write_overlay(
        tmp_path / "bad.yaml", "model:\n  init_args:\n    denoiser:\n      init_args:\n        width: wide\n"
    )
    text = failure_text(["fit", "-c", str(QUICKSTART), "-c", str(overlay), "--trainer.fast_dev_run=true", *QUIET],
                        capsys)
    assert "width" in text and "wide" in text


def test_predict_without_prompts_fails(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    text = failure_text(
        ["predict", "-c", str(QUICKSTART), "--data.init_args.prompts.captions=[]", "--trainer.logger=false", *QUIET],
        capsys,
    )
    assert "no prompts" in text


def test_predict_with_impossible_size_fails_naming_it(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    text = failure_text(
        ["predict", "-c", str(QUICKSTART), "--data.init_args.prompts.height=15", "--trainer.logger=false", *QUIET],
        capsys,
    )
    assert "height" in text and "15" in text
    assert not list(tmp_path.glob("**/*.mp4"))


# ------------------------------------------------------------------------------------------ plugins command
def kinetoscope_command() -> list[str]:
    script = Path(sys.executable).with_name("kinetoscope")
    if script.exists():
        return [str(script)]
    found = shutil.which("kinetoscope")
    return [found] if found else [sys.executable, "-m", "framework.cli.main"]


def listed_plugins(args: list[str], cwd: Path) -> dict[str, str]:
    """Run ``kinetoscope plugins ...`` -> {plugin class name: kind} parsed from its table."""
    result = subprocess.run(
        kinetoscope_command() + ["plugins", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    plugins = {}
    for line in result.stdout.splitlines():
        if line and not line[0].isspace():  # "name  [kind]  module.Class  (from dist)"
            _, kind, class_path = line.split()[:3]
            plugins[class_path.rsplit(".", 1)[-1]] = kind.strip("[]")
    return plugins


def test_plugins_command_lists_the_builtins(tmp_path) -> None:
    plugins = listed_plugins([], tmp_path)
    for kind, name in BUILTIN_PLUGINS.items():
        assert plugins.get(name) == kind, plugins


def test_plugins_command_filters_by_kind(tmp_path) -> None:
    plugins = listed_plugins(["--kind", "denoiser"], tmp_path)
    assert plugins.get("DiT") == "denoiser"
    assert set(plugins.values()) == {"denoiser"}
