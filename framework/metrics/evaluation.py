"""One evaluation for training callbacks and the offline ``kinetoscope evaluate`` command.

:class:`VideoMetricSuite` bundles FVD (+ KID) between a real and a generated set with the temporal-consistency
metrics of both sets (the real set's values are the reference to compare against). :func:`load_videos` reads a
folder of clips or a manifest; unreadable files are skipped and listed, never fatal.
:func:`evaluate_command` is ``kinetoscope evaluate --real DIR_OR_MANIFEST --fake DIR`` and writes
``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from framework.data.manifest import MANIFEST_SUFFIXES, read_manifest
from framework.metrics.fvd import FrechetVideoDistance
from framework.metrics.temporal import AdjacentFrameConsistency, OpticalFlowMetrics, TemporalFlickering
from framework.data.video_io import VIDEO_SUFFIXES, VideoDecodeError, read_video

__all__ = ["LoadedVideos", "VideoMetricSuite", "evaluate_command", "load_videos", "write_report"]


@dataclass
class LoadedVideos:
    videos: list[Tensor] = field(default_factory=list)  # each [3, T, H, W] in [-1, 1]
    names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # "" where unknown
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was left out


def load_videos(source: str | Path, max_videos: int | None = None, max_frames: int | None = None,
                min_frames: int = 1, progress: bool = False) -> LoadedVideos:
    """Read the videos of a folder (``.mp4``/``.gif``, sorted, not recursive) or of a ``.csv``/``.jsonl`` manifest.

    Stills in a manifest are skipped (a temporal metric needs frames). Files that cannot be decoded or have fewer
    than ``min_frames`` frames are skipped and recorded in ``skipped`` with the reason.
    """
    source = Path(source)
    if source.is_dir():
        entries = [(p, "") for p in sorted(source.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES]
    elif source.suffix.lower() in MANIFEST_SUFFIXES:
        entries = [(row.path, row.captions[0]) for row in read_manifest(source)]
    else:
        raise ValueError(f"{source} is neither a folder nor a {'/'.join(MANIFEST_SUFFIXES)} manifest")
    loaded = LoadedVideos()
    for path, caption in tqdm(entries, desc=f"reading {source.name}", disable=not progress, unit="video"):
        if max_videos is not None and len(loaded.videos) >= max_videos:
            break
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            loaded.skipped[str(path)] = "not a video (stills have no motion to evaluate)"
            continue
        try:
            video, _ = read_video(path, max_frames=max_frames)  # [3, T, H, W]
        except VideoDecodeError as e:
            loaded.skipped[str(path)] = e.reason
            continue
        if video.shape[1] < min_frames:
            loaded.skipped[str(path)] = f"{video.shape[1]} frames, fewer than the {min_frames} needed"
            continue
        loaded.videos.append(video)
        loaded.names.append(path.name)
        loaded.captions.append(caption)
    if not loaded.videos:
        raise ValueError(f"no usable videos in {source} ({len(loaded.skipped)} skipped: "
                         f"{'; '.join(f'{k}: {v}' for k, v in list(loaded.skipped.items())[:5])})")
    return loaded


class VideoMetricSuite(nn.Module):
    """FVD (+ KID) between real and fake, and temporal metrics of each set; ``compute()`` -> flat ``{name: float}``.

    Keys: ``fvd`` (and ``kid``, ``kid_std``) when an FVD metric is given; ``fake/<metric>`` and ``real/<metric>``
    for ``warping_error``, ``motion_smoothness``, ``dynamic_degree``, ``temporal_flickering`` and
    ``frame_consistency``. Videos are fed one batch at a time, so memory stays bounded.
    """

    def __init__(self, fvd: FrechetVideoDistance | None = None, temporal: bool = True,
                 frame_feature_extractor: nn.Module | None = None, flow_max_size: int | None = 256) -> None:
        super().__init__()
        self.fvd = fvd
        self.temporal = nn.ModuleDict()
        if temporal:
            for side in ("real", "fake"):
                self.temporal[side] = nn.ModuleList([
                    OpticalFlowMetrics(flow_max_size=flow_max_size),
                    TemporalFlickering(),
                    AdjacentFrameConsistency(frame_feature_extractor),
                ])

    @property
    def min_frames(self) -> int:
        """Frames every video needs: the FVD clip span, or 3 for the flow metrics."""
        fvd_span = (self.fvd.clip_length - 1) * self.fvd.frame_stride + 1 if self.fvd is not None else 1
        return max(fvd_span, 3 if len(self.temporal) else 1)

    def update(self, videos: list[Tensor], real: bool) -> None:
        if not videos:
            return
        if self.fvd is not None:
            self.fvd.update(videos, real=real)
        for metric in self.temporal["real" if real else "fake"] if len(self.temporal) else ():
            metric.update(videos)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.fvd is not None:
            results.update({name: float(value) for name, value in self.fvd.compute().items()})
        for side, metrics in self.temporal.items():
            for metric in metrics:
                if int(metric.video_count) == 0:
                    continue
                results.update({f"{side}/{name}": float(value) for name, value in metric.compute().items()})
        return results

    def reset(self, keep_real: bool = False) -> None:
        """Clear the statistics; with ``keep_real`` the real set's FVD statistics and temporal scores survive
        (the reference set of a training run never changes, so it is embedded once)."""
        if self.fvd is not None:
            saved = {name: getattr(self.fvd, name) for name in self.fvd._defaults if name.startswith("real_")}
            self.fvd.reset()
            if keep_real:
                for name, value in saved.items():
                    setattr(self.fvd, name, value)
        for side, metrics in self.temporal.items():
            if not (keep_real and side == "real"):
                for metric in metrics:
                    metric.reset()


def write_report(output_dir: str | Path, results: dict[str, float], details: dict) -> tuple[Path, Path]:
    """Write ``metrics.json`` (results + details) and a Markdown ``report.md`` table; return both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "metrics.json", output_dir / "report.md"
    json_path.write_text(json.dumps({"metrics": results, **details}, indent=2) + "\n")
    lines = ["# Kinetoscope evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in details.items() if not isinstance(value, (dict, list))]
    lines += ["", "| metric | real | fake |", "|---|---|---|"]
    for name in ("fvd", "kid", "kid_std"):
        if name in results:
            lines.append(f"| {name} | | {results[name]:.4f} |")
    names = sorted({k.split("/", 1)[1] for k in results if "/" in k})
    for name in names:
        cells = [f"{results[f'{side}/{name}']:.4f}" if f"{side}/{name}" in results else "" for side in ("real", "fake")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    skipped = details.get("skipped", {})
    if skipped:
        lines += ["", f"## Skipped files ({len(skipped)})", ""] + [f"- `{p}`: {why}" for p, why in skipped.items()]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _build_suite(args: argparse.Namespace) -> VideoMetricSuite:
    fvd = None
    if not args.no_fvd:
        if args.random_i3d:
            from framework.metrics.i3d import InceptionI3D

            torch.manual_seed(0)
            extractor = InceptionI3D().eval()
        else:
            from framework.metrics.i3d_weights import load_i3d

            extractor = load_i3d(args.i3d_weights)
        fvd = FrechetVideoDistance(extractor, clip_length=args.clip_length, frame_stride=args.frame_stride,
                                   kid_subsets=args.kid_subsets, batch_size=args.batch_size)
    return VideoMetricSuite(fvd, temporal=not args.no_temporal, flow_max_size=args.flow_max_size)


def evaluate_command(argv: list[str]) -> int:
    """``kinetoscope evaluate --real DIR_OR_MANIFEST --fake DIR [--output DIR] ...``"""
    parser = argparse.ArgumentParser(
        prog="kinetoscope evaluate",
        description="FVD (TF-Hub I3D protocol), optional KID, and temporal-consistency metrics of generated videos "
                    "against real ones; writes metrics.json and report.md.",
    )
    parser.add_argument("--real", required=True, help="folder of .mp4/.gif clips, or a .csv/.jsonl manifest")
    parser.add_argument("--fake", required=True, help="folder (or manifest) of generated clips")
    parser.add_argument("--output", default="eval_report", help="folder for metrics.json and report.md")
    parser.add_argument("--clip-length", type=int, default=16, help="FVD frames per clip (16 or 128)")
    parser.add_argument("--frame-stride", type=int, default=1, help="FVD frame subsampling step")
    parser.add_argument("--kid-subsets", type=int, default=0, help="also report KID over this many subsets")
    parser.add_argument("--max-videos", type=int, default=None, help="use at most this many videos per set")
    parser.add_argument("--max-frames", type=int, default=None, help="decode at most this many frames per video")
    parser.add_argument("--skip-short", action="store_true",
                        help="skip (and list) videos shorter than needed instead of failing")
    parser.add_argument("--flow-max-size", type=int, default=256, help="optical flow on frames at most this big")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per I3D forward pass")
    parser.add_argument("--i3d-weights", default=None, help="converted weights (default: the fetch-i3d cache)")
    parser.add_argument("--no-fvd", action="store_true", help="temporal metrics only (no I3D needed)")
    parser.add_argument("--no-temporal", action="store_true", help="FVD only")
    parser.add_argument("--random-i3d", action="store_true",
                        help="randomly initialised I3D: for smoke tests only, the FVD is meaningless")
    args = parser.parse_args(argv)
    try:
        suite = _build_suite(args)
        needed = suite.min_frames
        sets = {}
        for side in ("real", "fake"):
            loaded = load_videos(getattr(args, side), args.max_videos, args.max_frames,
                                 min_frames=needed if args.skip_short else 1, progress=True)
            short = [n for n, v in zip(loaded.names, loaded.videos) if v.shape[1] < needed]
            if short:
                raise ValueError(f"{side} set: {len(short)} videos have fewer than the {needed} frames needed "
                                 f"(e.g. {short[0]}); pass --skip-short to leave them out")
            if suite.fvd is not None and len(loaded.videos) < 2:
                raise ValueError(f"{side} set: FVD needs at least 2 videos, found {len(loaded.videos)}")
            sets[side] = loaded
        for side, loaded in sets.items():
            for video in tqdm(loaded.videos, desc=f"evaluating {side}", unit="video"):
                suite.update([video], real=side == "real")
        results = suite.compute()
    except (ValueError, FileNotFoundError) as e:
        print(f"kinetoscope evaluate: {e}", file=sys.stderr)
        return 1
    details = {
        "real": str(args.real), "fake": str(args.fake),
        "real_videos": len(sets["real"].videos), "fake_videos": len(sets["fake"].videos),
        "fvd_protocol": None if suite.fvd is None else
        f"I3D Kinetics-400 logits, {args.clip_length} frames (stride {args.frame_stride}) at 224x224"
        + (" (RANDOM I3D: not comparable)" if args.random_i3d else ""),
        "skipped": {**sets["real"].skipped, **sets["fake"].skipped},
    }
    json_path, md_path = write_report(args.output, results, details)
    for name, value in results.items():
        print(f"{name}: {value:.6g}" if math.isfinite(value) else f"{name}: {value}")
    print(f"wrote {json_path} and {md_path}")
    return 0
