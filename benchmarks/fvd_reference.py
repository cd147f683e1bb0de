"""Does our PyTorch I3D + Fréchet distance reproduce the published TF-Hub FVD? (universome/fvd-comparison check)

128 "fake" videos ``np.random.RandomState(1).rand(128, 16, 224, 224, 3)`` vs 128 "real" ones from ``RandomState(2)``,
fed to I3D as they are (values in [0, 1], as in that script), features = the 400 time-averaged logits.
Published: TF-Hub 10.13808537, StyleGAN-V's TorchScript port 10.13808477. Needs the real weights
(``kinetoscope fetch-i3d``). Heavy on a CPU: 256 clips of 16x224x224 through I3D.

    python benchmarks/fvd_reference.py [--num-videos 128] [--batch-size 8]

Writes benchmarks/results/fvd_reference/<time>-<commit>.json (benchmarks/results_store.py; the first run's
result is benchmarks/results/fvd_reference.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_store import save_result  # noqa: E402
from framework.metrics.fvd import FrechetVideoDistance, fvd_comparison_videos  # noqa: E402
from framework.metrics.i3d_weights import load_i3d  # noqa: E402

PUBLISHED_TF_HUB = 10.13808537
PUBLISHED_STYLEGAN_V = 10.13808477


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-videos", type=int, default=128, help="per set (the published check uses 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save-features", help="also save the feature statistics (sums, outer-product sums, counts; .pt) to recompute the distance later")
    args = parser.parse_args()

    i3d = load_i3d()
    metric = FrechetVideoDistance(i3d)
    start = time.perf_counter()
    for seed, real in ((1, False), (2, True)):
        for batch in fvd_comparison_videos(seed, args.num_videos, args.batch_size):  # [b, 3, 16, 224, 224] in [0, 1]
            with torch.no_grad():
                metric.update_features(i3d(batch), real=real)  # as-is: no resize, no [-1, 1] rescale
            print(f"seed {seed}: {int(metric.real_count if real else metric.fake_count)} clips, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    if args.save_features:
        torch.save({name: getattr(metric, name) for name in metric._defaults}, args.save_features)
    fvd = float(metric.compute()["fvd"])
    result = {
        "check": "universome/fvd-comparison compare_metrics.py: RandomState(1) vs RandomState(2), 16x224x224x3 in [0,1]",
        "num_videos_per_set": args.num_videos,
        "fvd": fvd,
        "published_tf_hub": PUBLISHED_TF_HUB,
        "published_stylegan_v": PUBLISHED_STYLEGAN_V,
        "relative_error_vs_tf_hub": abs(fvd - PUBLISHED_TF_HUB) / PUBLISHED_TF_HUB,
        "i3d_seconds_total": round(seconds, 1),
        "clips": 2 * args.num_videos,
        "device": "cpu",
        "note": "published values only apply to num_videos_per_set=128; CPU shared with other jobs, timing noisy",
    }
    print(json.dumps(result, indent=2))
    if args.num_videos == 128:
        print(f"wrote {save_result('fvd_reference', result)}")


if __name__ == "__main__":
    main()
