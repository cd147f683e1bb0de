"""FVD feature extraction: ours vs a straightforward per-clip PyTorch port of the same I3D, side by side in one run.

Both turn the same ``--clips`` videos (16 frames of 128x128, resized to 224x224) into the 400 I3D features with the
same weights (random: the cost does not depend on the values):

* ``plain``: what a direct port does -- one clip at a time, ``F.interpolate`` resize, every layer as
  ``F.pad`` + ``conv3d`` + BatchNorm + ReLU on contiguous NCDHW tensors, the four Inception branches one by one.
* ``ours``: ``FrechetVideoDistance.extract_features`` -- batches of ``--batch-size`` clips through
  ``framework.metrics.i3d.InceptionI3D`` (BatchNorm folded into the convolutions, padding inside them, one conv for
  the three 1x1 heads, channels-last on CPU).
* ``ours_batch_1``: the same one clip at a time, to separate what batching adds from what the layers gain.

The two alternate ``--repeats`` times (so load from other jobs hits both alike); every repeat's seconds per clip are
kept, with the features' largest relative difference. The machine's 2 cores are shared, so compare the ratio.

    python benchmarks/fvd_timing.py [--clips 8] [--batch-size 8] [--repeats 3]

Writes benchmarks/results/fvd_timing/<time>-<commit>.json (benchmarks/results_store.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_store import save_result  # noqa: E402
from framework.metrics.fvd import FrechetVideoDistance, FVDPreset  # noqa: E402
from framework.metrics.i3d import InceptionBlock, InceptionI3D, MaxPool3dSame, Unit3D, tf_same_padding  # noqa: E402


def plain_unit(unit: Unit3D, x: Tensor) -> Tensor:
    x = F.pad(x, tf_same_padding(tuple(x.shape[2:]), unit.kernel, unit.stride))
    x = F.conv3d(x, unit.conv_3d.weight, unit.conv_3d.bias, unit.stride)
    if unit.batch_norm is None:
        return x
    bn = unit.batch_norm
    x = (x - bn.moving_mean[:, None, None, None]) / torch.sqrt(bn.moving_variance + bn.eps)[:, None, None, None]
    return F.relu(x + bn.beta[:, None, None, None])


def plain_pool(pool: MaxPool3dSame, x: Tensor) -> Tensor:
    x = F.pad(x, tf_same_padding(tuple(x.shape[2:]), pool.kernel, pool.stride), value=float("-inf"))
    return F.max_pool3d(x, pool.kernel, pool.stride)


def plain_layer(layer: torch.nn.Module, x: Tensor) -> Tensor:
    if isinstance(layer, Unit3D):
        return plain_unit(layer, x)
    if isinstance(layer, MaxPool3dSame):
        return plain_pool(layer, x)
    assert isinstance(layer, InceptionBlock)
    branches = []
    for branch in (layer.Branch_0, layer.Branch_1, layer.Branch_2, layer.Branch_3):
        y = x
        for sub in branch.values():
            y = plain_layer(sub, y)
        branches.append(y)
    return torch.cat(branches, dim=1)


def plain_features(model: InceptionI3D, video: Tensor) -> Tensor:
    """One video [3, T, H, W] in [-1, 1] -> [400], the way a direct port computes it."""
    frames = F.interpolate(video[:, :16].transpose(0, 1), size=(224, 224), mode="bilinear", align_corners=False)
    x = frames.transpose(0, 1)[None].contiguous()  # [1, 3, 16, 224, 224]
    for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                 *model.block_names):
        x = plain_layer(getattr(model, name), x)
    x = F.avg_pool3d(x, (2, 7, 7), stride=1)
    logits = plain_unit(model.Logits["Conv3d_0c_1x1"], x)  # [1, 400, T', 1, 1]
    return logits[:, :, :, 0, 0].mean(dim=2)[0]  # [400]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = InceptionI3D().eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if hasattr(module, "moving_variance"):
            module.moving_variance.uniform_(0.5, 2.0)
            module.moving_mean.normal_(0, 0.1)
            module.beta.data.normal_(0, 0.1)
    videos = torch.rand(args.clips, 3, 16, 128, 128) * 2 - 1  # [N, 3, T, H, W]
    protocol = FVDPreset.STYLEGAN_V.value  # F.interpolate resize, as the plain port does
    metric = FrechetVideoDistance(model, protocol, batch_size=args.batch_size)
    unbatched = FrechetVideoDistance(model, protocol, batch_size=1)

    seconds: dict[str, list[float]] = {"plain": [], "ours": [], "ours_batch_1": []}
    with torch.inference_mode():
        plain_features(model, videos[0]), metric.extract_features(videos[:1])  # warm-up (oneDNN primitives)
        for _ in range(args.repeats):
            start = time.perf_counter()
            plain = torch.stack([plain_features(model, v) for v in videos])  # [N, 400]
            seconds["plain"].append((time.perf_counter() - start) / args.clips)
            start = time.perf_counter()
            ours = metric.extract_features(videos)  # [N, 400] float64
            seconds["ours"].append((time.perf_counter() - start) / args.clips)
            start = time.perf_counter()
            unbatched.extract_features(videos)
            seconds["ours_batch_1"].append((time.perf_counter() - start) / args.clips)
            print({k: round(v[-1], 3) for k, v in seconds.items()}, flush=True)
    difference = float((ours.float() - plain).abs().max() / plain.abs().max())
    result = {
        "clips": args.clips, "batch_size": args.batch_size, "repeats": args.repeats,
        "clip": "16x128x128 resized to 16x224x224, random I3D weights",
        "seconds_per_clip": {k: v for k, v in seconds.items()},
        "median_seconds_per_clip": {k: statistics.median(v) for k, v in seconds.items()},
        "speedup_median": statistics.median(seconds["plain"]) / statistics.median(seconds["ours"]),
        "speedup_batch_1_median": statistics.median(seconds["plain"]) / statistics.median(seconds["ours_batch_1"]),
        "speedup_per_repeat": [p / o for p, o in zip(seconds["plain"], seconds["ours"])],
        "max_relative_feature_difference": difference,
        "note": "2 CPU cores shared with other jobs: absolute seconds are noisy, the ratio less so",
    }
    print(result)
    print(f"wrote {save_result('fvd_timing', result)}")


if __name__ == "__main__":
    main()
