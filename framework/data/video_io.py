"""Video file I/O: write samples as MP4 / GIF / PNG grids, read videos and stills back.

Tensors here are always float ``[3, T, H, W]`` in ``[-1, 1]`` (the range the diffusion
models work in). Every writer goes through :func:`to_uint8_frames`, so the float -> uint8
mapping lives in exactly one place, and :func:`read_video` applies its exact inverse
(``v / 127.5 - 1``), so a lossless round trip (PNG) reproduces the quantised input bit for bit.

Design notes:

* Writes are atomic: the file is written under a hidden temporary name in the target
  folder and moved into place with ``os.replace``, so a crash (or Ctrl-C) mid-encode never
  leaves a truncated file under the final name that a later run would happily load.
* MP4 is H.264 / yuv420p, which every browser and player can show. yuv420p needs an even
  width and height, so odd sizes are padded by replicating the last row / column; the
  decoded MP4 is therefore one pixel taller / wider than an odd-sized input (GIF and PNG
  keep the exact size).
* RGB <-> YUV conversion uses BT.709 (tagged in the stream, so players agree with us) with
  bicubic, full-chroma, accurate-rounding swscale flags. The default swscale path upsamples
  chroma without interpolation, which costs ~10 dB PSNR on tiny clips.
* Fork safety. swscale contexts run slice threads; PyAV keeps one context per thread
  (``VideoFrame.reformat``), and a process forked after its parent used it inherits the context
  but not its threads: the child's next conversion waits forever on threads that do not exist
  (``avpriv_slicethread_free`` under ``sws_scale_frame``). Every conversion here goes through
  :func:`_reformatter`, which never reuses a context made in another process, and DataLoader
  workers that decode video start from a fresh interpreter (:func:`decoding_worker_context`).
"""

from __future__ import annotations

import enum
import math
import multiprocessing
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import Colorspace, Interpolation, VideoReformatter
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "RGBConversion",
    "VIDEO_SUFFIXES",
    "VideoDecodeError",
    "decoding_worker_context",
    "probe_video",
    "read_video",
    "to_uint8_frames",
    "write_frame_grid",
    "write_video",
]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".gif")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

MP4_CRF = 18  # visually near-lossless for H.264; small files for short clips
# 1001 covers the NTSC rates (30000/1001 ...) exactly and keeps the MP4 timescale sane.
_MAX_FPS_DENOMINATOR = 1001
# Browsers play GIF delays under 20 ms as 100 ms, so faster clips would play *slower*.
_MIN_GIF_FRAME_MS = 20

# swscale flags for RGB <-> YUV: bicubic + accurate rounding + full horizontal chroma
# in/out. Decoding with the defaults upsamples chroma by pixel repetition.
_SWS_FLAGS = (
    int(Interpolation.BICUBIC)
    | int(Interpolation.ACCURATE_RND)
    | int(Interpolation.FULL_CHR_H_INP)
    | int(Interpolation.FULL_CHR_H_INT)
)
# FFmpeg enum values (AVCOL_SPC_BT709, AVCOL_PRI_BT709, AVCOL_TRC_BT709, AVCOL_RANGE_MPEG).
_AVCOL_BT709 = 1
_AVCOL_RANGE_MPEG = 1


class RGBConversion(enum.Enum):
    """How decoded (YUV) video frames become RGB; the choice moves FVD by about 1 % (docs/metrics.md).

    ``BICUBIC_FULL_CHROMA``: bicubic chroma upsampling with accurate rounding, honouring a BT.709 tag (the default,
    and the inverse of how :func:`write_video` encodes). ``PLAIN_RGB24``: PyAV's ``frame.to_ndarray(format="rgb24")``
    with swscale's defaults, as torchvision- and PyAV-based evaluation code (StyleGAN-V, TATS) decodes.
    """

    BICUBIC_FULL_CHROMA = "bicubic_full_chroma"
    PLAIN_RGB24 = "plain_rgb24"


