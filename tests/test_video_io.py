"""Tests for framework.data.video_io: round trips through real encoders / decoders (PyAV, Pillow)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from framework.data import video_io
from framework.data.video_io import (
    VideoDecodeError,
    probe_video,
    read_video,
    to_uint8_frames,
    write_frame_grid,
    write_video,
)


def smooth_video(t: int = 8, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth moving colour pattern in [-1, 1], [3, T, H, W]; each frame differs from the last.

    Spatial period is fixed in pixels (32 px), so the pattern is equally smooth at any size.
    """
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g) * 2 * math.pi  # [3]
    tt = torch.arange(t, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
    yy = torch.arange(h, dtype=torch.float32)[None, :, None] / 32  # [1, H, 1]
    xx = torch.arange(w, dtype=torch.float32)[None, None, :] / 32  # [1, 1, W]
    r = torch.sin(2 * math.pi * xx + 0.4 * tt + phase[0]) + 0 * yy  # [T, H, W]
    gr = torch.cos(2 * math.pi * yy - 0.3 * tt + phase[1]) + 0 * xx  # [T, H, W]
    b = torch.sin(math.pi * (xx + yy) + 0.2 * tt + phase[2])  # [T, H, W]
    return 0.8 * torch.stack([r, gr, b])  # [3, T, H, W]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB on the uint8 scale, both inputs float in [-1, 1]."""
    mse = ((to_uint8_frames(a).astype(np.float64) - to_uint8_frames(b)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def quantized(video: torch.Tensor) -> torch.Tensor:
    """What a lossless writer + read_video must return: the uint8-quantised input."""
    return video_io._from_uint8_frames(to_uint8_frames(video))  # [3, T, H, W]


# ----------------------------------------------------------------------------- conversion


def test_to_uint8_mapping_and_clamp() -> None:
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, float("inf")]).view(1, 6, 1, 1).expand(3, 6, 1, 1)
    frames = to_uint8_frames(video)  # [6, 1, 1, 3]
    assert frames.shape == (6, 1, 1, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255, 255]


def test_to_uint8_rejects_nan_and_bad_shape() -> None:
    video = smooth_video(2, 4, 4)
    video[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(video)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(4, 2, 4, 4))


# ----------------------------------------------------------------------------- mp4


@pytest.mark.parametrize("fps", [8, 30000 / 1001, 12.5])
def test_mp4_roundtrip_shape_fps_quality(tmp_path: Path, fps: float) -> None:
    video = smooth_video(8, 32, 48)
    path = write_video(tmp_path / "clip.mp4", video, fps=fps)
    decoded, got_fps = read_video(path)
    assert decoded.shape == video.shape
    assert decoded.dtype == torch.float32
    assert got_fps == pytest.approx(fps, rel=1e-9)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert psnr(decoded, video) > 30
    assert probe_video(path) == {"frames": 8, "fps": pytest.approx(fps, rel=1e-9), "width": 48, "height": 32}


def test_mp4_odd_size_is_padded_by_edge_replication(tmp_path: Path) -> None:
    video = smooth_video(6, 15, 17)
    decoded, _ = read_video(write_video(tmp_path / "odd.mp4", video, fps=10))
    assert decoded.shape == (3, 6, 16, 18)  # padded to even for yuv420p
    assert psnr(decoded[:, :, :15, :17], video) > 30  # original region intact
    # The padding repeats the last row / column (up to compression error), not black.
    assert (decoded[:, :, 15] - decoded[:, :, 14]).abs().mean() < 0.05
    assert (decoded[:, :, :, 17] - decoded[:, :, :, 16]).abs().mean() < 0.05


def test_mp4_upscale(tmp_path: Path) -> None:
    video = smooth_video(4, 16, 16)
    decoded, _ = read_video(write_video(tmp_path / "big.mp4", video, fps=8, upscale=4))
    assert decoded.shape == (3, 4, 64, 64)
    reference = video.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # [3, 4, 64, 64]
    assert psnr(decoded, reference) > 30


def test_read_video_max_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", smooth_video(8, 16, 16), fps=8)
    decoded, _ = read_video(path, max_frames=3)
    assert decoded.shape == (3, 3, 16, 16)


# ----------------------------------------------------------------------------- gif / png


def test_gif_frames_size_loop(tmp_path: Path) -> None:
    video = smooth_video(6, 15, 17)
    path = write_video(tmp_path / "anim.gif", video, fps=10, upscale=2)
    with Image.open(path) as img:
        assert img.format == "GIF"
        assert img.n_frames == 6
        assert img.size == (34, 30)  # (W, H); GIF keeps odd sizes, no padding
        assert img.info["loop"] == 0  # loop forever
        assert img.info["duration"] == 100  # ms per frame at 10 fps
    decoded, _ = read_video(path)
    assert decoded.shape == (3, 6, 30, 34)


@pytest.mark.parametrize(("padding", "max_frames"), [(1, None), (0, None), (3, 4)])
def test_frame_grid_layout_and_pixels(tmp_path: Path, padding: int, max_frames: int | None) -> None:
    t, h, w = 6, 15, 17
    video = smooth_video(t, h, w)
    path = write_frame_grid(tmp_path / "grid.png", video, max_frames=max_frames, padding=padding)
    shown = t if max_frames is None else max_frames
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (shown * w + (shown - 1) * padding, h)
    grid, fps = read_video(path)  # [3, 1, H, W_grid]
    assert fps == 0.0
    expected = quantized(video)  # [3, T, H, W]
    for i in range(shown):  # PNG is lossless: every frame is bit-exact in its slot
        x0 = i * (w + padding)
        assert torch.equal(grid[:, 0, :, x0 : x0 + w], expected[:, i])


def test_frame_grid_upscale(tmp_path: Path) -> None:
    path = write_frame_grid(tmp_path / "grid.png", smooth_video(3, 16, 16), upscale=4, padding=2)
    with Image.open(path) as img:
        assert img.size == (3 * 64 + 2 * 2, 64)


def test_still_png_reads_as_one_frame(tmp_path: Path) -> None:
    frame = smooth_video(1, 15, 17)  # [3, 1, 15, 17]
    path = write_frame_grid(tmp_path / "still.png", frame)
    video, fps = read_video(path)
    assert video.shape == (3, 1, 15, 17) and fps == 0.0
    assert torch.equal(video, quantized(frame))  # exact inverse of the uint8 mapping
    assert probe_video(path) == {"frames": 1, "fps": 0.0, "width": 17, "height": 15}


# ----------------------------------------------------------------------------- errors


def test_bad_suffix_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.avi.*\.mp4.*\.gif"):
        write_video(tmp_path / "clip.avi", smooth_video(2, 4, 4), fps=8)
    assert not (tmp_path / "clip.avi").exists()


def test_bad_fps_raises(tmp_path: Path) -> None:
    for fps in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            write_video(tmp_path / "clip.mp4", smooth_video(2, 4, 4), fps=fps)


def test_truncated_mp4_raises(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", smooth_video(8, 32, 32), fps=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="clip.mp4"):
        read_video(path)
    with pytest.raises(VideoDecodeError, match="clip.mp4"):
        probe_video(path)


def test_truncated_faststart_mp4_raises_on_missing_frames(tmp_path: Path) -> None:
    """moov-at-front files still open when cut; the declared-vs-decoded count catches them."""
    path = tmp_path / "fast.mp4"
    frames = to_uint8_frames(torch.rand(3, 16, 32, 32) * 2 - 1)  # [T, H, W, 3], noisy -> big frames
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert read_video(path)[0].shape[1] == 16
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="fast.mp4"):
        read_video(path)


def test_random_bytes_raise(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="noise.mp4"):
        read_video(path)
    with pytest.raises(VideoDecodeError, match="noise.mp4"):
        probe_video(path)


def test_corrupt_png_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(VideoDecodeError, match="broken.png"):
        read_video(path)


def test_missing_path_raises(tmp_path: Path) -> None:
    for reader in (read_video, probe_video):
        with pytest.raises(VideoDecodeError, match="missing.mp4") as info:
            reader(tmp_path / "missing.mp4")
        assert isinstance(info.value, ValueError)
        assert info.value.path == tmp_path / "missing.mp4"


def _write_zero_frame_avi(path: Path) -> None:
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # header + index, but not a single frame


def _write_audio_only_mp4(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("maker", [_write_zero_frame_avi, _write_audio_only_mp4])
def test_zero_video_frames_raise(tmp_path: Path, maker) -> None:
    path = tmp_path / ("empty.avi" if maker is _write_zero_frame_avi else "audio.mp4")
    maker(path)
    assert path.stat().st_size > 0
    for reader in (read_video, probe_video):
        with pytest.raises(VideoDecodeError, match=path.name):
            reader(path)


def test_decode_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(VideoDecodeError("/x/y.mp4", "boom")))
    assert err.path == Path("/x/y.mp4") and err.reason == "boom" and "y.mp4" in str(err)


# ----------------------------------------------------------------------------- atomicity


def test_writers_leave_no_temp_files_and_create_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    video = smooth_video(3, 8, 8)
    write_video(out / "v.mp4", video, fps=8)
    write_video(out / "v.gif", video, fps=8)
    write_frame_grid(out / "g.png", video)
    assert sorted(os.listdir(out)) == ["g.png", "v.gif", "v.mp4"]


def test_failed_write_keeps_old_file_and_cleans_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_video(tmp_path / "v.mp4", smooth_video(3, 8, 8), fps=8)
    before = path.read_bytes()

    def crash(target: Path, frames: np.ndarray, fps: float) -> None:
        target.write_bytes(b"half a file")
        raise RuntimeError("encoder died")

    monkeypatch.setitem(video_io._WRITERS, ".mp4", crash)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(path, smooth_video(3, 8, 8), fps=8)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["v.mp4"]
