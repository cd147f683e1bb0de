"""Exact resume with DataLoader workers on the manifest path: a ``kinetoscope fit`` on real mp4 files with
``num_workers: 2`` and random clip starts, SIGKILLed mid-epoch (with its workers) and resumed with
``--ckpt_path last``, logs the same per-step losses and sample ids, bit for bit, as an uninterrupted run.

What makes it hold (``framework/data/resumable.py``): torchdata's ``StatefulDataLoader`` saves the batch sampler's
epoch and position, the workers' base seed, which worker yields next, and each worker's dataset state -- the
``ManifestVideoDataset`` RNG that draws clip starts and captions -- with every batch, and gives them back on resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.training.checkpointing import load_checkpoint_safely
from framework.training.reliability import read_loss_log
from manifest_media import REPO, write_manifest, write_numbered_mp4, write_still

CONFIG = REPO / "tests" / "reliability" / "tiny_manifest_resume.yaml"
RUN = Path("runs") / "tiny_manifest"
MAX_STEPS = 14  # 5 batches per epoch (4 of two clips, 1 of stills): the run crosses two epoch boundaries
TIMEOUT_S = 300


def media(folder: Path) -> Path:
    """8 clips of 16..23 frames at 8 fps (an 8-frame clip can start at several frames) and 4 stills."""
    folder.mkdir()
    rows = []
    for i in range(8):
        write_numbered_mp4(folder / f"clip{i}.mp4", 16 + i, 32, 32, fps=8)
        rows.append({"path": f"clip{i}.mp4", "caption": f"clip number {i}"})
    for i in range(4):
        write_still(folder / f"still{i}.png", 32, 32, seed=i)
        rows.append({"path": f"still{i}.png", "caption": f"still number {i}"})
    return write_manifest(folder / "manifest.csv", rows)


def start(cwd: Path, manifest: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "framework.cli.main", "fit", "-c", str(CONFIG),
               f"--data.init_args.manifest={manifest}", "--data.init_args.num_workers=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # its own session, so a kill takes the workers and the fork server with it
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> None:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"fit still running after {TIMEOUT_S} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]


def step_ids(run_dir: Path) -> dict[int, list[str]]:
    import json

    ids = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            ids[record["step"]] = record["ids"]  # a resumed run's rewritten steps win
    return ids


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("resume_workers")
    manifest = media(tmp / "media")
    reference = start(tmp / "reference", manifest)
    victim = start(tmp / "resumed", manifest)
    losses = tmp / "resumed" / RUN / "losses.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    # kill once the step-6 checkpoint (one batch into epoch 1) is written and step 7 trained
    while not (losses.is_file() and max(read_loss_log(losses), default=0) >= 7):
        assert victim.poll() is None, "the run ended before it could be killed:\n" + victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    killed_at = load_checkpoint_safely(tmp / "resumed" / RUN / "checkpoints" / "last.ckpt")
    assert 5 < killed_at["global_step"] < MAX_STEPS and killed_at["global_step"] % 5, "checkpoint is not mid-epoch"
    finish(start(tmp / "resumed", manifest, "--ckpt_path=last"))
    finish(reference)
    return tmp / "reference" / RUN, tmp / "resumed" / RUN


@pytest.mark.slow
def test_resume_with_two_workers_gives_bit_identical_losses_and_samples(runs) -> None:
    reference, resumed = runs
    expected = read_loss_log(reference / "losses.jsonl")
    assert list(expected) == list(range(1, MAX_STEPS + 1))
    assert read_loss_log(resumed / "losses.jsonl") == expected  # float32 losses equal at every step
    assert step_ids(resumed) == step_ids(reference)


@pytest.mark.slow
def test_random_clip_starts_are_drawn_in_the_workers_and_restored(runs) -> None:
    """The checkpoint carries each worker's dataset RNG (not only the main process's): without it the resumed
    workers would draw the clip starts of a fresh run."""
    checkpoint = load_checkpoint_safely(runs[1] / "checkpoints" / "last.ckpt")
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    workers = loader_state["_snapshot"]["_worker_snapshots"]
    assert len(workers) == 2
    states = [w["dataset_state"]["rng"] for w in workers.values()]
    assert states[0] != states[1]  # two workers, two streams of clip starts
