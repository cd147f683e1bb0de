"""Manifest datasets: captioned videos and images on disk, decoded at (near) their native size.

A manifest is a CSV or JSONL file with one row per file:

* ``path`` (required): relative paths resolve against the manifest's folder;
* ``caption`` or ``captions`` (one is required): in CSV, ``captions`` may hold a JSON list; one is drawn per sample;
* optional ``fps``, ``frames`` (or ``num_frames``), ``width``, ``height``: when all are present for a row the file is
  not opened until it is used; otherwise it is probed once when the dataset is built.

Videos are decoded with PyAV: the decoder seeks to the clip start, then keeps the frame nearest to each target time
``start + k / fps`` (fps resampling; ``frame_stride`` keeps every n-th native frame instead), and only the kept
frames are converted to RGB, resized (aspect preserved, covering the bucket) and centre-cropped in swscale.
PNG / JPEG images are 1-frame videos, so images and videos train in one run.

Bad data never stops a run and no good sample is dropped: missing, unreadable, corrupt, truncated and zero-frame
files, and samples no bucket fits (e.g. images smaller than the smallest bucket), are skipped and recorded as
``SkippedSample(path, reason)``. Files found bad while building the dataset are left out of it; files that fail while
decoding in a worker are replaced by another sample of the same bucket, and the failure travels with the batch
(``batch["skipped"]``) to ``SkippedSamplesReport``, which reports count and paths at every epoch end.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import av
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from framework.data.buckets import Bucket, BucketGrid, resize_crop_plan
from framework.core.micro_conditions import STILL_IMAGE_FPS
from framework.data.video_io import (
    IMAGE_SUFFIXES,
    VideoDecodeError,
    _check_readable,
    _frame_to_rgb,
    _open_video,
    _read_image,
    _stream_fps,
    probe_video,
)

log = logging.getLogger("kinetoscope.data")

MANIFEST_SUFFIXES = (".csv", ".jsonl")


# ---------------------------------------------------------------------------------------------- skipped samples
class SkippedSample(NamedTuple):
    """A file left out, with why. A named tuple, not a frozen dataclass: it rides in ``batch["skipped"]``, and
    Lightning's batch transfer (``apply_to_collection``) rebuilds tuples but refuses frozen dataclasses."""

    path: str
    reason: str


@dataclass
class SkippedSamples:
    """Files left out of training, with why; one entry per file (the first reason seen)."""

    entries: dict[str, str] = field(default_factory=dict)

    def add(self, path: str | Path, reason: str) -> None:
        self.entries.setdefault(str(path), reason)

    def extend(self, samples: Sequence[SkippedSample]) -> None:
        for s in samples:
            self.add(s.path, s.reason)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[str]:
        return sorted(self.entries)

    def report(self, title: str) -> str:
        lines = [f"{title}: {len(self)} skipped"]
        lines += [f"  {path}: {self.entries[path]}" for path in self.paths]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class ManifestRow:
    path: Path  # absolute
    captions: tuple[str, ...]
    fps: float | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    name: str = ""  # the path as written in the manifest (the sample id)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES

    @property
    def has_metadata(self) -> bool:
        sizes = self.frames is not None and self.width is not None and self.height is not None
        return sizes and (self.is_image or bool(self.fps))


_NUMERIC_COLUMNS = {"fps": float, "frames": int, "num_frames": int, "width": int, "height": int}


