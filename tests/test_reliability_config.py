"""Config faults through ``framework.cli.main``: malformed YAML, unknown keys, wrong types, missing or unknown plugins
each fail with exit status 2 and a first error line that names the file or key at fault."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from framework.cli.main import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "reliability" / "tiny.yaml"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])


def error_line(argv: list[str], capsys) -> str:
    """Run the CLI expecting a usage error; return its first ``error:`` line (jsonargparse prints usage first)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def overlay(tmp_path: Path, text: str) -> str:
    path = tmp_path / "overlay.yaml"
    path.write_text(text)
    return str(path)


def test_malformed_yaml_names_the_file_line_and_column(tmp_path, capsys) -> None:
    bad = overlay(tmp_path, "trainer:\n  max_steps: 3\n  callbacks: [a, b\nmodel: {}\n")
    line = error_line(["fit", "-c", str(TINY), "-c", bad], capsys)
    assert line.startswith(f"error: config {bad}: not valid YAML at line 4, column 6")


def test_a_config_that_is_not_a_mapping_is_named(tmp_path, capsys) -> None:
    bad = overlay(tmp_path, "- just\n- a list\n")
    assert f"config {bad}: expected a mapping" in error_line(["fit", "-c", bad], capsys)


def test_unknown_key_is_named(tmp_path, capsys) -> None:
    line = error_line(["fit", "-c", str(TINY), "-c", overlay(tmp_path, "trainer:\n  max_stepz: 3\n")], capsys)
    assert line == "error: Subcommand 'fit' does not accept option 'trainer.max_stepz'"


def test_unknown_plugin_name_is_named_with_the_valid_choices(tmp_path, capsys) -> None:
    text = "model:\n  init_args:\n    denoiser:\n      class_path: DiTT\n"
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(TINY), "-c", overlay(tmp_path, text)])
    err = capsys.readouterr().err
    assert "error: model (framework.modules.VideoDiffusion): denoiser: Expected a dot import path string: DiTT" in err
    assert re.search(r"valid denoiser plugins: .*\bDiT \(plugins\.denoisers\.dit\.DiT\)", err)


def test_unknown_plugin_argument_is_named_with_its_class(tmp_path, capsys) -> None:
    text = "model:\n  init_args:\n    denoiser:\n      class_path: DiT\n      init_args: {widht: 32}\n"
    line = error_line(["fit", "-c", str(TINY), "-c", overlay(tmp_path, text)], capsys)
    assert line == ("error: model (framework.modules.VideoDiffusion): denoiser (plugins.denoisers.dit.DiT): "
                    "Option 'widht' is not accepted")


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, capsys) -> None:
    line = error_line(["fit", "-c", str(TINY), "-c", overlay(tmp_path, "trainer:\n  max_steps: many\n")], capsys)
    assert line == "error: trainer.max_steps: Expected a <class 'int'>. Got value: many"


def test_wrong_type_inside_the_model_is_summarized_first(tmp_path, capsys) -> None:
    text = "model:\n  init_args:\n    learning_rate: fast\n"
    line = error_line(["fit", "-c", str(TINY), "-c", overlay(tmp_path, text)], capsys)
    assert line == ("error: model (framework.modules.VideoDiffusion): learning_rate: "
                    "Expected a <class 'float'>. Got value: fast")


def test_missing_required_plugin_is_named_with_the_valid_choices(tmp_path, capsys) -> None:
    config = yaml.safe_load(TINY.read_text())
    del config["model"]["init_args"]["denoiser"]
    path = overlay(tmp_path, yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "-c", path])
    err = capsys.readouterr().err
    assert ("error: model (framework.modules.VideoDiffusion): the following arguments are required: denoiser"
            in err.splitlines())
    assert re.search(r"valid denoiser plugins: .*\bDiT \(plugins\.denoisers\.dit\.DiT\)", err)
    assert "valid sampler plugins" not in err  # only the kind that is missing
    assert max(len(line) for line in err.splitlines()) < 400  # no full-config dump


def test_trainer_plugin_that_does_not_exist_is_named(tmp_path, capsys) -> None:
    text = "trainer:\n  plugins:\n    - class_path: framework.training.checkpointing.NoSuchIO\n"
    line = error_line(["fit", "-c", str(TINY), "-c", overlay(tmp_path, text)], capsys)
    assert line == ("error: trainer.plugins: class_path 'framework.training.checkpointing.NoSuchIO' cannot be imported "
                    "(module 'framework.training.checkpointing' has no attribute 'NoSuchIO')")
