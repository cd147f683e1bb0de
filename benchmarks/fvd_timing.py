"""How long does FVD take per 256 clips (the published check's size) on this machine?

Times the three stages separately on ``--clips`` clips of 16 frames (default 16, extrapolated linearly to 256
because I3D's cost is per clip): resizing 128x128 frames to 224x224 (TF1 bilinear), the I3D forward pass (random
weights: the cost does not depend on the values), and the float64 Fréchet distance of two 400-d Gaussians (done
once per FVD, not per clip). CPU timings are noisy (the 2 cores are shared), so the JSON records the thread count.

    python benchmarks/fvd_timing.py [--clips 16] [--batch-size 8] [--device cpu]

Writes benchmarks/results/fvd_timing.json (fvd_timing_<device>.json for other devices).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from framework.metrics.frechet import frechet_distance
from framework.metrics.fvd import prepare_clips
from framework.metrics.i3d import InceptionI3D

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = InceptionI3D().eval().to(device)
    videos = torch.rand(args.clips, 3, 16, 128, 128) * 2 - 1  # [N, 3, T, H, W]

    with torch.no_grad():
        model(prepare_clips(videos[:1], 16).to(device))  # warm-up (allocator, oneDNN primitive creation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        resize_s = forward_s = 0.0
        for batch in videos.split(args.batch_size):
            start = time.perf_counter()
            clips = prepare_clips(batch, 16).to(device)  # [b, 3, 16, 224, 224]
            resize_s += time.perf_counter() - start
            start = time.perf_counter()
            model(clips)
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward_s += time.perf_counter() - start

    features = torch.randn(256, 400, dtype=torch.float64)
    start = time.perf_counter()
    frechet_distance(features[:128].mean(0), torch.cov(features[:128].T), features[128:].mean(0),
                     torch.cov(features[128:].T))
    frechet_s = time.perf_counter() - start

    per_clip = (resize_s + forward_s) / args.clips
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "clips_measured": args.clips,
        "batch_size": args.batch_size,
        "resize_s_per_clip": resize_s / args.clips,
        "i3d_s_per_clip": forward_s / args.clips,
        "frechet_distance_s": frechet_s,
        "fvd_s_per_256_clips_extrapolated": 256 * per_clip + frechet_s,
        "extrapolated_from": f"{args.clips} clips (linear in clips)",
        "machine": platform.platform(),
        "note": "CPU shared with other jobs: timings are noisy",
    }
    print(json.dumps(result, indent=2))
    name = "fvd_timing.json" if device.type == "cpu" else f"fvd_timing_{device.type}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
