"""Temporal-consistency metrics hit the values their definitions give on constant, smoothly moving, shuffled and
black/white-alternating videos, aggregate as mean over videos, and reject bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework.data.video_io import read_video, write_video
from framework.metrics.temporal import (
    AdjacentFrameConsistency,
    FrameRepetition,
    OpticalFlowMetrics,
    TemporalFlickering,
    frame_repetition,
    occlusion_mask,
    temporal_flickering,
    warp,
)

SIZE = 48


def texture(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random colour texture [3, H, W] in [-1, 1] (optical flow needs structure, not white noise)."""
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)[0] * 2 - 1


def constant_video(frames: int = 8) -> torch.Tensor:
    return texture(SIZE, SIZE)[:, None].expand(3, frames, SIZE, SIZE).contiguous()  # [3, T, H, W]


def moving_video(frames: int = 8, speed: int = 3) -> torch.Tensor:
    """The texture panning left by ``speed`` px per frame (constant velocity)."""
    wide = texture(SIZE, SIZE + speed * frames)
    return torch.stack([wide[:, :, speed * t: speed * t + SIZE] for t in range(frames)], dim=1)  # [3, T, H, W]


def shuffled(video: torch.Tensor) -> torch.Tensor:
    order = torch.tensor([0, 5, 2, 7, 1, 6, 3, 4])
    return video[:, order]


def black_white_video(frames: int = 8) -> torch.Tensor:
    return torch.stack([torch.full((3, 16, 16), 1.0 if t % 2 == 0 else -1.0) for t in range(frames)], dim=1)


def flow_metrics(video: torch.Tensor) -> dict[str, float]:
    metric = OpticalFlowMetrics()
    metric.update(video[None])
    return {k: float(v) for k, v in metric.compute().items()}


def test_constant_video_is_perfectly_consistent():
    video = constant_video()
    scores = flow_metrics(video)
    assert scores["warping_error"] < 1e-5  # Farneback leaves sub-0.1 px residual flow on identical frames
    assert scores["motion_smoothness"] > 0.9999
    assert scores["dynamic_degree"] == 0.0
    flicker, consistency = TemporalFlickering(), AdjacentFrameConsistency()
    flicker.update(video[None])
    consistency.update(video[None])
    assert float(flicker.compute()["temporal_flickering"]) == 1.0
    assert float(consistency.compute()["frame_consistency"]) == pytest.approx(1.0, abs=1e-6)


def test_shuffling_a_smooth_pan_breaks_every_temporal_score():
    ordered, jumbled = moving_video(), shuffled(moving_video())
    ordered_scores, jumbled_scores = flow_metrics(ordered), flow_metrics(jumbled)
    assert ordered_scores["dynamic_degree"] == 1.0 and jumbled_scores["dynamic_degree"] == 1.0
    assert ordered_scores["warping_error"] < 1e-3 < jumbled_scores["warping_error"]
    assert ordered_scores["warping_error"] * 20 < jumbled_scores["warping_error"]
    assert ordered_scores["motion_smoothness"] > 0.99 > jumbled_scores["motion_smoothness"]
    flicker = [TemporalFlickering(), TemporalFlickering()]
    consistency = [AdjacentFrameConsistency(), AdjacentFrameConsistency()]
    for i, video in enumerate((ordered, jumbled)):
        flicker[i].update(video[None])
        consistency[i].update(video[None])
    assert float(flicker[0].compute()["temporal_flickering"]) > float(flicker[1].compute()["temporal_flickering"])
    assert float(consistency[0].compute()["frame_consistency"]) > float(consistency[1].compute()["frame_consistency"])


def test_black_white_alternation_is_the_worst_case():
    video = black_white_video()
    flicker = TemporalFlickering()
    flicker.update(video[None])
    assert float(flicker.compute()["temporal_flickering"]) == 0.0  # every pixel changes by 255 every frame
    scores = flow_metrics(video)
    assert scores["warping_error"] == pytest.approx(1.0)  # nothing to warp: frames differ by 1 everywhere
    assert scores["motion_smoothness"] == pytest.approx(0.0)  # a black frame between two white ones
    consistency = AdjacentFrameConsistency()
    consistency.update(video[None])
    assert float(consistency.compute()["frame_consistency"]) == 0.0  # cos(+1 vector, -1 vector) clamped to 0


