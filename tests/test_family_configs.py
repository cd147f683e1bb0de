"""The new families through the CLI: presets and sampler enums resolve from YAML, bad values fail naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from framework.cli.lightning_cli import cli_main
from plugins.denoisers.st_dit import STDiT
from plugins.samplers.ddim import DDIM
from plugins.samplers.gaussian_diffusion import BetaSchedule, Prediction

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stdit_ddim.yaml"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch, tmp_path):  # configs write to relative paths
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    monkeypatch.chdir(tmp_path)


def test_yaml_builds_the_family_it_names() -> None:
    cli = cli_main(["-c", str(CONFIG)], run=False)
    model = cli.model
    assert isinstance(model.denoiser, STDiT) and isinstance(model.sampler, DDIM)
    assert (model.denoiser.width, model.denoiser.depth, model.denoiser.num_heads) == (64, 2, 4)
    assert model.sampler.prediction is Prediction.V and model.sampler.beta_schedule is BetaSchedule.COSINE
    assert model.sampler.zero_terminal_snr


def test_a_preset_named_in_yaml_sets_the_size(tmp_path) -> None:
    overlay = tmp_path / "preset.yaml"
    overlay.write_text(
        "model:\n  init_args:\n    denoiser:\n      class_path: STDiT\n"
        "      init_args: {preset: S, width: null, num_heads: null, depth: 1}\n"
    )
    denoiser = cli_main(["-c", str(CONFIG), "-c", str(overlay)], run=False).model.denoiser
    assert (denoiser.width, denoiser.depth, denoiser.num_heads) == (384, 1, 6)  # S's width and heads, depth overridden


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.init_args.denoiser.init_args.preset=XXL", ["preset", "XXL"]),
        ("--model.init_args.sampler.init_args.prediction=x0", ["prediction", "x0"]),
    ],
)
def test_bad_values_fail_naming_the_key(override, expected, capsys) -> None:
    with pytest.raises((SystemExit, Exception)) as info:
        cli_main(["-c", str(CONFIG), override], run=False)
    out = capsys.readouterr()
    text = f"{info.value}\n{out.out}\n{out.err}"
    for word in expected:
        assert word in text, text[-2000:]


def test_epsilon_with_zero_terminal_snr_fails_naming_both_fields(capsys) -> None:
    with pytest.raises((SystemExit, Exception)) as info:
        cli_main(["-c", str(CONFIG), "--model.init_args.sampler.init_args.prediction=EPSILON"], run=False)
    out = capsys.readouterr()
    text = f"{info.value}\n{out.out}\n{out.err}"
    assert "prediction" in text and "zero_terminal_snr" in text, text[-2000:]
