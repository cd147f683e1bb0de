"""The worked plugin package (examples/kinetoscope-plugin-example): its plugins are correct, and after ``pip install``
into a fresh virtual environment they are listed by ``kinetoscope plugins``, train from YAML by short name, and its
config's ``predict`` writes videos."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "kinetoscope-plugin-example"


@pytest.fixture
def example_modules(monkeypatch):
    """Import the example's source in this process (without installing it), for the unit checks."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    yield
    for name in [m for m in sys.modules if m.startswith("kinetoscope_plugin_example")]:
        sys.modules.pop(name)


def test_temporal_difference_patcher_round_trips_and_differences(example_modules) -> None:
    from kinetoscope_plugin_example.patchers import TemporalDifferencePatcher

    patcher = TemporalDifferencePatcher(patch_t=1, patch_h=2, patch_w=2, difference_scale=2.0)
    latents = [torch.randn(3, 4, 8, 6), torch.randn(3, 2, 4, 4)]  # [c, t, h, w] of two sizes
    packed = patcher.patchify(latents)
    assert packed.tokens.shape == (4 * 4 * 3 + 2 * 2 * 2, 3 * 2 * 2)
    for original, restored in zip(latents, patcher.unpatchify(packed)):
        torch.testing.assert_close(restored, original, atol=1e-5, rtol=0)
    # a static video has zero tokens after the first frame
    static = torch.randn(3, 1, 4, 4).expand(3, 4, 4, 4).contiguous()  # [c, t, h, w]
    tokens = patcher.patchify([static]).tokens  # [4 * 2 * 2, 12]
    assert tokens[4:].abs().max() == 0 and tokens[:4].abs().max() > 0
    with pytest.raises(ValueError, match="difference_scale"):
        TemporalDifferencePatcher(difference_scale=0.0)


def test_midpoint_sampler_is_second_order(example_modules) -> None:
    """On dx/dt = t x (exact: x(0) = x(1) exp(-1/2)), doubling the steps cuts the error ~4x (Euler: ~2x)."""
    from framework.layers.packing import PackedSequence
    from kinetoscope_plugin_example.samplers import RectifiedFlowMidpoint
    from plugins.samplers.rectified_flow import RectifiedFlow

    def model_fn(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
        return x.with_tokens(x.tokens * x.per_token(t)[:, None])  # [N, D] velocity t x

    noise = PackedSequence.from_grids([torch.ones(1, 2, 2, 3, dtype=torch.float64)])
    exact = torch.exp(torch.tensor(-0.5, dtype=torch.float64))

    def error(sampler, steps: int) -> float:
        return float((sampler.sample(model_fn, noise, steps).tokens - exact).abs().max())

    midpoint = RectifiedFlowMidpoint(shift=1.0)
    ratio_midpoint = error(midpoint, 8) / error(midpoint, 16)
    ratio_euler = error(RectifiedFlow(shift=1.0), 8) / error(RectifiedFlow(shift=1.0), 16)
    assert ratio_midpoint > 3.0, ratio_midpoint
    assert ratio_euler < 2.5, ratio_euler


@pytest.mark.slow
def test_example_package_installs_into_fresh_venv_trains_and_predicts(tmp_path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # A venv's "system" site-packages are the base interpreter's, not this environment's: reach this environment's
    # packages (torch, lightning, kinetoscope itself) through a .pth line that adds them as site directories.
    [env_site] = (env_dir / "lib").glob("python*/site-packages")
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (env_site / "_parent_environment.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n"
    )
    source = tmp_path / "kinetoscope-plugin-example"  # a copy: setuptools writes build/ and *.egg-info next to it
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"
    assert list(env_site.glob("kinetoscope_plugin_example-0.1.0.dist-info"))
    # not importable from this process: the plugins come from the new environment only
    assert "kinetoscope_plugin_example" not in sys.modules

    script = textwrap.dedent(
        f"""
        import sys
        from framework.cli.main import main
        main(["plugins"])
        sys.stdout.flush()
        config = {str(EXAMPLE / "configs" / "example.yaml")!r}
        quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false", "--trainer.default_root_dir={tmp_path / 'run'}"]
        assert main(["fit", "-c", config, "--trainer.max_steps=1", *quiet]) == 0
        print("FIT DONE")
        assert main(["predict", "-c", config, "--ckpt_path", "last", "--model.init_args.sampling_steps=2",
                     *quiet]) == 0
        print("PREDICT DONE")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    out = run.stdout
    assert ("midpoint_flow  [sampler]  kinetoscope_plugin_example.samplers.RectifiedFlowMidpoint  "
            "(from kinetoscope-plugin-example)") in out
    assert ("temporal_difference  [patcher]  kinetoscope_plugin_example.patchers.TemporalDifferencePatcher  "
            "(from kinetoscope-plugin-example)") in out
    assert "--difference_scale: float = 1.0" in out
    assert "rectified_flow  [sampler]" in out  # the built-ins still load beside it
    assert "FIT DONE" in out and "PREDICT DONE" in out
    # the example config's predict writes its videos (it used to have no VideoWriter and wrote nothing)
    samples = tmp_path / "run" / "samples"
    rows = [json.loads(line) for line in (samples / "index.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["a red square moving right on a black background"]
    assert {Path(f).suffix for f in rows[0]["files"]} == {".mp4", ".gif", ".png"}
    assert all((samples / f).stat().st_size > 0 for f in rows[0]["files"])