def read_manifest(manifest: str | Path, bad_rows: SkippedSamples | None = None) -> list[ManifestRow]:
    """Rows of a ``.csv`` or ``.jsonl`` manifest; errors name the file, the line and the column at fault.

    A problem with the whole file (wrong suffix, missing, no ``path`` / ``caption`` column in a CSV header) always
    raises. A problem with one row (invalid JSON, missing ``path`` or caption, a value that is not a number, text
    that is not UTF-8) raises too, unless ``bad_rows`` is given: then the row is recorded there -- under its file
    path when it has one, else as ``<manifest>, line N`` -- and the other rows are returned (how
    ``ManifestVideoDataModule`` reads, so one bad row never stops a run).
    """
    manifest = Path(manifest)
    if manifest.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {manifest}: expected a {' or '.join(MANIFEST_SUFFIXES)} file")
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    # undecodable bytes become lone surrogates, so one bad row is found (and named) on its own line
    text = manifest.read_bytes().decode("utf-8", errors="surrogateescape")
    rows: list[ManifestRow] = []

    def parse(line: int, record: object) -> None:
        try:
            if not isinstance(record, dict):
                raise ValueError(f"manifest {manifest}, line {line}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            if manifest.suffix.lower() == ".jsonl":
                _check_columns(manifest, list(record), f"line {line}")
            rows.append(_parse_row(manifest, line, record))
        except ValueError as err:
            if bad_rows is None:
                raise
            name = record.get("path") if isinstance(record, dict) else None
            label = (manifest.parent / name.strip()).resolve() if isinstance(name, str) and name.strip() \
                and not _undecodable(name) else f"{manifest}, line {line}"
            bad_rows.add(label, str(err))

    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _check_columns(manifest, reader.fieldnames or [], "header")
        try:
            for line, row in enumerate(reader, start=2):
                parse(line, row)
        except csv.Error as err:
            raise ValueError(f"manifest {manifest}: not a readable CSV file ({err})") from None
    else:
        for line, record_text in enumerate(text.splitlines(), start=1):
            if not record_text.strip():
                continue
            try:
                record = json.loads(record_text)
            except json.JSONDecodeError as err:
                if bad_rows is None:
                    raise ValueError(f"manifest {manifest}, line {line}: not valid JSON ({err})") from None
                bad_rows.add(f"{manifest}, line {line}", f"not valid JSON ({err})")
                continue
            parse(line, record)
    return rows


def _undecodable(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (decoded with ``errors="surrogateescape"``)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _check_columns(manifest: Path, columns: list[str], where: str) -> None:
    if "path" not in columns:
        raise ValueError(f"manifest {manifest} ({where}): missing column 'path'; found columns {columns}")
    if "caption" not in columns and "captions" not in columns:
        raise ValueError(f"manifest {manifest} ({where}): missing column 'caption' (or 'captions'); "
                         f"found columns {columns}")


def _parse_row(manifest: Path, line: int, row: dict) -> ManifestRow:
    where = f"manifest {manifest}, line {line}"
    for column, value in row.items():
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(t, str) and _undecodable(t) for t in [column, *texts]):
            raise ValueError(f"{where}: column {column!r} is not UTF-8 text")
    name = str(row.get("path") or "").strip()
    if not name:
        raise ValueError(f"{where}: empty 'path'")
    captions = row.get("captions")
    if isinstance(captions, str) and captions.strip().startswith("["):
        try:
            captions = json.loads(captions)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: column 'captions' is not a JSON list ({err})") from None
    if captions in (None, ""):
        captions = [row.get("caption") or ""]
    elif isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: column 'captions' must be a non-empty list of strings, got {captions!r}")
    values = {}
    for column, kind in _NUMERIC_COLUMNS.items():
        raw = row.get(column)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        try:
            values[column] = kind(float(raw)) if kind is int else kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: column {column!r} must be a number, got {raw!r}") from None
    path = Path(name)
    return ManifestRow(
        path=path if path.is_absolute() else (manifest.parent / path).resolve(),
        captions=tuple(captions),
        fps=values.get("fps") or None,
        frames=values.get("frames", values.get("num_frames")),
        width=values.get("width"),
        height=values.get("height"),
        name=name,
    )


CAPTION_SOURCES = (
    "captions come from sidecar text files next to the clips (clip.mp4 -> clip.txt) or a captions CSV / JSONL "
    "(kinetoscope scan DIR -o manifest.csv --captions captions.csv), or are written by a captioning model "
    "(kinetoscope recaption manifest.csv -o captioned.jsonl --model-dir DIR); see docs/data.md, 'Captions'"
)


def empty_captions_message(where: str, captions: Sequence[Sequence[str]]) -> str | None:
    """A warning when rows (given by their captions) have no caption text, else None. All empty means a text-to-video
    model that learns no text conditioning, which nothing else would reveal until sampling."""
    empty = sum(1 for texts in captions if not any(t.strip() for t in texts))
    if not empty:
        return None
    if empty == len(captions):
        return (f"{where}: every caption is empty ({empty} rows), so the model learns no text conditioning; "
                f"{CAPTION_SOURCES}")
    return f"{where}: {empty} of {len(captions)} rows have an empty caption; {CAPTION_SOURCES}"


# ------------------------------------------------------------------------------------------------------ decoding
class ClipStart(str, enum.Enum):
    RANDOM = "random"  # uniform over all starts that fit (training)
    BEGINNING = "beginning"
    MIDDLE = "middle"


@dataclass
class ClipSampling:
    """Which frames of a video make a clip: ``fps`` resamples to that rate (None: the native rate, keeping every
    ``frame_stride``-th frame); the clip length is the bucket's frame count; ``start`` places it in the video."""

    fps: float | None = None
    frame_stride: int = 1
    start: ClipStart = ClipStart.RANDOM

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"ClipSampling.fps must be > 0 or None, got {self.fps}")
        if self.frame_stride < 1:
            raise ValueError(f"ClipSampling.frame_stride must be >= 1, got {self.frame_stride}")

    def step_s(self, native_fps: float) -> float:
        """Seconds between two clip frames."""
        return 1.0 / self.fps if self.fps is not None else self.frame_stride / native_fps

    def usable_frames(self, native_frames: int, native_fps: float) -> int:
        """How many clip frames a video of ``native_frames`` at ``native_fps`` can give."""
        if native_frames < 1 or not native_fps > 0:
            return 0
        span = (native_frames - 1) / native_fps
        return int(math.floor(span / self.step_s(native_fps) + 1e-6)) + 1

    def start_s(self, native_frames: int, native_fps: float, clip_frames: int, rng: random.Random) -> float:
        """Clip start in seconds, on a native frame, such that the whole clip lies inside the video."""
        latest = (native_frames - 1) / native_fps - (clip_frames - 1) * self.step_s(native_fps)
        last_index = max(0, int(math.floor(latest * native_fps + 1e-6)))
        if self.start is ClipStart.RANDOM:
            index = rng.randint(0, last_index)
        elif self.start is ClipStart.MIDDLE:
            index = last_index // 2
        else:
            index = 0
        return index / native_fps