class VideoDecodeError(ValueError):
    """A file could not be read as a video: missing, corrupt, truncated or without frames.

    Subclasses ValueError so callers that already treat bad inputs as ValueError keep working;
    ``path`` and ``reason`` are kept as attributes so data pipelines can log / skip the file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str = "unknown error") -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode video {str(path)!r}: {reason}")

    def __reduce__(self) -> tuple[type[VideoDecodeError], tuple[Path, str]]:
        # Default exception pickling replays ``args`` (the message) only; keep path + reason
        # so the error survives DataLoader worker processes intact.
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- fork safety
_local = threading.local()  # this thread's (pid, reformatter)
_inherited: list[VideoReformatter] = []  # contexts made by a parent process: kept alive, never used or freed


def _reformatter() -> VideoReformatter:
    """This thread's swscale reformatter, made in this process.

    After a fork the inherited one is set aside, not freed: freeing it joins the parent's slice threads, which the
    child does not have, and never returns.
    """
    made = getattr(_local, "reformatter", None)
    if made is None or made[0] != os.getpid():
        if made is not None:
            _inherited.append(made[1])
        made = _local.reformatter = (os.getpid(), VideoReformatter())
    return made[1]


def decoding_worker_context() -> multiprocessing.context.BaseContext:
    """How DataLoader worker processes that decode video start: ``forkserver`` (``spawn`` where there is none),
    never a fork of the training process.

    A forked worker inherits whatever native thread state the training process holds -- PyAV/FFmpeg decoder and
    swscale thread pools from a metric callback, a preview or a ``read_video`` call before ``fit`` -- without its
    threads, and can wait on them forever. The fork server is a fresh interpreter that imports the data modules
    once per training process; each worker is forked from it, so no worker inherits any of that state
    (``benchmarks/worker_start.py`` measures the cost). As with any non-fork start, a script that starts training must guard it with
    ``if __name__ == "__main__":``.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # "__main__" is Python's default preload; the data modules make each forked worker cheap to start
    context.set_forkserver_preload(["__main__", "framework.data.datamodules"])
    return context


# --------------------------------------------------------------------------- conversion


