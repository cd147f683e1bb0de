"""Lightning DDP on 2 CPU processes (gloo): a real multi-process run, so it takes ~10-20 s; marked ``slow`` but run by
default (deselect with ``-m "not slow"``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train_step.py"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_and_keeps_replicas_and_ema_equal(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    changed = 0
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"replicas differ in {name}"
        changed += not torch.equal(weight, ranks[0]["initial"][name])
    assert changed > 0  # the step really trained
    for name, average in ranks[0]["ema"].items():
        assert torch.equal(average, ranks[1]["ema"][name]), f"EMA replicas differ in {name}"
    assert torch.equal(ranks[0]["initial"]["denoiser.embed.weight"], ranks[1]["initial"]["denoiser.embed.weight"])
    # each rank trained on its own share of the data: 2 steps x 4 clips, not the same clips twice
    assert len(ranks[0]["captions"]) == len(ranks[1]["captions"]) == 8
    assert ranks[0]["captions"] != ranks[1]["captions"]