def decode_clip(path: str | Path, bucket: Bucket, start_s: float, step_s: float) -> Tensor:
    """Decode ``bucket.frames`` frames at times ``start_s + k * step_s`` (seconds from the stream start), resized
    keeping the aspect ratio and centre-cropped to the bucket -> float ``[3, T, H, W]`` in [-1, 1].

    Seeks to the keyframe before ``start_s``; each target time takes the nearest decoded frame. Raises
    ``VideoDecodeError`` for unreadable files and for streams that end before the clip does (truncated files).
    """
    path = Path(path)
    _check_readable(path)
    targets = [start_s + k * step_s for k in range(bucket.frames)]
    chosen: list[av.VideoFrame] = []
    with _open_video(path) as (container, stream):
        base = stream.time_base
        origin = stream.start_time or 0
        native_fps = _stream_fps(stream) or 1.0 / step_s
        if start_s > 0 and base is not None:
            container.seek(origin + int(start_s / base), stream=stream, backward=True)
        prev, prev_t = None, -math.inf
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = float((frame.pts - origin) * base) if frame.pts is not None and base else index / native_fps
                while len(chosen) < len(targets) and t >= targets[len(chosen)]:
                    target = targets[len(chosen)]
                    chosen.append(frame if prev is None or t - target <= target - prev_t else prev)
                if len(chosen) == len(targets):
                    break
                prev, prev_t = frame, t
        except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as err:
            raise VideoDecodeError(path, f"{type(err).__name__} while decoding: {err}") from err
        # the last frame also serves targets up to one frame period after it
        while prev is not None and len(chosen) < len(targets) and targets[len(chosen)] - prev_t <= 1.0 / native_fps:
            chosen.append(prev)
        if len(chosen) < len(targets):
            got = "no frames" if prev is None else f"the stream ends at {prev_t:.3f}s"
            raise VideoDecodeError(
                path, f"clip of {len(targets)} frames from {start_s:.3f}s needs {targets[-1]:.3f}s but {got} "
                      "(truncated or zero-frame file?)"
            )
        first = chosen[0]
        rh, rw, top, left = resize_crop_plan(first.height, first.width, bucket.height, bucket.width)
        converted: dict[int, np.ndarray] = {}
        frames = []
        for frame in chosen:  # a repeated frame (fps upsampling) is converted once
            if id(frame) not in converted:
                rgb = _frame_to_rgb(frame, rh, rw)  # [rh, rw, 3]
                converted[id(frame)] = rgb[top : top + bucket.height, left : left + bucket.width]
            frames.append(converted[id(frame)])  # [H, W, 3]
    return _to_video(np.stack(frames))  # [3, T, H, W]


