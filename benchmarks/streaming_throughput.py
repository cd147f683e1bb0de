"""Decode throughput: the manifest path (mp4 decoded in DataLoader workers) against the streaming path (LitData chunks
written once by ``kinetoscope optimize``), in frames per second delivered to the training loop, side by side in one
run. Writes ``benchmarks/results/streaming_throughput/<time>-<commit>.json``.

    .venv/bin/python benchmarks/streaming_throughput.py --clips 24 --size 128 --frames 16 --workers 2 --runs 3

The clips are synthetic (frame-numbered mp4, H.264) unless ``--manifest`` names a real one. One epoch per run and
path, after a warm-up epoch; the optimize time is reported separately (it is paid once per dataset).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.results_store import save_result  # noqa: E402


def frames_per_second(loader) -> tuple[float, int]:
    start, frames = time.perf_counter(), 0
    for batch in loader:
        frames += sum(v.shape[1] for v in batch["videos"])
    return frames / (time.perf_counter() - start), frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=None, help="a real manifest (default: synthetic clips)")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--size", type=int, default=128, help="bucket resolution (square)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from framework.data.buckets import Bucket, BucketConfig, TokenGeometry
    from framework.data.datamodules import ManifestVideoDataModule
    from framework.data.manifest import ClipSampling
    from framework.data.streaming import StreamingVideoDataModule, optimize_manifest
    from manifest_media import write_manifest, write_numbered_mp4

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        manifest = args.manifest
        if manifest is None:
            rows = []
            for i in range(args.clips):
                write_numbered_mp4(tmp / f"clip{i}.mp4", args.frames * 2, args.size, args.size, fps=24)
                rows.append({"path": str(tmp / f"clip{i}.mp4"), "caption": f"clip {i}"})
            manifest = write_manifest(tmp / "manifest.csv", rows)
        geometry = TokenGeometry(patch_h=4, patch_w=4)
        data = ManifestVideoDataModule(
            manifest, buckets=BucketConfig(resolutions=[args.size], aspect_ratios=[1.0], frame_counts=[args.frames],
                                           size_multiple=16),
            geometry=geometry, tokens_per_batch=geometry.tokens(Bucket(args.frames, args.size, args.size)) * args.batch_size,
            clip=ClipSampling(fps=12.0), num_workers=args.workers)  # batch_size clips per batch on both paths
        start = time.perf_counter()
        counts = optimize_manifest(data, str(tmp / "optimized"), workers=args.workers, chunk_bytes="16MB")
        optimize_s = time.perf_counter() - start
        stream = StreamingVideoDataModule(str(tmp / "optimized"), batch_size=args.batch_size,
                                          num_workers=args.workers, cache_dir=tmp / "cache")
        loaders = {"manifest": data.train_dataloader(), "streaming": stream.train_dataloader()}
        for loader in loaders.values():
            frames_per_second(loader)  # warm-up: worker start, page cache
        runs: dict[str, list[float]] = {name: [] for name in loaders}
        frames = {}
        for _ in range(args.runs):
            for name, loader in loaders.items():  # interleaved, so load on the machine hits both alike
                fps, frames[name] = frames_per_second(loader)
                runs[name].append(fps)
    summary = {name: {"frames_per_s_mean": statistics.mean(v), "frames_per_s_min": min(v),
                      "frames_per_s_max": max(v), "frames_per_epoch": frames[name], "runs": v}
               for name, v in runs.items()}
    payload = {"config": vars(args) | {"manifest": str(args.manifest) if args.manifest else None},
               "optimize": {**counts, "seconds": optimize_s, "frames_per_s": counts["written"] * args.frames / optimize_s},
               "paths": summary}
    path = save_result("streaming_throughput", payload)
    for name, s in summary.items():
        print(f"{name:>9}: {s['frames_per_s_mean']:.0f} frames/s (min {s['frames_per_s_min']:.0f}, "
              f"max {s['frames_per_s_max']:.0f}, {args.runs} runs)")
    print(f"optimize: {payload['optimize']['frames_per_s']:.0f} frames/s once; wrote {path}")


if __name__ == "__main__":
    main()
