"""Fully sharded data parallel (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo): a real
multi-process run, ~15-25 s; marked ``slow`` but run by default (deselect with ``-m "not slow"``).

Lightning's own ``strategy: fsdp`` (FSDPStrategy, FSDP1) cannot run on CPU: Lightning 2.6 rejects it with "The
strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`", and torch 2.13's
FullyShardedDataParallel itself raises "FSDP needs a non-CPU accelerator device, but no accelerator device is
detected" when that check is bypassed. FSDP2 (``fully_shard``) has no such limit, so it is what this test runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_train_step.py"
REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("fsdp_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_shards_weights_and_trains_like_one_process_on_the_global_batch(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:  # each rank stored about half of every weight, not a replica
        assert r["sharded"] and r["local_numel"] <= 0.55 * r["total_numel"], (r["local_numel"], r["total_numel"])
    assert ranks[0]["steps"][0][0]["captions"] != ranks[1]["steps"][0][0]["captions"]  # each rank its own share

    # single-process reference: the same initial model, trained on both ranks' batches with averaged gradients
    script = load_script()
    reference = script.build_model()
    initial = {k: v.clone() for k, v in reference.trained_modules().state_dict().items()}
    script.single_process_steps(reference, [[ranks[r]["steps"][step] for r in (0, 1)] for step in range(2)])
    expected = reference.trained_modules().state_dict()
    assert ranks[0]["weights"].keys() == expected.keys()
    changed = 0
    for name, weight in expected.items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-4, atol=1e-6, msg=f"weight {name}")
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        changed += not torch.equal(weight, initial[name])
    assert changed > 0.9 * len(expected), f"only {changed} of {len(expected)} weights changed"
