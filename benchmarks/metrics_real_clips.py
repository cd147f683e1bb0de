"""Do the metrics tell real videos from the same videos shuffled in time? (shared/data/videos)

Every clip of the developer set is scored as it is and with its frames in a fixed random order (same pixels, broken
time): the temporal metrics of both versions, and FVD (real TF-Hub I3D, 16-frame clips at 224x224) of the shuffled
set against the originals, next to FVD of the originals against themselves (0 by definition). Clips shorter than 16
frames are left out of FVD only. Needs the I3D weights for FVD (``kinetoscope fetch-i3d``; else FVD is skipped).

    python benchmarks/metrics_real_clips.py [--videos ../shared/data/videos] [--max-frames 64]

Writes benchmarks/results/metrics_real_clips.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framework.metrics.evaluation import VideoMetricSuite, load_videos
from framework.metrics.fvd import FrechetVideoDistance
from framework.metrics.i3d_weights import I3DWeightsMissingError, load_i3d

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "metrics_real_clips.json"


def shuffle_time(video: torch.Tensor, seed: int) -> torch.Tensor:
    """The same frames in a random order (a fixed permutation per clip)."""
    order = torch.randperm(video.shape[1], generator=torch.Generator().manual_seed(seed))
    return video[:, order]  # [3, T, H, W]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=str(REPO.parent / "shared" / "data" / "videos"))
    parser.add_argument("--max-frames", type=int, default=64)
    args = parser.parse_args()
    source = Path(args.videos)
    manifest = source / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"no manifest at {manifest}: the shared developer clips are not available here")
    loaded = load_videos(manifest, max_frames=args.max_frames, progress=True)
    shuffled = [shuffle_time(v, i) for i, v in enumerate(loaded.videos)]

    start = time.perf_counter()
    temporal = VideoMetricSuite(None)
    temporal.update(loaded.videos, real=True)  # "real" = in order, "fake" = shuffled
    temporal.update(shuffled, real=False)
    temporal_results = temporal.compute()
    temporal_s = time.perf_counter() - start

    fvd_results: dict[str, float | int | str] = {}
    try:
        i3d = load_i3d()
    except I3DWeightsMissingError as e:
        fvd_results["skipped"] = str(e)
    else:
        long_enough = [i for i, v in enumerate(loaded.videos) if v.shape[1] >= 16]
        start = time.perf_counter()
        fvd = FrechetVideoDistance(i3d, batch_size=4)
        real_features = fvd.extract_features([loaded.videos[i] for i in long_enough])  # [N, 400]
        shuffled_features = fvd.extract_features([shuffled[i] for i in long_enough])  # [N, 400]
        fvd.update_features(real_features, real=True)
        fvd.update_features(shuffled_features, real=False)
        fvd_results["fvd_ordered_vs_shuffled"] = float(fvd.compute()["fvd"])
        fvd.reset()
        fvd.update_features(real_features, real=True)
        fvd.update_features(real_features, real=False)
        fvd_results["fvd_ordered_vs_itself"] = float(fvd.compute()["fvd"])
        fvd_results["fvd_clips"] = len(long_enough)
        fvd_results["fvd_seconds"] = round(time.perf_counter() - start, 1)

    result = {
        "videos": len(loaded.videos),
        "skipped": loaded.skipped,
        "max_frames": args.max_frames,
        "temporal_ordered": {k.split("/", 1)[1]: v for k, v in temporal_results.items() if k.startswith("real/")},
        "temporal_shuffled": {k.split("/", 1)[1]: v for k, v in temporal_results.items() if k.startswith("fake/")},
        "temporal_seconds": round(temporal_s, 1),
        **fvd_results,
        "note": "2 shared CPU cores; flow on frames downscaled to <= 256 px",
    }
    print(json.dumps(result, indent=2))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
