"""How much does each FVD preprocessing choice move FVD on real clips? (shared/data/videos, real I3D weights)

Every video with at least 16 frames is cut into non-overlapping 16-frame windows (frames 0-15, 16-31, ...); set A
holds the even windows, set B the odd ones, so FVD(A, B) compares two samples of the same footage, as a model's
samples are compared with real clips. The same windows are then embedded under each combination of

* resize: ``tf1_bilinear`` (original FVD code) vs ``half_pixel`` (``F.interpolate``; StyleGAN-V),
* decode: ``bicubic_full_chroma`` (ours) vs ``plain_rgb24`` (PyAV's default conversion; StyleGAN-V / TATS),

and, for the frame count/stride choice, set A = the clip at frame 0 and set B = the clip at frame 32 of each 64-frame
video, once as 16 consecutive frames and once as 16 frames of stride 2 (frames 0-30 / 32-62). Also reported: how often
the top-1 Kinetics class changes with the resize alone and with the decode alone.

    python benchmarks/fvd_presets.py [--videos ../shared/data/videos] [--batch-size 8]

Needs ``kinetoscope fetch-i3d``. Writes benchmarks/results/fvd_presets/<time>-<commit>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_store import save_result  # noqa: E402
from framework.data.video_io import RGBConversion  # noqa: E402
from framework.metrics.evaluation import load_videos  # noqa: E402
from framework.metrics.fvd import FrechetVideoDistance, FVDPreset, FVDProtocol, ResizeKernel  # noqa: E402
from framework.metrics.i3d_weights import load_i3d  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WINDOW = 16


def fvd_between(metric: FrechetVideoDistance, a: torch.Tensor, b: torch.Tensor) -> float:
    metric.reset()
    metric.update_features(a, real=True)
    metric.update_features(b, real=False)
    return float(metric.compute()["fvd"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=str(REPO.parent / "shared" / "data" / "videos"))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    manifest = Path(args.videos) / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"no manifest at {manifest}: the shared developer clips are not available here")
    i3d = load_i3d()
    start = time.perf_counter()
    decoded = {conversion: load_videos(manifest, max_frames=64, min_frames=WINDOW, conversion=conversion)
               for conversion in RGBConversion}
    names = decoded[RGBConversion.BICUBIC_FULL_CHROMA].names

    def windows(conversion: RGBConversion, starts_of, stride: int = 1) -> list[torch.Tensor]:
        return [video[:, s: s + (WINDOW - 1) * stride + 1: stride]
                for video in decoded[conversion].videos for s in starts_of(video.shape[1])]

    def embed(clips: list[torch.Tensor], protocol: FVDProtocol) -> torch.Tensor:
        metric = FrechetVideoDistance(i3d, protocol, batch_size=args.batch_size)
        return torch.cat([metric.extract_features(clips[i: i + args.batch_size])
                          for i in range(0, len(clips), args.batch_size)])  # [N, 400]

    every_window = lambda frames: range(0, frames - WINDOW + 1, WINDOW)  # noqa: E731
    base = FVDPreset.ORIGINAL_TF1.value
    metric = FrechetVideoDistance(i3d, base)
    rows, features = [], {}
    for conversion in RGBConversion:
        clips = windows(conversion, every_window)  # video-major, windows in order
        parity = torch.tensor([i for video in decoded[conversion].videos for i in range(len(every_window(video.shape[1])))]) % 2
        for resize in ResizeKernel:
            protocol = dataclasses.replace(base, name=f"{resize.value}+{conversion.value}", resize=resize,
                                           decode=conversion)
            feats = embed(clips, protocol)
            features[(resize, conversion)] = feats
            fvd = fvd_between(metric, feats[parity == 0], feats[parity == 1])
            rows.append({"resize": resize.value, "decode": conversion.value, "fvd": fvd,
                         "clips_a": int((parity == 0).sum()), "clips_b": int((parity == 1).sum())})
            print(rows[-1], f"{time.perf_counter() - start:.0f} s", flush=True)
    reference = next(r["fvd"] for r in rows if r["resize"] == "tf1_bilinear" and r["decode"] == "bicubic_full_chroma")
    for row in rows:
        row["change_vs_original_tf1"] = row["fvd"] / reference - 1

    top1 = {}
    for conversion in RGBConversion:
        a, b = (features[(k, conversion)].argmax(1) for k in ResizeKernel)
        top1[f"resize changes top-1 ({conversion.value} decode)"] = float((a != b).double().mean())
    for resize in ResizeKernel:
        a, b = (features[(resize, c)].argmax(1) for c in RGBConversion)
        top1[f"decode changes top-1 ({resize.value} resize)"] = float((a != b).double().mean())

    long_videos = [v for v in decoded[RGBConversion.BICUBIC_FULL_CHROMA].videos if v.shape[1] >= 63]
    stride_rows = []
    for stride in (1, 2):
        clips = [video[:, s: s + (WINDOW - 1) * stride + 1: stride] for video in long_videos for s in (0, 32)]
        feats = embed(clips, base)
        fvd = fvd_between(metric, feats[0::2], feats[1::2])
        stride_rows.append({"frame_stride": stride, "clip_a_start": 0, "clip_b_start": 32, "fvd": fvd,
                            "clips_per_set": len(long_videos)})
        print(stride_rows[-1], flush=True)
    stride_rows[1]["change_vs_stride_1"] = stride_rows[1]["fvd"] / stride_rows[0]["fvd"] - 1

    result = {
        "videos": names, "window": WINDOW, "resize_and_decode": rows, "top1_changes": top1,
        "frame_stride": stride_rows, "seconds": round(time.perf_counter() - start, 1),
        "note": "FVD from ~25 clips per set against 400-d features: rank-deficient covariances, so absolute values "
                "are large; the relative changes between preprocessing choices are the point",
    }
    print(result)
    print(f"wrote {save_result('fvd_presets', result)}")


if __name__ == "__main__":
    main()
