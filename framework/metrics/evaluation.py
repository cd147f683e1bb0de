"""One evaluation for training callbacks and the offline ``kinetoscope evaluate`` command.

:class:`VideoMetricSuite` bundles FVD (+ KID) between a real and a generated set with the temporal-consistency
metrics of both sets (the real set's values are the reference to compare against) and the frame-repetition flags
that say when those temporal scores are gamed by held frames. :func:`select_video_files` picks one file per sample
(a predict folder holds ``sample.mp4`` and ``sample.gif`` of the same video); :func:`decode_videos` decodes them on
a background thread so decoding overlaps the metrics; :func:`load_videos` reads a whole set for the callbacks.
:func:`evaluate_command` is ``kinetoscope evaluate --real DIR_OR_MANIFEST --fake DIR`` and writes ``metrics.json``
and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from framework.data.manifest import MANIFEST_SUFFIXES, read_manifest
from framework.data.video_io import VIDEO_SUFFIXES, RGBConversion, VideoDecodeError, probe_video, read_video
from framework.metrics.fvd import I3D_MIN_FRAMES, FrechetVideoDistance, FVDPreset, FVDProtocol
from framework.metrics.temporal import (
    AdjacentFrameConsistency,
    FrameRepetition,
    OpticalFlowMetrics,
    TemporalFlickering,
    frame_repetition,
)

__all__ = ["LoadedVideos", "VideoFile", "VideoMetricSuite", "decode_videos", "evaluate_command", "load_videos",
           "select_video_files", "write_report"]

# FVD's covariances are 400x400: with fewer clips per set they are rank-deficient and FVD is biased upwards.
I3D_FEATURES = 400
FVD_PROTOCOLS: dict[str, FVDProtocol] = {preset.value.name: preset.value for preset in FVDPreset}
FILE_SELECTION = "one file per sample: files sharing a name (sample.mp4, sample.gif) are one video; .mp4 preferred"


@dataclass(frozen=True)
class VideoFile:
    path: Path
    caption: str = ""  # "" where unknown


@dataclass
class LoadedVideos:
    videos: list[Tensor] = field(default_factory=list)  # each [3, T, H, W] in [-1, 1]
    names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # "" where unknown
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was left out


def select_video_files(source: str | Path) -> tuple[list[VideoFile], dict[str, str]]:
    """The videos of a folder (one per sample name, sorted, not recursive) or of a ``.csv``/``.jsonl`` manifest,
    and the files left out with the reason (stills: a temporal metric needs frames).

    ``kinetoscope predict`` writes every sample as ``<name>.mp4`` and ``<name>.gif``; counting both would enter each
    sample twice into FVD and every mean, so a folder contributes one file per name, the first format of
    ``VIDEO_SUFFIXES`` (MP4, the format real clips come in) that exists.
    """
    source = Path(source)
    skipped: dict[str, str] = {}
    if source.is_dir():
        by_name: dict[str, Path] = {}
        for path in sorted(source.iterdir(), key=lambda p: (p.stem, VIDEO_SUFFIXES.index(p.suffix.lower())
                                                             if p.suffix.lower() in VIDEO_SUFFIXES else 99)):
            if path.suffix.lower() in VIDEO_SUFFIXES:
                by_name.setdefault(path.stem, path)  # sorted by preference: the first one seen wins
        files = [VideoFile(path) for _, path in sorted(by_name.items())]
    elif source.suffix.lower() in MANIFEST_SUFFIXES:
        files = []
        for row in read_manifest(source):
            if row.path.suffix.lower() not in VIDEO_SUFFIXES:
                skipped[str(row.path)] = "not a video (stills have no motion to evaluate)"
                continue
            files.append(VideoFile(row.path, row.captions[0]))
    elif not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    else:
        raise ValueError(f"{source} is neither a folder nor a {'/'.join(MANIFEST_SUFFIXES)} manifest")
    return files, skipped


def decode_videos(files: list[VideoFile], max_frames: int | None = None,
                  conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA,
                  prefetch: int = 2) -> Iterator[tuple[VideoFile, Tensor | None, str]]:
    """Yield ``(file, video [3, T, H, W] in [-1, 1], "")`` or ``(file, None, why)`` for each file, in order.

    Up to ``prefetch`` files are decoded ahead on one background thread (FFmpeg releases the GIL), so decoding
    overlaps whatever the caller does with the previous video, e.g. I3D.
    """
    def decode(file: VideoFile) -> Tensor:
        return read_video(file.path, max_frames=max_frames, conversion=conversion)[0]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: list[tuple[VideoFile, Future]] = []
        queue = iter(files)
        for file in queue:
            pending.append((file, pool.submit(decode, file)))
            if len(pending) > prefetch:
                break
        while pending:
            file, future = pending.pop(0)
            next_file = next(queue, None)
            if next_file is not None:
                pending.append((next_file, pool.submit(decode, next_file)))
            try:
                yield file, future.result(), ""
            except VideoDecodeError as e:
                yield file, None, e.reason


def load_videos(source: str | Path, max_videos: int | None = None, max_frames: int | None = None,
                min_frames: int = 1, progress: bool = False,
                conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA) -> LoadedVideos:
    """Read the videos of ``source`` (see :func:`select_video_files`) into memory.

    Files that cannot be decoded or have fewer than ``min_frames`` frames are skipped and recorded in ``skipped``
    with the reason.
    """
    files, skipped = select_video_files(source)
    loaded = LoadedVideos(skipped=skipped)
    files = files[:max_videos] if max_videos is not None else files
    for file, video, why in tqdm(decode_videos(files, max_frames, conversion), total=len(files),
                                 desc=f"reading {Path(source).name}", disable=not progress, unit="video"):
        if video is None:
            loaded.skipped[str(file.path)] = why
        elif video.shape[1] < min_frames:
            loaded.skipped[str(file.path)] = f"{video.shape[1]} frames, fewer than the {min_frames} needed"
        else:
            loaded.videos.append(video)
            loaded.names.append(file.path.name)
            loaded.captions.append(file.caption)
    if not loaded.videos:
        raise ValueError(f"no usable videos in {source} ({len(loaded.skipped)} skipped: "
                         f"{'; '.join(f'{k}: {v}' for k, v in list(loaded.skipped.items())[:5])})")
    return loaded


class VideoMetricSuite(nn.Module):
    """FVD (+ KID) between real and fake, and temporal metrics of each set; ``compute()`` -> flat ``{name: float}``.

    Keys: ``fvd`` (and ``kid``, ``kid_std``) when an FVD metric is given; ``fake/<metric>`` and ``real/<metric>``
    for ``warping_error``, ``motion_smoothness``, ``dynamic_degree``, ``temporal_flickering``,
    ``frame_consistency`` and, beside them, ``repeated_frames``, ``stuttering`` and ``static`` (fractions of videos
    flagged). Videos are fed one batch at a time, so memory stays bounded.
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
                    FrameRepetition(),
                ])

    @property
    def min_frames(self) -> int:
        """Frames every video needs: the FVD clip span, or 3 for the flow metrics."""
        fvd_span = self.fvd.protocol.span if self.fvd is not None else 1
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
    """Write ``metrics.json`` (results + details) and a Markdown ``report.md`` table; return both paths.

    ``details["flagged"]`` ({side: {"stuttering" | "static": [names]}}) becomes a warnings section: repeated or
    frozen frames make warping error, flickering and frame consistency look better than real motion.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "metrics.json", output_dir / "report.md"
    json_path.write_text(json.dumps({"metrics": results, **details}, indent=2) + "\n")
    lines = ["# Kinetoscope evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in details.items() if not isinstance(value, (dict, list))]
    warnings = []
    for side, flags in details.get("flagged", {}).items():
        total = details.get(f"{side}_videos", "?")
        for flag, names in flags.items():
            if names:
                warnings.append(f"- {len(names)} of {total} {side} videos are {flag}: "
                                + ", ".join(f"`{n}`" for n in names[:10]) + (" ..." if len(names) > 10 else ""))
    if warnings:
        lines += ["", "## Warnings: repeated or frozen frames", "",
                  "Warping error, temporal flickering and frame consistency score held frames as perfectly "
                  "consistent; do not read them as better motion for the videos below.", ""] + warnings
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


def _build_suite(args: argparse.Namespace, protocol: FVDProtocol) -> VideoMetricSuite:
    fvd = None
    if not args.no_fvd:
        if args.random_i3d:
            from framework.metrics.i3d import InceptionI3D

            torch.manual_seed(0)
            extractor = InceptionI3D().eval()
        else:
            from framework.metrics.i3d_weights import load_i3d

            extractor = load_i3d(args.i3d_weights)
        fvd = FrechetVideoDistance(extractor, protocol, kid_subsets=args.kid_subsets, batch_size=args.batch_size)
    return VideoMetricSuite(fvd, temporal=not args.no_temporal, flow_max_size=args.flow_max_size)


def _frame_counts(files: list[VideoFile], max_frames: int | None) -> dict[VideoFile, int | str]:
    """Frames of each file from its container (no full decode), capped at ``max_frames``; the reason if unreadable."""
    counts: dict[VideoFile, int | str] = {}
    for file in files:
        try:
            frames = int(probe_video(file.path)["frames"])
        except VideoDecodeError as e:
            counts[file] = e.reason
            continue
        counts[file] = min(frames, max_frames) if max_frames is not None else frames
    return counts


def _check_sets(files: dict[str, list[VideoFile]], counts: dict[VideoFile, int | str], sources: dict[str, str],
                needed: int, protocol: FVDProtocol | None, skip_short: bool) -> dict[str, str]:
    """Say before any decoding whether the sets can give the requested metrics; drop short files when skipping.

    Returns the files left out (short ones) with the reason; raises ValueError naming the set and what it lacks.
    """
    left_out: dict[str, str] = {}
    for side, side_files in files.items():
        lengths = [counts[f] for f in side_files if isinstance(counts[f], int)]
        short = [f for f in side_files if isinstance(counts[f], int) and counts[f] < needed]
        usable = len(lengths) - len(short)
        what = (f"FVD ({protocol.describe()}) needs clips of at least {needed} frames and at least 2 of them per set"
                if protocol is not None else f"the temporal metrics need videos of at least {needed} frames")
        have = (f"{sources[side]} has {len(lengths)} readable videos of {min(lengths)}-{max(lengths)} frames"
                if lengths else f"{sources[side]} has no readable videos")
        if short and not skip_short:
            raise ValueError(f"{side} set: {what}; {have}, {len(short)} of them shorter (e.g. {short[0].path.name}). "
                             "Pass --skip-short to leave them out, --clip-length/--frame-stride for a shorter clip "
                             f"(I3D needs at least {I3D_MIN_FRAMES} frames), or --no-fvd for the temporal metrics only")
        minimum = 2 if protocol is not None else 1
        if usable < minimum:
            raise ValueError(f"{side} set: {what}; {have}, {usable} long enough. "
                             + ("Generate longer or more clips, or pass --no-fvd for the temporal metrics only"
                                if protocol is not None else ""))
        for file in short:
            left_out[str(file.path)] = f"{counts[file]} frames, fewer than the {needed} needed"
            side_files.remove(file)
    return left_out


def evaluate_command(argv: list[str]) -> int:
    """``kinetoscope evaluate --real DIR_OR_MANIFEST --fake DIR [--output DIR] ...``"""
    parser = argparse.ArgumentParser(
        prog="kinetoscope evaluate",
        description="FVD (TF-Hub I3D under a named protocol), optional KID, temporal-consistency metrics and "
                    "stutter/freeze flags of generated videos against real ones; writes metrics.json and report.md. "
                    f"Folders contribute {FILE_SELECTION}.",
    )
    parser.add_argument("--real", required=True, help="folder of .mp4/.gif clips, or a .csv/.jsonl manifest")
    parser.add_argument("--fake", required=True, help="folder (or manifest) of generated clips")
    parser.add_argument("--output", default="eval_report", help="folder for metrics.json and report.md")
    parser.add_argument("--fvd-protocol", choices=list(FVD_PROTOCOLS), default=FVDPreset.ORIGINAL_TF1.value.name,
                        help="FVD preprocessing: resize kernel, decode conversion, clip length, stride and selection "
                             "(docs/metrics.md); default %(default)s")
    parser.add_argument("--clip-length", type=int, default=None, help="override the protocol's frames per clip")
    parser.add_argument("--frame-stride", type=int, default=None, help="override the protocol's frame step")
    parser.add_argument("--kid-subsets", type=int, default=0, help="also report KID over this many subsets")
    parser.add_argument("--max-videos", type=int, default=None, help="use at most this many videos per set")
    parser.add_argument("--max-frames", type=int, default=None, help="decode at most this many frames per video")
    parser.add_argument("--skip-short", action="store_true",
                        help="skip (and list) videos shorter than needed instead of failing (the stylegan_v "
                             "protocols always do)")
    parser.add_argument("--flow-max-size", type=int, default=256, help="optical flow on frames at most this big")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per I3D forward pass")
    parser.add_argument("--i3d-weights", default=None, help="converted weights (default: the fetch-i3d cache)")
    parser.add_argument("--no-fvd", action="store_true", help="temporal metrics only (no I3D needed)")
    parser.add_argument("--no-temporal", action="store_true", help="FVD only")
    parser.add_argument("--random-i3d", action="store_true",
                        help="randomly initialised I3D: for smoke tests only, the FVD is meaningless")
    args = parser.parse_args(argv)
    if args.no_fvd and args.no_temporal:
        print("kinetoscope evaluate: --no-fvd with --no-temporal leaves nothing to compute", file=sys.stderr)
        return 2
    try:
        protocol = FVD_PROTOCOLS[args.fvd_protocol].with_overrides(args.clip_length, args.frame_stride)
        if not args.no_fvd and protocol.clip_length < I3D_MIN_FRAMES:
            raise ValueError(f"FVD clip length {protocol.clip_length}: I3D needs at least {I3D_MIN_FRAMES} frames "
                             "per clip (pass --no-fvd for the temporal metrics only)")
        sources = {"real": str(args.real), "fake": str(args.fake)}
        files, skipped = {}, {}
        for side, source in sources.items():
            side_files, side_skipped = select_video_files(source)
            files[side] = side_files[:args.max_videos] if args.max_videos is not None else side_files
            skipped.update(side_skipped)
        counts = _frame_counts(files["real"] + files["fake"], args.max_frames)
        for side in files:  # unreadable files are listed, never fatal
            skipped.update({str(f.path): counts[f] for f in files[side] if isinstance(counts[f], str)})
            files[side] = [f for f in files[side] if isinstance(counts[f], int)]
        fvd_protocol = None if args.no_fvd else protocol
        needed = max(protocol.span if fvd_protocol else 1, 1 if args.no_temporal else 3)
        skipped.update(_check_sets(files, counts, sources, needed, fvd_protocol,
                                   args.skip_short or protocol.skip_short_videos))
        if not args.no_fvd:
            for side, side_files in files.items():
                if len(side_files) < I3D_FEATURES:
                    print(f"kinetoscope evaluate: note: {len(side_files)} {side} clips; with fewer than "
                          f"{I3D_FEATURES} (the I3D feature size) FVD's covariance is rank-deficient and FVD is "
                          "biased upwards; published FVDs use 256 or 2048 clips per set", file=sys.stderr)
        suite = _build_suite(args, protocol)
        flagged: dict[str, dict[str, list[str]]] = {}
        used: dict[str, int] = {}
        for side, side_files in files.items():
            flagged[side] = {"stuttering": [], "static": []}
            used[side] = 0
            batch: list[Tensor] = []
            decoded = decode_videos(side_files, args.max_frames, protocol.decode)
            for i, (file, video, why) in enumerate(tqdm(decoded, total=len(side_files), desc=f"evaluating {side}",
                                                        unit="video")):
                if video is not None and video.shape[1] < needed:  # the container declared more than it holds
                    video, why = None, f"{video.shape[1]} frames, fewer than the {needed} needed"
                if video is None:
                    skipped[str(file.path)] = why
                else:
                    batch.append(video)
                    used[side] += 1
                    for flag, value in frame_repetition(video).items():
                        if flag in flagged[side] and value:
                            flagged[side][flag].append(file.path.name)
                if batch and (len(batch) == args.batch_size or i == len(side_files) - 1):
                    suite.update(batch, real=side == "real")
                    batch = []
        results = suite.compute()
    except (ValueError, FileNotFoundError) as e:
        print(f"kinetoscope evaluate: {e}", file=sys.stderr)
        return 1
    details = {
        "real": sources["real"], "fake": sources["fake"],
        "real_videos": used["real"], "fake_videos": used["fake"],
        "file_selection": FILE_SELECTION,
        "fvd_protocol": None if fvd_protocol is None else protocol.record(),
        "fvd_protocol_summary": None if fvd_protocol is None else
        protocol.describe() + (" (RANDOM I3D: not comparable)" if args.random_i3d else ""),
        "flagged": flagged,
        "skipped": skipped,
    }
    json_path, md_path = write_report(args.output, results, details)
    for name, value in results.items():
        print(f"{name}: {value:.6g}" if math.isfinite(value) else f"{name}: {value}")
    for side, flags in flagged.items():
        for flag, names in flags.items():
            if names:
                print(f"warning: {len(names)} {side} videos are {flag} (see {md_path})", file=sys.stderr)
    print(f"wrote {json_path} and {md_path}")
    return 0
