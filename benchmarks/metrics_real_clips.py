"""Do the metrics tell real videos from the same videos shuffled in time or stuttering? (shared/data/videos)

Every clip of the developer set is scored as it is, with its frames in a fixed random order (same pixels, broken
time) and stuttered (every other frame replaced by a copy of its predecessor): the temporal metrics and the
frame-repetition flags of all three versions, and FVD (real TF-Hub I3D, 16-frame clips at 224x224) of the shuffled
set against the originals, next to FVD of the originals against themselves (0 by definition). Clips shorter than 16
frames are left out of FVD only. Needs the I3D weights for FVD (``kinetoscope fetch-i3d``; else FVD is skipped).

    python benchmarks/metrics_real_clips.py [--videos ../shared/data/videos] [--max-frames 64] [--no-fvd]
        [--flow-max-size 256]

Writes benchmarks/results/metrics_real_clips/<time>-<commit>.json (benchmarks/results_store.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_store import save_result  # noqa: E402
from framework.data.manifest import read_manifest  # noqa: E402
from framework.metrics.evaluation import VideoMetricSuite  # noqa: E402
from framework.metrics.fvd import FrechetVideoDistance  # noqa: E402
from framework.metrics.i3d_weights import I3DWeightsMissingError, load_i3d  # noqa: E402
from framework.metrics.temporal import frame_repetition, temporal_flickering  # noqa: E402
from framework.data.video_io import VIDEO_SUFFIXES, VideoDecodeError, read_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shuffle_time(video: torch.Tensor, seed: int) -> torch.Tensor:
    """The same frames in a random order (a fixed permutation per clip)."""
    order = torch.randperm(video.shape[1], generator=torch.Generator().manual_seed(seed))
    return video[:, order]  # [3, T, H, W]


def stutter(video: torch.Tensor) -> torch.Tensor:
    """Every other frame replaced by a copy of its predecessor (same length)."""
    held = video.clone()
    held[:, 1::2] = video[:, 0::2][:, : held[:, 1::2].shape[1]]
    return held  # [3, T, H, W]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=str(REPO.parent / "shared" / "data" / "videos"))
    parser.add_argument("--max-frames", type=int, default=64)
    parser.add_argument("--no-fvd", action="store_true", help="temporal metrics and repetition flags only")
    parser.add_argument("--flow-max-size", type=int, default=256, help="optical flow on frames at most this big")
    parser.add_argument("--repetition-only", action="store_true",
                        help="only the per-clip repetition flags and flickering (no optical flow, no FVD): seconds")
    args = parser.parse_args()
    source = Path(args.videos)
    manifest = source / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"no manifest at {manifest}: the shared developer clips are not available here")
    paths = [row.path for row in read_manifest(manifest)]
    skipped: dict[str, str] = {}
    scored = 0

    start = time.perf_counter()
    temporal = VideoMetricSuite(None, flow_max_size=args.flow_max_size)
    stuttered_suite = VideoMetricSuite(None, flow_max_size=args.flow_max_size)
    fvd_results: dict[str, float | int | str] = {}
    try:
        fvd = None if args.no_fvd or args.repetition_only else FrechetVideoDistance(load_i3d(), batch_size=1)
    except I3DWeightsMissingError as e:
        fvd, fvd_results["skipped"] = None, str(e)
    real_features, shuffled_features = [], []
    per_clip: dict[str, dict] = {}
    fvd_s = 0.0
    for i, path in enumerate(tqdm(paths, desc="scoring", unit="video")):
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            skipped[path.name] = "still image"
            continue
        try:  # one full-resolution clip (and its shuffled copy) in memory at a time
            video, _ = read_video(path, max_frames=args.max_frames)  # [3, T, H, W]
        except VideoDecodeError as e:
            skipped[path.name] = e.reason
            continue
        scored += 1
        shuffled, held = shuffle_time(video, i), stutter(video)
        per_clip[path.name] = {
            "original": frame_repetition(video), "stuttered": frame_repetition(held),
            "frozen": frame_repetition(video[:, :1].expand_as(video)),
            "temporal_flickering": {"original": temporal_flickering(video), "stuttered": temporal_flickering(held)},
        }
        if args.repetition_only:
            continue
        temporal.update([video], real=True)  # "real" = in order, "fake" = shuffled
        temporal.update([shuffled], real=False)
        stuttered_suite.update([held], real=False)
        if fvd is not None and video.shape[1] >= 16:
            fvd_start = time.perf_counter()
            real_features.append(fvd.extract_features([video]))  # [1, 400]
            shuffled_features.append(fvd.extract_features([shuffled]))  # [1, 400]
            fvd_s += time.perf_counter() - fvd_start
    temporal_results = {} if args.repetition_only else temporal.compute()
    stuttered_results = {} if args.repetition_only else stuttered_suite.compute()
    temporal_s = time.perf_counter() - start - fvd_s

    if fvd is not None:
        real, fake = torch.cat(real_features), torch.cat(shuffled_features)  # [N, 400] each
        fvd.update_features(real, real=True)
        fvd.update_features(fake, real=False)
        fvd_results["fvd_ordered_vs_shuffled"] = float(fvd.compute()["fvd"])
        fvd.reset()
        fvd.update_features(real, real=True)
        fvd.update_features(real, real=False)
        fvd_results["fvd_ordered_vs_itself"] = float(fvd.compute()["fvd"])
        fvd_results["fvd_clips"] = real.shape[0]
        fvd_results["fvd_seconds"] = round(fvd_s, 1)

    result = {
        "videos": scored,
        "skipped": skipped,
        "max_frames": args.max_frames,
        "flow_max_size": args.flow_max_size,
        "temporal_ordered": {k.split("/", 1)[1]: v for k, v in temporal_results.items() if k.startswith("real/")},
        "temporal_shuffled": {k.split("/", 1)[1]: v for k, v in temporal_results.items() if k.startswith("fake/")},
        "temporal_stuttered": {k.split("/", 1)[1]: v for k, v in stuttered_results.items()},
        "repetition_summary": {
            version: {flag: sum(clip[version][flag] for clip in per_clip.values()) for flag in ("stuttering", "static")}
            for version in ("original", "stuttered", "frozen")
        },
        "stutter_improves_flickering": sum(c["temporal_flickering"]["stuttered"] > c["temporal_flickering"]["original"]
                                           for c in per_clip.values()),
        "per_clip": per_clip,
        "temporal_seconds": round(temporal_s, 1),
        **fvd_results,
        "note": f"2 shared CPU cores; flow on frames downscaled to <= {args.flow_max_size} px",
    }
    print(json.dumps(result, indent=2))
    print(f"wrote {save_result('metrics_real_clips', result)}")


if __name__ == "__main__":
    main()