def test_metrics_average_over_videos_and_accept_mixed_sizes():
    flicker = TemporalFlickering()
    flicker.update([constant_video(), black_white_video()])  # different H, W and the same T
    assert float(flicker.compute()["temporal_flickering"]) == pytest.approx(0.5)
    assert int(flicker.video_count) == 2


def test_warp_and_occlusion_mask_on_a_known_shift():
    image = np.random.default_rng(0).random((8, 10, 1)).astype(np.float32)
    shift = np.zeros((8, 10, 2), np.float32)
    shift[..., 0] = 1.0  # sample one pixel to the right
    np.testing.assert_allclose(warp(image, shift)[:, :-1, 0], image[:, 1:, 0], atol=1e-6)
    assert occlusion_mask(shift, -shift).all()  # backward flow undoes the forward flow everywhere
    assert not occlusion_mask(shift * 5, shift * 5).any()  # both point the same way: inconsistent


class FrameEmbedding(nn.Module):
    """A pluggable extractor: any module [N, 3, H, W] -> [N, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, frames):
        return self.conv(frames).mean(dim=(2, 3))


def test_frame_consistency_uses_a_pluggable_extractor_and_checks_its_output():
    torch.manual_seed(0)
    metric = AdjacentFrameConsistency(FrameEmbedding())
    metric.update(constant_video()[None])
    assert float(metric.compute()["frame_consistency"]) == pytest.approx(1.0, abs=1e-6)
    broken = AdjacentFrameConsistency(nn.Flatten(0))
    with pytest.raises(ValueError, match="must map \\[N, 3, H, W\\] to \\[N, D\\]"):
        broken.update(constant_video()[None])


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="has 2 frames, needs at least 3"):
        OpticalFlowMetrics().update(constant_video(2)[None])
    with pytest.raises(ValueError, match="\\[B, 3, T, H, W\\]"):
        TemporalFlickering().update(constant_video())
    with pytest.raises(ValueError, match="NaN"):
        TemporalFlickering().update(torch.full((1, 3, 4, 8, 8), float("nan")))
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="before any video"):
        TemporalFlickering().compute()  # torchmetrics warns, then our compute() refuses


def stutter(video: torch.Tensor) -> torch.Tensor:
    """Every other frame replaced by a copy of its predecessor (same length, half the distinct frames)."""
    held = video.clone()
    held[:, 1::2] = video[:, 0::2][:, : held[:, 1::2].shape[1]]
    return held


def test_frame_repetition_flags_a_stuttered_clip_and_a_frozen_one_but_not_the_original(tmp_path):
    original = moving_video(16)
    scores = frame_repetition(original)
    assert scores == {"repeated_frames": 0.0, "stuttering": 0.0, "static": 0.0}
    held = frame_repetition(stutter(original))
    assert held["repeated_frames"] == pytest.approx(8 / 15) and held["stuttering"] == 1.0 and held["static"] == 0.0
    frozen = frame_repetition(original[:, :1].expand_as(original))
    assert frozen == {"repeated_frames": 1.0, "stuttering": 0.0, "static": 1.0}
    # Through a lossy codec a copied frame is no longer bit-identical: the flags must survive H.264.
    decoded, _ = read_video(write_video(tmp_path / "stuttered.mp4", stutter(original), fps=8))
    assert frame_repetition(decoded)["stuttering"] == 1.0
    decoded, _ = read_video(write_video(tmp_path / "original.mp4", original, fps=8))
    assert frame_repetition(decoded)["stuttering"] == 0.0


def test_stutter_games_flickering_which_is_why_it_is_flagged():
    """The reason for the measure: held frames score *better* flickering than the real motion (on real clips also
    a better warping error for most; benchmarks/metrics_real_clips.py)."""
    original, held = moving_video(16), stutter(moving_video(16))
    assert temporal_flickering(held) > temporal_flickering(original)
    metric = FrameRepetition()
    metric.update([original, held])
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result["stuttering"] == 0.5 and result["static"] == 0.0