def load_image(path: str | Path, bucket: Bucket) -> Tensor:
    """A still as a 1-frame video: aspect-preserving resize covering the bucket, centre crop -> ``[3, 1, H, W]``."""
    rgb = _read_image(Path(path))  # [h, w, 3]; raises VideoDecodeError when unreadable
    rh, rw, top, left = resize_crop_plan(rgb.shape[0], rgb.shape[1], bucket.height, bucket.width)
    resized = np.array(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC))  # [rh, rw, 3]
    return _to_video(resized[None, top : top + bucket.height, left : left + bucket.width])  # [3, 1, H, W]


def _to_video(frames: np.ndarray) -> Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, H, W]`` in [-1, 1] (the inverse of ``video_io.to_uint8_frames``)."""
    x = torch.from_numpy(np.ascontiguousarray(frames))  # [T, H, W, 3]
    return x.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, T, H, W]


# ------------------------------------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class SampleInfo:
    """What the samplers need without decoding: the row, its native size and its bucket."""

    row: ManifestRow
    native_frames: int
    native_fps: float  # 0.0 for images
    bucket: Bucket
    native_height: int  # the file's size before resize and crop (the original-size micro-condition)
    native_width: int


class ManifestVideoDataset(Dataset):
    """Samples of a manifest at their bucket's size: ``{"video": [3, T, H, W], "caption", "id", "fps",
    "original_size", "skipped"}`` (``fps``: the clip's rate after resampling, 0 for images; ``original_size``: the
    file's (height, width) before resize and crop -- the micro-conditions).

    Building it probes rows without full metadata, drops rows no bucket fits and records every left-out file in
    ``skipped``. A file that fails later, while decoding, is replaced by the next good sample of its bucket and
    reported in the sample's ``skipped`` list.
    """

    def __init__(self, rows: Sequence[ManifestRow], grid: BucketGrid, clip: ClipSampling | None = None) -> None:
        self.grid, self.clip = grid, clip or ClipSampling()
        self.skipped = SkippedSamples()
        self.samples: list[SampleInfo] = []
        for row in rows:
            info = self._inspect(row)
            if isinstance(info, str):
                self.skipped.add(row.path, info)
            else:
                self.samples.append(info)
        self.by_bucket: dict[Bucket, list[int]] = {}
        for index, info in enumerate(self.samples):
            self.by_bucket.setdefault(info.bucket, []).append(index)
        self._known_bad: dict[int, str] = {}  # per worker process: indices that failed to decode
        self._rng: random.Random | None = None  # per worker process: clip starts and caption choices

    @property
    def rng(self) -> random.Random:
        """Seeded once per process from its global RNG (a DataLoader worker's is seeded from the loader's base seed
        and its worker id; the main process's by ``seed_everything``)."""
        if self._rng is None:
            self._rng = random.Random(random.random())
        return self._rng

    def state_dict(self) -> dict[str, tuple]:
        """Saved per worker by ``StatefulDataLoader`` with every batch, so a resumed run's workers continue the clip
        starts where the killed run's stopped, not from their seeds."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, tuple]) -> None:
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))  # a checkpoint may hand tuples back as lists

    def _inspect(self, row: ManifestRow) -> SampleInfo | str:
        if not row.path.is_file():
            return "file does not exist" if not row.path.exists() else "not a regular file"
        if row.has_metadata:
            frames, fps, width, height = row.frames, row.fps or 0.0, row.width, row.height
        else:
            try:
                meta = probe_video(row.path)
            except VideoDecodeError as err:
                return err.reason
            frames, fps, width, height = meta["frames"], meta["fps"], meta["width"], meta["height"]
        if row.is_image:
            usable = 1
        elif not fps or fps <= 0:
            return "unknown frame rate"
        else:
            usable = self.clip.usable_frames(int(frames), float(fps))
        if usable < 1:
            return "no frames"
        bucket = self.grid.assign(usable, int(height), int(width))
        if isinstance(bucket, str):
            return bucket
        return SampleInfo(row, int(frames), 0.0 if row.is_image else float(fps), bucket, int(height), int(width))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def buckets(self) -> list[Bucket]:
        """The bucket of every sample, by index (for the batch samplers)."""
        return [s.bucket for s in self.samples]

    def load(self, index: int, bucket: Bucket, rng: random.Random) -> tuple[Tensor, float]:
        """Decode sample ``index`` at ``bucket``'s size -> (video [3, T, H, W], clip fps)."""
        info = self.samples[index]
        if info.row.is_image:
            return load_image(info.row.path, bucket), STILL_IMAGE_FPS
        step = self.clip.step_s(info.native_fps)
        start = self.clip.start_s(info.native_frames, info.native_fps, bucket.frames, rng)
        return decode_clip(info.row.path, bucket, start, step), 1.0 / step

    def __getitem__(self, index: int) -> dict:
        rng = self.rng
        bucket = self.samples[index].bucket
        skipped: list[SkippedSample] = []
        for candidate in self._replacements(index):
            if candidate in self._known_bad:
                skipped.append(SkippedSample(str(self.samples[candidate].row.path), self._known_bad[candidate]))
                continue
            try:
                video, fps = self.load(candidate, bucket, rng)
            except (VideoDecodeError, OSError, ValueError, RuntimeError, av.error.FFmpegError) as err:
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                self._known_bad[candidate] = reason
                skipped.append(SkippedSample(str(self.samples[candidate].row.path), reason))
                continue
            info = self.samples[candidate]
            return {"video": video, "caption": rng.choice(info.row.captions), "id": info.row.name, "fps": fps,
                    "original_size": (info.native_height, info.native_width), "skipped": skipped}
        raise RuntimeError(f"no decodable sample left for bucket {bucket.shape}: "
                           + "; ".join(f"{s.path}: {s.reason}" for s in skipped))

    def _replacements(self, index: int) -> Iterator[int]:
        """``index`` first, then the rest of its bucket in order, then any sample long enough for the bucket."""
        bucket = self.samples[index].bucket
        same = self.by_bucket[bucket]
        at = same.index(index)
        yield from same[at:] + same[:at]
        yield from (i for i, s in enumerate(self.samples) if s.bucket != bucket and s.bucket.frames >= bucket.frames)


class SkippedSamplesReport(L.Callback):
    """Reports the files skipped in a training run, so a bad file costs a sample, never the run, and is never silent.

    Collects ``batch["skipped"]`` from every training batch, plus ``trainer.datamodule.skipped_samples`` (files left
    out when the dataset was built). At each training epoch end it logs the count as ``data/skipped_samples`` and
    every path with its reason as a warning on ``kinetoscope.data``; when training ends (also on ``max_steps``
    mid-epoch) it warns the run's total and writes it to ``path`` (default ``<trainer.log_dir>/skipped_samples.json``;
    ``skipped_samples.rank<N>.json`` for ranks > 0 under DDP): ``{"count", "skipped": [{"path", "reason"}, ...]}``.
    ``ManifestVideoDataModule`` adds this callback itself when it is missing.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.epoch = SkippedSamples()
        self.run = SkippedSamples()
        self.last_report: SkippedSamples | None = None
        self.written: Path | None = None

    def _with_setup(self, trainer, found: SkippedSamples) -> SkippedSamples:
        report = SkippedSamples()
        at_setup = getattr(trainer.datamodule, "skipped_samples", None)
        if at_setup is not None:
            report.entries.update(at_setup.entries)
        report.entries.update(found.entries)
        return report

    def on_train_start(self, trainer, pl_module) -> None:
        self.epoch, self.run = SkippedSamples(), SkippedSamples()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if isinstance(batch, dict):
            self.epoch.extend(batch.get("skipped", ()))
            self.run.extend(batch.get("skipped", ()))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        report = self._with_setup(trainer, self.epoch)
        self.last_report, self.epoch = report, SkippedSamples()
        pl_module.log("data/skipped_samples", float(len(report)), on_epoch=True, on_step=False)
        if len(report):
            log.warning(report.report(f"epoch {trainer.current_epoch} (rank {trainer.global_rank})"))

    def on_train_end(self, trainer, pl_module) -> None:
        report = self._with_setup(trainer, self.run)
        if len(report):
            log.warning(f"{len(report)} files skipped in this run (rank {trainer.global_rank}); "
                        "each was replaced by another sample or left out, see the reasons above")
        default = Path(trainer.log_dir or trainer.default_root_dir) / "skipped_samples.json"
        path = self.path or default
        if trainer.world_size > 1 and trainer.global_rank > 0:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"count": len(report),
                  "skipped": [{"path": p, "reason": report.entries[p]} for p in report.paths]}
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        self.written = path