def to_uint8_frames(video: Tensor) -> np.ndarray:
    """Map a float ``[3, T, H, W]`` video in [-1, 1] to uint8 ``[T, H, W, 3]`` frames.

    The single place for the [-1, 1] -> uint8 mapping (``round((x + 1) * 127.5)``) so every
    writer quantises identically. Values outside [-1, 1] are clamped (samplers overshoot);
    NaN is rejected because it always means an upstream bug, never a colour.
    """
    if not isinstance(video, Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must have shape [3, T, H, W], got {list(video.shape)}")
    if min(video.shape[1:]) < 1:
        raise ValueError(f"video must have T, H, W >= 1, got shape {list(video.shape)}")
    x = video.detach().to(device="cpu", dtype=torch.float32)  # [3, T, H, W]
    if torch.isnan(x).any():
        raise ValueError(f"video contains {int(torch.isnan(x).sum())} NaN values")
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # [T, H, W, 3]


def _from_uint8_frames(frames: np.ndarray) -> Tensor:
    """Exact inverse of :func:`to_uint8_frames`: uint8 ``[T, H, W, 3]`` -> float [3, T, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(frames))  # [T, H, W, 3] uint8
    return x.permute(3, 0, 1, 2).to(torch.float32) / 127.5 - 1.0  # [3, T, H, W]


def _upscale(frames: np.ndarray, upscale: int) -> np.ndarray:
    """Nearest-neighbour upscale so 16x16 samples are big enough to look at."""
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"upscale must be an int >= 1, got {upscale!r}")
    if upscale == 1:
        return frames
    return frames.repeat(upscale, axis=1).repeat(upscale, axis=2)  # [T, H*k, W*k, 3]


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad H / W to even sizes by edge replication (yuv420p subsamples chroma 2x2)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # [T, H', W', 3]


def _fps_fraction(fps: float) -> Fraction:
    """Stream rate as a Fraction; a limited denominator keeps 29.97-style rates exact."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise ValueError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"fps must be finite and > 0, got {fps!r}")
    rate = Fraction(fps).limit_denominator(_MAX_FPS_DENOMINATOR)
    if rate <= 0:
        raise ValueError(f"fps {fps!r} is too small to represent")
    return rate


# --------------------------------------------------------------------------- writing


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it into place only if the body succeeds.

    Same folder so ``os.replace`` is an atomic rename (no cross-device copy). The file is
    fsynced first so a power loss cannot leave an empty file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_mp4(target: Path, frames: np.ndarray, fps: float) -> None:
    """H.264 (libx264, yuv420p, CRF 18) in MP4, BT.709 limited range, tagged as such."""
    frames = _pad_to_even(frames)  # [T, H', W', 3], H' and W' even
    _, h, w, _ = frames.shape
    # format="mp4" because the temp name's suffix (.tmp) says nothing about the container.
    with av.open(str(target), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=_fps_fraction(fps), options={"crf": str(MP4_CRF)})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        ctx = stream.codec_context
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = _AVCOL_BT709
        ctx.color_range = _AVCOL_RANGE_MPEG
        for i, rgb in enumerate(frames):  # rgb: [H', W', 3]
            frame = _reformatter().reformat(
                av.VideoFrame.from_ndarray(rgb, format="rgb24"),
                format="yuv420p", dst_colorspace=Colorspace.ITU709, interpolation=_SWS_FLAGS,
            )
            frame.pts = i  # in 1/rate units: frame i is shown at i / fps seconds
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed (B-)frames


def _write_gif(target: Path, frames: np.ndarray, fps: float) -> None:
    """Animated GIF that loops forever.

    GIF delays are stored in 10 ms units and browsers slow down delays under 20 ms, so the
    real rate is approximate and capped at 50 fps. Pillow merges *identical* consecutive
    frames into one longer frame (timing is preserved, the frame count is not).
    """
    duration_ms = max(_MIN_GIF_FRAME_MS, round(1000.0 / float(_fps_fraction(fps))))
    images = [Image.fromarray(rgb) for rgb in frames]  # each [H, W, 3]
    images[0].save(
        target,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration_ms,
        loop=0,
    )


_WRITERS = {".mp4": _write_mp4, ".gif": _write_gif}


def write_video(path: str | os.PathLike[str], video: Tensor, fps: float, upscale: int = 1) -> Path:
    """Write a float ``[3, T, H, W]`` video in [-1, 1] to ``.mp4`` or ``.gif`` (by suffix).

    ``upscale`` repeats pixels (nearest) so tiny clips are watchable. MP4 frames with odd
    height / width are padded to even by edge replication (see module docstring). The file
    appears atomically; parent folders are created. Returns the written path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITERS:
        raise ValueError(
            f"unsupported video suffix {path.suffix!r} for {str(path)!r}; "
            f"expected one of {', '.join(VIDEO_SUFFIXES)}"
        )
    _fps_fraction(fps)  # validate before any work
    frames = _upscale(to_uint8_frames(video), upscale)  # [T, H*k, W*k, 3]
    with _atomic_target(path) as tmp:
        _WRITERS[suffix](tmp, frames, fps)
    return path


def write_frame_grid(
    path: str | os.PathLike[str],
    video: Tensor,
    upscale: int = 1,
    max_frames: int | None = None,
    padding: int = 1,
) -> Path:
    """Save the frames of ``video`` [3, T, H, W] side by side in one row as a PNG.

    A single still is easier to embed in reports / diff in reviews than a video. With
    ``max_frames`` only the first ``max_frames`` frames are shown. ``padding`` black pixels
    (in output pixels, i.e. after upscaling) separate frames, so the PNG is
    ``(H*k) x (T*W*k + (T-1)*padding)``. Written atomically.
    """
    path = Path(path)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    frames = to_uint8_frames(video)[:max_frames]  # [T', H, W, 3]
    frames = _upscale(frames, upscale)  # [T', H*k, W*k, 3]
    t, h, w, _ = frames.shape
    grid = np.zeros((h, t * w + (t - 1) * padding, 3), dtype=np.uint8)  # [H*k, T'*W*k + pads, 3]
    for i, rgb in enumerate(frames):
        x0 = i * (w + padding)
        grid[:, x0 : x0 + w] = rgb
    with _atomic_target(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------- reading


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "file does not exist")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _read_image(path: Path) -> np.ndarray:
    """Decode a still with Pillow into uint8 ``[H, W, 3]`` (EXIF rotation applied)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError / truncated-file errors are OSError subclasses.
        raise VideoDecodeError(path, f"not a readable image ({e})") from e
    return np.array(rgb)  # [H, W, 3]; a writable copy (torch warns on read-only arrays)


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    """Best available frame rate: measured average, then FFmpeg's guesses; 0.0 if unknown."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def _frame_to_rgb(frame: av.VideoFrame, height: int | None = None, width: int | None = None,
                  conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA) -> np.ndarray:
    """Decoded frame -> uint8 ``[height, width, 3]`` (default: the frame's size), scaled in the same swscale call;
    the default conversion honours the stream's BT.709 tags."""
    if conversion is RGBConversion.PLAIN_RGB24:  # swscale's defaults, as PyAV's frame.to_ndarray(format="rgb24")
        return _reformatter().reformat(frame, width=width, height=height, format="rgb24").to_ndarray()
    src = Colorspace.ITU709 if frame.colorspace == _AVCOL_BT709 else None
    return _reformatter().reformat(
        frame, width=width, height=height, format="rgb24", src_colorspace=src, interpolation=_SWS_FLAGS
    ).to_ndarray()


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open ``path`` and yield (container, first video stream); FFmpeg errors -> VideoDecodeError."""
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream in container")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            yield container, stream
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e


def read_video(path: str | os.PathLike[str], max_frames: int | None = None,
               conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA) -> tuple[Tensor, float]:
    """Decode a video (or a still image) into float ``[3, T, H, W]`` in [-1, 1] and its fps.

    Stills (``.png/.jpg/.jpeg/.webp/.bmp``) come back as 1-frame videos with fps 0.0.
    ``max_frames`` stops decoding early; ``conversion`` picks the YUV -> RGB conversion. Raises
    :class:`VideoDecodeError` for missing, corrupt or frameless files, and for files that decode to fewer frames than their
    container declares (a truncated download must not silently become a shorter clip).
    """
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    _check_readable(path)
    if _is_image(path):
        return _from_uint8_frames(_read_image(path)[None]), 0.0  # [3, 1, H, W]

    frames: list[np.ndarray] = []
    with _open_video(path) as (container, stream):
        declared = stream.frames  # 0 when the container does not say
        fps = _stream_fps(stream)
        for frame in container.decode(stream):
            frames.append(_frame_to_rgb(frame, conversion=conversion))  # [H, W, 3]
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise VideoDecodeError(path, "no decodable video frames")
    if max_frames is None and declared and len(frames) < declared:
        raise VideoDecodeError(
            path, f"decoded only {len(frames)} of {declared} frames declared by the container (truncated?)"
        )
    return _from_uint8_frames(np.stack(frames)), fps  # [3, T, H, W]


def probe_video(path: str | os.PathLike[str]) -> dict[str, int | float]:
    """Return ``{"frames", "fps", "width", "height"}`` without decoding the whole file.

    Uses container metadata; frames are counted by decoding only when the container does not
    declare a count. The first frame is always decoded so an unreadable file fails here,
    not later inside a training step. Stills report 1 frame at fps 0.0.
    """
    path = Path(path)
    _check_readable(path)
    if _is_image(path):
        h, w, _ = _read_image(path).shape
        return {"frames": 1, "fps": 0.0, "width": w, "height": h}

    with _open_video(path) as (container, stream):
        fps = _stream_fps(stream)
        declared = stream.frames
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is None:
            raise VideoDecodeError(path, "no decodable video frames")
        width, height = first.width, first.height
        frames = declared if declared else 1 + sum(1 for _ in decoded)
    return {"frames": int(frames), "fps": fps, "width": int(width), "height": int(height)}
