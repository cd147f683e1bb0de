"""Small media files for the manifest / bucket tests: frame-numbered videos, stills and broken files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from framework.data.video_io import write_frame_grid, write_video

LEVEL_STEP = 8  # grey level step between consecutive frames of a numbered clip


def numbered_video(frames: int, height: int, width: int) -> torch.Tensor:
    """Frame k is uniform grey at level k * LEVEL_STEP, so a decoded frame tells which source frame it was."""
    levels = torch.arange(frames, dtype=torch.float32) * LEVEL_STEP / 127.5 - 1.0  # [T]
    return levels[None, :, None, None].expand(3, frames, height, width).clone()  # [3, T, H, W]


def frame_numbers(video: torch.Tensor) -> list[int]:
    """Inverse of ``numbered_video`` for decoded clips: the source frame index of each frame."""
    centre = video[:, :, video.shape[2] // 2, video.shape[3] // 2].mean(0)  # [T]
    return [round(v) for v in ((centre + 1.0) * 127.5 / LEVEL_STEP).tolist()]


def write_numbered_mp4(path: Path, frames: int, height: int, width: int, fps: float) -> Path:
    return write_video(path, numbered_video(frames, height, width), fps=fps)


def write_still(path: Path, height: int, width: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    return write_frame_grid(path, torch.rand(3, 1, height, width, generator=g) * 2 - 1)


def write_corrupt(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def write_truncated_mp4(path: Path) -> Path:
    write_numbered_mp4(path, 12, 32, 32, fps=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_frame_avi(path: Path) -> Path:
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # header + index, but not a single frame
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """CSV (by suffix .csv, columns = union of the rows' keys) or JSONL."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def mixed_media(folder: Path) -> tuple[list[dict], dict[str, str]]:
    """Good videos (landscape, portrait, square) and stills, plus one broken file of each kind.

    -> (manifest rows with relative paths, {broken file name: what is wrong with it}).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (t, h, w) in {
        "wide.mp4": (12, 36, 64), "tall.mp4": (12, 64, 36), "square.mp4": (10, 48, 48), "short.mp4": (5, 32, 32),
    }.items():
        write_numbered_mp4(folder / name, t, h, w, fps=8)
        rows.append({"path": name, "caption": f"a clip called {name}"})
    for i, (h, w) in enumerate([(36, 64), (48, 48), (64, 40)]):
        write_still(folder / f"still{i}.png", h, w, seed=i)
        rows.append({"path": f"still{i}.png", "caption": f"still number {i}"})
    broken = {
        "corrupt.mp4": "random bytes",
        "truncated.mp4": "cut in half",
        "zero.avi": "no frames",
        "missing.mp4": "does not exist",
        "broken.png": "not an image",
        "tiny.png": "smaller than every bucket",
    }
    write_corrupt(folder / "corrupt.mp4")
    write_truncated_mp4(folder / "truncated.mp4")
    write_zero_frame_avi(folder / "zero.avi")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write_still(folder / "tiny.png", 8, 8)
    rows += [{"path": name, "caption": f"broken: {why}"} for name, why in broken.items()]
    return rows, broken


def tiny_model():
    """A VideoDiffusion small enough to train a few steps in a test (pixel space, 4x4 patches)."""
    from framework.modules import VideoDiffusion
    from plugins.compressors.pixel import PixelCompressor
    from plugins.conditioners.hashed_text import HashedTextConditioner
    from plugins.denoisers.dit import DiT
    from plugins.patchers.spacetime import SpacetimePatcher
    from plugins.samplers.rectified_flow import RectifiedFlow

    return VideoDiffusion(PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
                          HashedTextConditioner(width=32, depth=1, num_heads=2), RectifiedFlow(), sampling_steps=2)


# ---------------------------------------------------------------------------------------- fit through the CLI
REPO = Path(__file__).resolve().parents[1]
TINY_MANIFEST_CONFIG = REPO / "tests" / "reliability" / "tiny_manifest.yaml"
RUN_DIR = Path("runs") / "tiny_manifest"  # the config's output folder, relative to the working directory
# ``kinetoscope fit ...`` as a script: optionally decode a video in this process first -- what a preview, or the
# VideoMetrics callback's reference clips, does before training starts -- then run the real CLI entry point.
FIT_DRIVER = ("import sys\n"
              "from framework.data.video_io import read_video\n"
              "from framework.cli.main import main\n"
              "if sys.argv[1]:\n"
              "    read_video(sys.argv[1])\n"
              "sys.exit(main(sys.argv[2:]))\n")


@dataclass
class FitRun:
    returncode: int | None  # None: still running at the time limit (a hang), killed with its workers
    output: str  # stdout and stderr
    seconds: float
    run_dir: Path

    @property
    def skipped(self) -> dict[str, str]:
        """{path: reason} from the run's ``skipped_samples.json``."""
        record = json.loads((self.run_dir / "skipped_samples.json").read_text())
        assert record["count"] == len(record["skipped"])
        return {entry["path"]: entry["reason"] for entry in record["skipped"]}

    @property
    def trained_ids(self) -> list[str]:
        """Sample ids of every training step, in order (LossLog)."""
        lines = (self.run_dir / "losses.jsonl").read_text().splitlines()
        return [i for line in lines if line.strip() for i in json.loads(line)["ids"]]


def run_bounded(command: list[str], timeout_s: float, cwd: Path | None = None) -> tuple[int | None, str]:
    """Run ``command`` in its own session -> (exit code, stdout + stderr); exit code None when it was still running
    after ``timeout_s`` (a hang): then it is killed with every process it started (DataLoader workers, a fork
    server), so a hang fails the caller instead of blocking it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


def run_fit(cwd: Path, manifest: Path, *extra: str, num_workers: int, timeout_s: float,
            decode_first: Path | None = None, config: Path = TINY_MANIFEST_CONFIG) -> FitRun:
    """``kinetoscope fit -c config --data.init_args.manifest=... --data.init_args.num_workers=...`` in a fresh
    process in ``cwd`` (``run_bounded``), after decoding ``decode_first`` in that process when given."""
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", FIT_DRIVER, str(decode_first or ""), "fit", "-c", str(config),
               f"--data.init_args.manifest={manifest}", f"--data.init_args.num_workers={num_workers}", *extra]
    started = time.monotonic()
    returncode, output = run_bounded(command, timeout_s, cwd)
    return FitRun(returncode, output, time.monotonic() - started, cwd / RUN_DIR)
