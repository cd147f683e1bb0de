"""Issue 20, the first hour with real data: commands that used to succeed while doing nothing useful, and the friction
around them. Every test drives the real command (``framework.cli.main.main``) from a temporary working directory."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from framework.cli.main import TOOL_COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
REAL_CLIPS = REPO / "examples" / "real_clips.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CAPTION = "a red square moving right on a black background"
# one small prompt, sampled in 2 steps: these tests check what is written, not how good it is
ONE_PROMPT = [f"--data.init_args.prompts.captions=[{json.dumps(CAPTION)}]", "--data.init_args.prompts.height=16",
              "--data.init_args.prompts.width=16", "--model.init_args.sampling_steps=2"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])


def index_rows(samples: Path) -> list[dict]:
    return [json.loads(line) for line in (samples / "index.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory) -> tuple[Path, Path]:
    """(working directory, run root): two quickstart steps trained with ``--trainer.default_root_dir=elsewhere``."""
    cwd = tmp_path_factory.mktemp("first_hour")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", ["kinetoscope"])
        assert main(["fit", "-c", str(QUICKSTART), "--trainer.max_steps=2", "--data.init_args.batch_size=4",
                     "--data.init_args.num_samples=16", "--trainer.default_root_dir=elsewhere", *QUIET]) == 0
    return cwd, cwd / "elsewhere"


# ------------------------------------------------------------------------------- default_root_dir moves the run
def test_default_root_dir_moves_checkpoints_and_logs(trained_root) -> None:
    cwd, root = trained_root
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert list((root / "logs").glob("version_*/hparams.yaml"))
    assert not (cwd / "runs").exists()  # nothing in the config's own root (runs/quickstart)


def test_ckpt_path_last_finds_the_checkpoint_under_the_root_and_samples_land_there(trained_root, monkeypatch) -> None:
    cwd, root = trained_root
    monkeypatch.chdir(cwd)
    assert main(["predict", "-c", str(QUICKSTART), "--ckpt_path", "last", "--trainer.default_root_dir=elsewhere",
                 "--trainer.logger=false", *ONE_PROMPT, *QUIET]) == 0
    rows = index_rows(root / "samples")
    assert [(r["caption"], r["task"]) for r in rows] == [(CAPTION, "text_to_video")]
    assert all((root / "samples" / name).is_file() for name in rows[0]["files"])


# ---------------------------------------------------------------------------------- predict without weights
def test_predict_last_without_a_checkpoint_fails_naming_where_it_looked(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "-c", str(QUICKSTART), "--ckpt_path", "last", "--trainer.default_root_dir=empty_run",
                 "--trainer.logger=false", *ONE_PROMPT, *QUIET])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "empty_run" / "checkpoints") in err and "--allow_untrained" in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.mp4"))  # nothing sampled from untrained weights


def test_allow_untrained_samples_the_initial_weights_when_asked(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "-c", str(QUICKSTART), "--ckpt_path", "last", "--allow_untrained=true",
                 "--trainer.default_root_dir=untrained", "--trainer.logger=false", *ONE_PROMPT, *QUIET]) == 0
    assert len(index_rows(tmp_path / "untrained" / "samples")) == 1


def test_predict_without_a_prediction_writer_fails(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "-c", str(QUICKSTART), "--trainer.callbacks=[]", "--trainer.logger=false", *ONE_PROMPT,
                 *QUIET])
    assert code == 2 and "VideoWriter" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ prompts
def test_prompts_file_replaces_the_config_captions(trained_root, monkeypatch) -> None:
    cwd, root = trained_root
    monkeypatch.chdir(cwd)
    (cwd / "mine.txt").write_text("a blue circle moving up on a white background\n")
    assert main(["predict", "-c", str(QUICKSTART), "--ckpt_path", "last", "--trainer.default_root_dir=elsewhere",
                 "--data.init_args.prompts.file=mine.txt", "--trainer.logger=false",
                 "--trainer.callbacks.output_dir=from_file", "--model.init_args.sampling_steps=2", *QUIET]) == 0
    rows = index_rows(root / "from_file")
    assert [r["caption"] for r in rows] == ["a blue circle moving up on a white background"]  # the config's 4 are not
    assert rows[0]["task"] == "text_to_video"


def test_given_frames_warning_names_the_prompt_row(tmp_path, monkeypatch, caplog) -> None:
    """The quickstart's 8-frame tokens cannot keep a single given first frame: the warning names the file's row."""
    from framework.data.video_io import write_video
    import torch

    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "first.mp4", torch.zeros(3, 1, 16, 16), 8.0)
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"caption": CAPTION}) + "\n"
        + json.dumps({"caption": CAPTION, "task": "extend_forward", "video": "first.mp4"}) + "\n")
    with caplog.at_level("WARNING"):
        assert main(["predict", "-c", str(QUICKSTART), "--trainer.default_root_dir=run", "--trainer.logger=false",
                     "--data.init_args.prompts.file=rows.jsonl", "--model.init_args.sampling_steps=2", *QUIET]) == 0
    warning = next(r.getMessage() for r in caplog.records if "generated, not kept" in r.getMessage())
    assert "row rows.jsonl:2" in warning
    assert [r["task"] for r in index_rows(tmp_path / "run" / "samples")] == ["text_to_video", "extend_forward"]


def test_real_clips_config_predicts_without_a_manifest_and_fit_names_it(tmp_path, monkeypatch, capsys,
                                                                       caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["predict", "-c", str(REAL_CLIPS), "--trainer.default_root_dir=real", "--trainer.logger=false",
                     "--data.init_args.prompts.frames=1", *ONE_PROMPT, *QUIET]) == 0
    assert len(index_rows(tmp_path / "real" / "samples")) == 1
    assert "predict without --ckpt_path: running the weights the config builds" in caplog.text
    capsys.readouterr()
    assert main(["fit", "-c", str(REAL_CLIPS), "--trainer.fast_dev_run=true", "--trainer.logger=false", *QUIET]) == 2
    err = capsys.readouterr().err
    assert "--data.init_args.manifest" in err and "kinetoscope scan" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ errors
def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^  (\S+)", out, flags=re.MULTILINE))
    assert {"fit", "validate", "test", "predict", *TOOL_COMMANDS} <= listed
    assert {"plugins", "scan", "evaluate", "ablate", "fetch-i3d", "cache-latents", "recaption"} <= set(TOOL_COMMANDS)


def test_bad_class_path_is_a_short_error_naming_the_file_and_the_choices(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    denoiser:\n      class_path: NoSuchDenoiser\n")
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(QUICKSTART), "-c", str(bad), "--trainer.fast_dev_run=true"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("error: ") and "NoSuchDenoiser" in err.splitlines()[0]
    assert re.search(r"valid denoiser plugins: .*\bDiT \(plugins\.denoisers\.dit\.DiT\)", err) and str(bad) in err and str(QUICKSTART) not in err
    assert "usage:" not in err and len(err.splitlines()) <= 5, err


def test_size_that_does_not_fit_the_patch_is_one_paragraph(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "-c", str(QUICKSTART), "--trainer.logger=false", "--data.init_args.prompts.height=15",
                 *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line]
    assert "8x15x16" in line and "captions[0], captions[1], captions[2], captions[3]" in line
    assert "not divisible by the patch size 4" in line
    assert not list(tmp_path.rglob("*.mp4"))


# --------------------------------------------------------------------------------------------- display
def test_progress_bar_of_a_step_limited_run_names_the_step_limit(tmp_path, monkeypatch) -> None:
    from framework.cli.lightning_cli import cli_main
    from framework.cli.progress import RunProgressBar

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["-c", str(QUICKSTART), "--trainer.logger=false"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RunProgressBar) and (cli.trainer.max_epochs, cli.trainer.max_steps) == (-1, 4000)
    bar._trainer = cli.trainer
    assert bar._get_train_description(15).strip() == "Epoch 15 (until step 4000)"


def test_plugins_output_prints_enum_defaults_by_name_and_whole_first_sentences(capsys) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"= <\w+\.\w+: ", out), "an enum default printed as its Python repr"
    assert "--prediction: FlowPrediction = VELOCITY" in out  # as a config writes it (prediction: VELOCITY)
    assert ("    Frozen local ``transformers`` text encoder (BERT-like, T5 encoder, CLIP text) with caption dropout and "
            "an optional embedding cache.\n") in out  # wrapped over two docstring lines, once cut after "an"


def test_docs_index_lists_each_page_once() -> None:
    pages = re.findall(r"^\| \[([\w-]+\.md)\]", (REPO / "docs" / "index.md").read_text(), flags=re.MULTILINE)
    assert len(pages) == len(set(pages)), pages
    assert set(pages) == {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}


# ------------------------------------------------------------------------------- benchmarks/quickstart_learning.py
def test_quickstart_learning_without_a_checkpoint_in_run_dir_fails_naming_it(tmp_path) -> None:
    """--skip-train scores only the runs under --run-dir (one per seed: tests/test_quickstart_learning.py trains and
    scores them); with none there it fails naming the folder instead of scoring a stale run from elsewhere."""
    import subprocess

    script = REPO / "benchmarks" / "quickstart_learning.py"
    empty = tmp_path / "no_run"
    result = subprocess.run([sys.executable, str(script), "--skip-train", "--run-dir", str(empty), "--seeds", "0",
                             "--results-dir", str(tmp_path / "results")], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0
    assert f"{empty / 'seed0'}: expected one checkpoints/last.ckpt from the fit, found 0" in result.stderr
    assert not (tmp_path / "results").exists()
