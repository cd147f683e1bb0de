"""Does decoding keep up with training? Frames/s of the manifest data pipeline vs frames/s a training step consumes.

On the shared real clips (``../shared/data/videos/manifest.csv``: 19 videos up to 1280x720 and 4 stills), with the
buckets, clip sampling and model of ``examples/real_clips.yaml``:

* ``decode``: the ``ManifestVideoDataModule`` train loader (PyAV seek + decode + swscale resize/crop + collate), with
  2 workers (and 0 for reference), over several epochs: clip frames delivered per second;
* ``train``: the config's model (quickstart DiT) trained by Lightning on the same batches already in memory:
  clip frames consumed per second by forward + backward + optimizer step;
* ``decode_large``: decode only, at 256-pixel buckets with 17-frame clips, for a sense of the cost at larger sizes.

``decode_vs_train`` > 1 means the loader keeps up with training. The CPU is shared with other jobs, so absolute
numbers are noisy; the ratio within one run is what matters.

    python benchmarks/data_pipeline.py            # -> benchmarks/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from framework.cli.lightning_cli import cli_main
from framework.data.buckets import BucketConfig, TokenGeometry
from framework.data.datamodules import ManifestVideoDataModule
from framework.data.manifest import ClipSampling, ClipStart

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "real_clips.yaml"
SHARED = REPO.parent / "shared" / "data" / "videos" / "manifest.csv"
RESULTS = Path(__file__).resolve().parent / "results" / "data_pipeline.json"


def decode_throughput(data: ManifestVideoDataModule, num_workers: int, min_batches: int, min_seconds: float) -> dict:
    """Iterate the train loader for whole epochs until both minimums are reached; clip frames per second."""
    data.num_workers = num_workers
    loader = data.train_dataloader()
    frames = pixels = batches = epochs = 0
    first_batch_s = None
    start = time.perf_counter()
    while batches < min_batches or time.perf_counter() - start < min_seconds:
        loader.batch_sampler.set_epoch(epochs)
        for batch in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - start  # worker start-up included
            frames += sum(v.shape[1] for v in batch["videos"])
            pixels += sum(v.shape[1] * v.shape[2] * v.shape[3] for v in batch["videos"])
            batches += 1
        epochs += 1
    seconds = time.perf_counter() - start
    return {"num_workers": num_workers, "epochs": epochs, "batches": batches, "frames": frames, "seconds": round(seconds, 2),
            "first_batch_s": round(first_batch_s or 0.0, 2), "frames_per_s": round(frames / seconds, 1),
            "megapixels_per_s": round(pixels / seconds / 1e6, 2)}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []  # (seconds, clip frames)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((time.perf_counter() - self._start, sum(v.shape[1] for v in batch["videos"])))


def train_throughput(manifest: Path, batches: list[dict], steps: int, workdir: Path) -> dict:
    """Train the config's model for ``steps`` steps on in-memory batches; clip frames consumed per second."""
    cli = cli_main(["-c", str(CONFIG), f"--data.init_args.manifest={manifest}", "--trainer.logger=false",
                    f"--trainer.default_root_dir={workdir}", "--trainer.enable_progress_bar=false"], run=False)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        default_root_dir=workdir, gradient_clip_val=1.0)
    loader = DataLoader(batches, batch_size=None, shuffle=False)  # already collated batches
    trainer.fit(cli.model, train_dataloaders=loader)
    measured = timer.steps[2:]  # skip warm-up steps
    seconds, frames = sum(s for s, _ in measured), sum(f for _, f in measured)
    return {"steps": len(measured), "frames": frames, "seconds": round(seconds, 2),
            "frames_per_s": round(frames / seconds, 1), "mean_step_s": round(seconds / len(measured), 3),
            "model_parameters": sum(p.numel() for p in cli.model.parameters())}


def config_data(manifest: Path, **overrides) -> ManifestVideoDataModule:
    """The data section of examples/real_clips.yaml, on ``manifest``."""
    args = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
    clip = dict(args["clip"])
    buckets = {**args["buckets"], **overrides.pop("buckets", {})}
    return ManifestVideoDataModule(
        manifest, buckets=BucketConfig(**buckets), geometry=TokenGeometry(**args["geometry"]),
        tokens_per_batch=overrides.pop("tokens_per_batch", args["tokens_per_batch"]),
        max_batch_size=args["max_batch_size"],
        clip=ClipSampling(fps=clip["fps"], start=ClipStart[clip["start"]]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=SHARED)
    parser.add_argument("--min-batches", type=int, default=40)
    parser.add_argument("--min-seconds", type=float, default=20.0)
    parser.add_argument("--train-steps", type=int, default=22)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.manifest.is_file():
        print(f"no manifest at {args.manifest}: this benchmark needs the shared real clips", file=sys.stderr)
        return 1

    data = config_data(args.manifest)
    decode = {f"workers_{n}": decode_throughput(data, n, args.min_batches, args.min_seconds) for n in (2, 0)}
    data.num_workers = 0
    batches = []
    while len(batches) < args.train_steps:
        data.train_dataloader().batch_sampler.set_epoch(len(batches))
        batches += list(data.train_dataloader())
    train = train_throughput(args.manifest, batches[: args.train_steps], args.train_steps, Path("/tmp"))
    large = config_data(args.manifest, buckets={"resolutions": [256], "frame_counts": [1, 17], "size_multiple": 16},
                        tokens_per_batch=65536)
    decode_large = decode_throughput(large, 2, args.min_batches // 4, args.min_seconds)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()
    report = {
        "benchmark": "data_pipeline",
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "commit": commit,
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "note": "CPU shared with other jobs: absolute numbers are noisy, the ratio within one run is what matters",
        "manifest": str(args.manifest),
        "samples": len(data.dataset), "skipped": len(data.skipped_samples),
        "buckets_used": sorted({str(b.shape) for b in data.dataset.buckets}),
        "decode": decode,
        "train": train,
        "decode_vs_train": round(decode["workers_2"]["frames_per_s"] / train["frames_per_s"], 2),
        "decode_large_256px_17f": {**decode_large, "buckets_used": sorted({str(b.shape) for b in large.dataset.buckets})},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name, d in decode.items():
        print(f"decode {name}: {d['frames_per_s']} frames/s ({d['megapixels_per_s']} MP/s) over {d['batches']} batches")
    print(f"train: {train['frames_per_s']} frames/s ({train['mean_step_s']} s/step)")
    print(f"decode (2 workers) / train: {report['decode_vs_train']}")
    print(f"decode at 256 px, 17 frames, 2 workers: {decode_large['frames_per_s']} frames/s "
          f"({decode_large['megapixels_per_s']} MP/s)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
