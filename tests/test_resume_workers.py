"""Exact resume with DataLoader workers: a ``kinetoscope fit`` with ``num_workers: 2``, SIGKILLed mid-epoch (with its
workers) and resumed with ``--ckpt_path last``, logs the same per-step losses and sample ids, bit for bit, as an
uninterrupted run -- on the manifest path (real mp4 files, random clip starts) and on the streaming path (the same
files through ``kinetoscope optimize`` and LitData's ``StreamingDataLoader``, whose state Lightning checkpoints).

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

import yaml

CONFIGS = {"manifest": REPO / "tests" / "reliability" / "tiny_manifest_resume.yaml",
           "stream": REPO / "tests" / "reliability" / "tiny_stream_resume.yaml"}
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


def optimize(tmp: Path, manifest: Path) -> Path:
    """``kinetoscope optimize`` of the manifest (clip windows fixed at random starts) into small LitData chunks, so
    that both workers stream some."""
    config = yaml.safe_load(CONFIGS["manifest"].read_text())
    config["data"]["init_args"]["manifest"] = str(manifest)
    (tmp / "optimize.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "framework.cli.main", "optimize", "-c", str(tmp / "optimize.yaml"),
               "--output", str(tmp / "optimized"), "--workers", "2", "--chunk-bytes", "50KB"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return tmp / "optimized"


def start(cwd: Path, path: str, source: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(exist_ok=True)
    source_key = "manifest" if path == "manifest" else "input_dir"
    command = [sys.executable, "-m", "framework.cli.main", "fit", "-c", str(CONFIGS[path]),
               f"--data.init_args.{source_key}={source}", "--data.init_args.num_workers=2", *extra]
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


@pytest.fixture(scope="module", params=["manifest", "stream"])
def runs(request, tmp_path_factory) -> tuple[Path, Path]:
    path = request.param
    if path == "stream":
        pytest.importorskip("litdata")
    tmp = tmp_path_factory.mktemp(f"resume_workers_{path}")
    source = media(tmp / "media")
    if path == "stream":
        source = optimize(tmp, source)
    reference = start(tmp / "reference", path, source)
    victim = start(tmp / "resumed", path, source)
    losses = tmp / "resumed" / RUN / "losses.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    # kill once a mid-epoch checkpoint is written and the next step trained: step 6 is one batch into the manifest
    # path's epoch 1 (5 batches per epoch), step 8 two into the stream's (6 batches of 2)
    kill_after = 7 if path == "manifest" else 9
    while not (losses.is_file() and max(read_loss_log(losses), default=0) >= kill_after):
        assert victim.poll() is None, "the run ended before it could be killed:\n" + victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    killed_at = load_checkpoint_safely(tmp / "resumed" / RUN / "checkpoints" / "last.ckpt")
    assert 5 < killed_at["global_step"] < MAX_STEPS
    if path == "manifest":
        assert killed_at["global_step"] % 5, "checkpoint is not mid-epoch"
    else:
        state = killed_at["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        assert state["current_epoch"] == 2 and 0 < state["num_samples_yielded"] < 12, state  # LitData counts from 1
    finish(start(tmp / "resumed", path, source, "--ckpt_path=last"))
    finish(reference)
    return tmp / "reference" / RUN, tmp / "resumed" / RUN


@pytest.mark.slow
def test_resume_with_two_workers_gives_bit_identical_losses_and_samples(runs) -> None:
    reference, resumed = runs
    expected = read_loss_log(reference / "losses.jsonl")
    assert list(expected) == list(range(1, MAX_STEPS + 1))
    assert step_ids(resumed) == step_ids(reference)  # the same samples at every step
    assert read_loss_log(resumed / "losses.jsonl") == expected  # float32 losses equal at every step


@pytest.mark.slow
def test_random_clip_starts_are_drawn_in_the_workers_and_restored(runs, request) -> None:
    """The checkpoint carries each worker's dataset RNG (not only the main process's): without it the resumed
    workers would draw the clip starts of a fresh run."""
    if "manifest" not in request.node.callspec.id:
        pytest.skip("streamed clips were cut at optimize time: the workers draw nothing")
    checkpoint = load_checkpoint_safely(runs[1] / "checkpoints" / "last.ckpt")
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    workers = loader_state["_snapshot"]["_worker_snapshots"]
    assert len(workers) == 2
    states = [w["dataset_state"]["rng"] for w in workers.values()]
    assert states[0] != states[1]  # two workers, two streams of clip starts
