"""Exact resume: a ``kinetoscope fit`` process SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` logs the
same per-step losses, bit for bit, as an uninterrupted run, and ends with the same weights, EMA and optimizer state
(CPU, same seed). Covers data order and position (torchdata's StatefulDataLoader), RNG states (RNGStateCallback: caption dropout
and diffusion noise), the LR schedule and EMA, across an epoch boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from framework.training.checkpointing import load_checkpoint_safely
from framework.training.reliability import read_loss_log

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "reliability" / "tiny.yaml"
MAX_STEPS = 20  # 6 batches per epoch: the run crosses three epoch boundaries
BATCHES_PER_EPOCH = 6


def fit_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "framework.cli.main", "fit", "-c", str(TINY), f"--trainer.max_steps={MAX_STEPS}", *extra]


def start(cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(fit_command(*extra), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(uninterrupted run dir, killed-and-resumed run dir), both trained for MAX_STEPS steps."""
    tmp_path = tmp_path_factory.mktemp("resume")
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference_dir.mkdir()
    resumed_dir.mkdir()
    reference = start(reference_dir)
    victim = start(resumed_dir)
    losses = resumed_dir / "runs" / "tiny" / "losses.jsonl"
    deadline = time.monotonic() + 240
    # kill once the run is past the step-8 checkpoint (mid-way through epoch 1), before it can finish
    while not (losses.is_file() and max(read_loss_log(losses), default=0) >= 9):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint_safely(resumed_dir / "runs" / "tiny" / "checkpoints" / "last.ckpt")
    assert killed_at["global_step"] < MAX_STEPS
    served = killed_at["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_sampler_iter_state"]
    assert 0 < served["yielded"] < BATCHES_PER_EPOCH, f"checkpoint is not mid-epoch: {served}"
    assert served["epoch"] >= 1
    finish(start(resumed_dir, "--ckpt_path=last"))
    finish(reference)
    return reference_dir, resumed_dir


def last_checkpoints(runs: tuple[Path, Path]) -> tuple[dict, dict]:
    return tuple(load_checkpoint_safely(d / "runs" / "tiny" / "checkpoints" / "last.ckpt") for d in runs)


@pytest.mark.slow
def test_resumed_losses_are_bit_identical_at_every_step(runs) -> None:
    expected = read_loss_log(runs[0] / "runs" / "tiny" / "losses.jsonl")
    got = read_loss_log(runs[1] / "runs" / "tiny" / "losses.jsonl")
    assert list(expected) == list(range(1, MAX_STEPS + 1))
    assert got == expected  # float32 losses equal at every step, before and after the kill


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights_optimizer_and_ema_callback(runs) -> None:
    a, b = last_checkpoints(runs)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    ema_a, ema_b = a["callbacks"]["EMACallback"], b["callbacks"]["EMACallback"]
    assert ema_a["num_updates"] == ema_b["num_updates"] == MAX_STEPS
    for key, value in ema_a["average"].items():
        assert torch.equal(value, ema_b["average"][key]), key


# ----------------------------------------------------------------------------------- the loader on its own (fast)
def make_loader(num_workers: int = 0):
    from framework.data.buckets import ShapeBucketBatchSampler
    from framework.data.resumable import resumable_loader

    shapes = [(4, 16, 16)] * 10 + [(4, 16, 24)] * 6  # 3 + 2 batches of 4 (partial batches kept)
    return resumable_loader(list(range(16)), ShapeBucketBatchSampler(shapes, 4, seed=3), list, num_workers)


def test_loader_resumes_after_the_batches_it_served_in_the_saved_epoch() -> None:
    loader = make_loader()
    loader.batch_sampler.set_epoch(2)
    full = list(loader)
    it = iter(loader)
    seen = [next(it), next(it)]
    state = loader.state_dict()
    assert state["_sampler_iter_state"] == {"epoch": 2, "yielded": 2}
    fresh = make_loader()  # a new process: sampler at epoch 0
    fresh.load_state_dict(state)
    assert seen + list(fresh) == full  # epoch 2's order, the rest exactly once
    assert fresh.batch_sampler.epoch == 2
    assert list(fresh) == full  # the skip applies to one iterator only


@pytest.mark.parametrize("finished", [False, True], ids=["last-batch-served", "iterator-exhausted"])
def test_loader_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch(finished: bool) -> None:
    loader = make_loader()
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    if finished:
        assert next(it, None) is None
    fresh = make_loader()
    fresh.load_state_dict(loader.state_dict())
    loader.batch_sampler.set_epoch(1)
    assert list(fresh) == list(loader)
    assert fresh.batch_sampler.epoch == 1
