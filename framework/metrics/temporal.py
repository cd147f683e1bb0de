"""Temporal-consistency metrics for generated videos, as torchmetrics Metrics; nothing to download.

All take videos ``[B, 3, T, H, W]`` (or a list of ``[3, T, H, W]`` of any sizes) in [-1, 1], score each video, and
report the mean over videos (float64 sum and count states, summed across DDP ranks).

* :class:`OpticalFlowMetrics` -- from OpenCV Farneback optical flow (Farnebäck 2003), computed once per frame pair
  in both directions:

  - ``warping_error`` (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018): frame t+1 is warped
    back onto frame t along the forward flow; the squared RGB difference (values in [0, 1]) is averaged over pixels
    that pass the forward–backward consistency check of Sundaram et al. (ECCV 2010),
    ``|f(x) + b(x + f(x))|² < 0.01 (|f|² + |b(x + f(x))|²) + 0.5``; then over frame pairs. 0 = perfectly
    consistent; lower is better.
  - ``motion_smoothness`` (proxy for VBench's, which uses the AMT frame interpolator): each odd frame is predicted
    from its two neighbours by moving them half-way along the flow between them, and scored like VBench,
    ``(255 − mean |prediction − frame|) / 255``. 1 = motion is perfectly linear (or absent).
  - ``dynamic_degree`` (VBench's rule with Farneback instead of RAFT): a video is dynamic when at least
    ``round(4 · T / 16)`` frame pairs have a mean top-5 % flow magnitude above ``6 · min(H, W) / 256`` pixels;
    the metric is the fraction of dynamic videos (0 for a still video, 1 for a moving one).

* :class:`TemporalFlickering` (VBench): ``(255 − mean |frame_t − frame_{t+1}|) / 255`` on 8-bit frames. 1 for a
  constant video, 0 for one alternating between black and white.
* :class:`FrameRepetition`: the fraction of adjacent frame pairs that are (near-)copies, and whether a video
  stutters (at least a quarter of its frames repeated) or is static (mean adjacent difference under half an 8-bit
  level). Repeated and frozen frames make warping error, flickering and frame consistency look better than real
  motion does, so these flags guard those scores.
* :class:`AdjacentFrameConsistency`: mean ``max(0, cos(φ(frame_t), φ(frame_{t+1})))`` for a pluggable frame feature
  extractor φ (any ``nn.Module`` mapping ``[N, 3, H, W]`` to ``[N, D]``; VBench uses DINO). The default
  :class:`PooledPixelFeatures` needs no weights. 1 for a constant video.

Flow is computed on frames downscaled so the longer side is at most ``flow_max_size`` pixels (default 256), which
keeps a 64-frame 720p clip at a few seconds on a CPU; the thresholds above use that resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from framework.data.video_io import to_uint8_frames

__all__ = [
    "AdjacentFrameConsistency",
    "FarnebackParams",
    "FrameRepetition",
    "OpticalFlowMetrics",
    "PooledPixelFeatures",
    "RepetitionThresholds",
    "TemporalFlickering",
    "adjacent_frame_differences",
    "flow_scores",
    "frame_repetition",
    "occlusion_mask",
    "temporal_flickering",
    "warp",
]


def _cv2():
    try:
        import cv2
    except ImportError as e:  # an optional dependency: say which extra provides it
        raise ImportError("optical-flow metrics need OpenCV: pip install 'kinetoscope[metrics]' "
                          "(opencv-python-headless)") from e
    return cv2


@dataclass(frozen=True)
class FarnebackParams:
    """``cv2.calcOpticalFlowFarneback`` settings (OpenCV's tutorial values)."""

    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2


def _video_list(videos: Tensor | list[Tensor], min_frames: int, metric: str) -> list[Tensor]:
    if isinstance(videos, Tensor):
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"{metric}: videos must be [B, 3, T, H, W], got shape {list(videos.shape)}")
        videos = list(videos.unbind(0))
    if not videos:
        raise ValueError(f"{metric}: no videos given")
    for i, video in enumerate(videos):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"{metric}: video {i} must be [3, T, H, W], got shape {list(video.shape)}")
        if video.shape[1] < min_frames:
            raise ValueError(f"{metric}: video {i} has {video.shape[1]} frames, needs at least {min_frames}")
    return videos


def _resize_uint8(frames: np.ndarray, max_size: int | None) -> np.ndarray:
    """[T, H, W, 3] uint8 -> downscaled (area filter) so max(H, W) <= max_size."""
    t, h, w, _ = frames.shape
    if max_size is None or max(h, w) <= max_size:
        return frames
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    cv2 = _cv2()
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])  # [T, h', w', 3]


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out(x) = image(x + flow(x))`` bilinearly, edges replicated. image [H, W, C], flow [H, W, 2]."""
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))  # [H, W] each
    cv2 = _cv2()
    out = cv2.remap(image, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(image.shape)  # OpenCV drops a trailing channel axis of size 1


def occlusion_mask(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels [H, W] (bool) whose forward flow is undone by the backward flow (Sundaram et al. 2010)."""
    backward_at_target = warp(backward, forward)  # [H, W, 2]: b(x + f(x))
    round_trip = ((forward + backward_at_target) ** 2).sum(-1)  # [H, W]
    magnitude = (forward ** 2).sum(-1) + (backward_at_target ** 2).sum(-1)  # [H, W]
    return round_trip < 0.01 * magnitude + 0.5


def _flow(cv2, a: np.ndarray, b: np.ndarray, params: FarnebackParams) -> np.ndarray:
    return cv2.calcOpticalFlowFarneback(a, b, None, params.pyr_scale, params.levels, params.winsize,
                                        params.iterations, params.poly_n, params.poly_sigma, 0)  # [H, W, 2]


def flow_scores(video: Tensor, params: FarnebackParams = FarnebackParams(),
                flow_max_size: int | None = 256) -> dict[str, float]:
    """Warping error, motion smoothness and dynamic (0/1) of one video [3, T, H, W] in [-1, 1], T >= 3."""
    cv2 = _cv2()
    frames = _resize_uint8(to_uint8_frames(video), flow_max_size)  # [T, H, W, 3] uint8
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]  # T x [H, W]
    rgb = frames.astype(np.float32) / 255.0  # [T, H, W, 3] in [0, 1]
    t, h, w, _ = frames.shape

    warp_errors, top_motion = [], []
    for i in range(t - 1):
        forward = _flow(cv2, gray[i], gray[i + 1], params)  # [H, W, 2] frame i -> i+1
        backward = _flow(cv2, gray[i + 1], gray[i], params)  # [H, W, 2] frame i+1 -> i
        valid = occlusion_mask(forward, backward)  # [H, W]
        squared = ((rgb[i] - warp(rgb[i + 1], forward)) ** 2).mean(-1)  # [H, W]
        # A pair with no consistent pixel at all (e.g. unrelated frames) is scored on every pixel, never skipped.
        warp_errors.append(float(squared[valid].mean() if valid.any() else squared.mean()))
        magnitude = np.sqrt((forward ** 2).sum(-1)).ravel()  # [H*W]
        top = np.sort(magnitude)[-max(1, int(0.05 * magnitude.size)):]  # top 5 %
        top_motion.append(float(top.mean()))

    interpolation_errors = []
    for i in range(1, t - 1, 2):  # predict each odd frame from its neighbours (VBench drops odd frames too)
        across = _flow(cv2, gray[i - 1], gray[i + 1], params)  # [H, W, 2] frame i-1 -> i+1
        before = warp(rgb[i - 1], -0.5 * across)  # [H, W, 3]: frame i-1 moved half-way forward
        after = warp(rgb[i + 1], 0.5 * across)  # [H, W, 3]: frame i+1 moved half-way back
        prediction = (before + after) / 2
        interpolation_errors.append(float(np.abs(prediction - rgb[i]).mean()))

    threshold = 6.0 * min(h, w) / 256.0
    needed = max(1, round(4 * t / 16))
    moving_pairs = sum(m > threshold for m in top_motion)
    return {
        "warping_error": float(np.mean(warp_errors)),
        "motion_smoothness": 1.0 - float(np.mean(interpolation_errors)),  # = (255 - MAE_8bit) / 255
        "dynamic_degree": float(moving_pairs >= needed),
    }


def adjacent_frame_differences(video: Tensor) -> np.ndarray:
    """Mean absolute difference of each adjacent frame pair on 8-bit frames: [T-1] in [0, 255]."""
    frames = to_uint8_frames(video)  # [T, H, W, 3] uint8
    # One pair at a time in int16: a float64 copy of a 64-frame 720p clip would take 1.4 GB.
    return np.array([np.abs(frames[t + 1].astype(np.int16) - frames[t]).mean() for t in range(len(frames) - 1)])


def temporal_flickering(video: Tensor) -> float:
    """VBench temporal flickering of one video [3, T, H, W] in [-1, 1]: (255 − mean adjacent-frame MAE) / 255."""
    return float((255.0 - adjacent_frame_differences(video).mean()) / 255.0)


@dataclass(frozen=True)
class RepetitionThresholds:
    """When a frame counts as a repeat and a video as stuttering or static (8-bit levels, see ``frame_repetition``).

    A repeat differs from its predecessor by less than ``relative`` × the video's mean adjacent difference, or by
    less than ``absolute`` levels (a lossy codec never reproduces a copied frame bit for bit, but stays well under
    one level). A video stutters when at least ``stutter_fraction`` of its pairs are repeats (one frame in four
    held twice) and is static when its mean adjacent difference is below ``static_level``.
    """

    relative: float = 0.2
    absolute: float = 0.25
    stutter_fraction: float = 0.25
    static_level: float = 0.5


def frame_repetition(video: Tensor, thresholds: RepetitionThresholds = RepetitionThresholds()) -> dict[str, float]:
    """Repeated-frame fraction and the stuttering / static flags (0 or 1) of one video [3, T, H, W], T >= 2.

    Repeating frames makes warping error and flickering look *better* (a held frame is perfectly consistent with
    its copy), so these flags say when those scores must not be trusted. The threshold is relative to the video's
    own motion: in a clip where every other frame is a copy, the pair differences alternate between ~0 and twice
    the real motion, so half of them fall far below the mean.
    """
    differences = adjacent_frame_differences(video)  # [T-1]
    mean = float(differences.mean())
    repeats = differences < max(thresholds.absolute, thresholds.relative * mean)  # [T-1]
    repeated = float(repeats.mean())
    static = mean < thresholds.static_level
    return {"repeated_frames": repeated,
            "stuttering": float(not static and repeated >= thresholds.stutter_fraction),
            "static": float(static)}


class _MeanOverVideos(Metric):
    """Per-video scores -> mean over videos, with float64 sum/count states summed across ranks."""

    is_differentiable = False
    full_state_update = False
    score_names: tuple[str, ...] = ()
    min_frames = 2

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.score_names:
            self.add_state(f"{name}_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("video_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def score_video(self, video: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def update(self, videos: Tensor | list[Tensor]) -> None:
        for video in _video_list(videos, self.min_frames, type(self).__name__):
            if torch.isnan(video).any():
                raise ValueError(f"{type(self).__name__}: a video contains NaN values")
            scores = self.score_video(video)
            for name in self.score_names:
                setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + scores[name])
            self.video_count += 1

    def compute(self) -> dict[str, Tensor]:
        if int(self.video_count) == 0:
            raise ValueError(f"{type(self).__name__}: compute() called before any video was added")
        return {name: getattr(self, f"{name}_sum") / self.video_count for name in self.score_names}


class OpticalFlowMetrics(_MeanOverVideos):
    """``{"warping_error", "motion_smoothness", "dynamic_degree"}`` from Farneback flow (see module docstring)."""

    score_names = ("warping_error", "motion_smoothness", "dynamic_degree")
    min_frames = 3

    def __init__(self, params: FarnebackParams = FarnebackParams(), flow_max_size: int | None = 256,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        _cv2()  # fail at construction, not at the first update, when OpenCV is missing
        self.params, self.flow_max_size = params, flow_max_size

    def score_video(self, video: Tensor) -> dict[str, float]:
        return flow_scores(video, self.params, self.flow_max_size)


class TemporalFlickering(_MeanOverVideos):
    """``{"temporal_flickering"}``: VBench's score, 1 = no change between adjacent frames."""

    score_names = ("temporal_flickering",)
    higher_is_better = True

    def score_video(self, video: Tensor) -> dict[str, float]:
        return {"temporal_flickering": temporal_flickering(video)}


class FrameRepetition(_MeanOverVideos):
    """``{"repeated_frames", "stuttering", "static"}``: the mean repeated-pair fraction and the fractions of videos
    flagged as stuttering or static (:func:`frame_repetition`). 0 for natural footage; read them before trusting
    warping error, flickering or frame consistency, which repeated or frozen frames improve."""

    score_names = ("repeated_frames", "stuttering", "static")
    higher_is_better = False

    def __init__(self, thresholds: RepetitionThresholds = RepetitionThresholds(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = thresholds

    def score_video(self, video: Tensor) -> dict[str, float]:
        return frame_repetition(video, self.thresholds)


class PooledPixelFeatures(nn.Module):
    """Weight-free frame features: [N, 3, H, W] -> the frame average-pooled to ``grid``×``grid``, flattened [N, 3·g²]."""

    def __init__(self, grid: int = 8) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, frames: Tensor) -> Tensor:  # frames: [N, 3, H, W]
        return F.adaptive_avg_pool2d(frames, self.grid).flatten(1)  # [N, 3 * grid * grid]


class AdjacentFrameConsistency(_MeanOverVideos):
    """``{"frame_consistency"}``: mean clamped cosine similarity of adjacent frames' features (1 = unchanged)."""

    score_names = ("frame_consistency",)
    higher_is_better = True

    def __init__(self, feature_extractor: nn.Module | None = None, batch_size: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.feature_extractor = (feature_extractor or PooledPixelFeatures()).eval().requires_grad_(False)
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> AdjacentFrameConsistency:
        super().train(mode)
        self.feature_extractor.eval()
        return self

    @torch.no_grad()
    def score_video(self, video: Tensor) -> dict[str, float]:
        frames = video.transpose(0, 1).float()  # [T, 3, H, W]
        parameter = next(self.feature_extractor.parameters(), None)
        if parameter is not None:
            frames = frames.to(parameter.device)
        features = torch.cat([self.feature_extractor(chunk) for chunk in frames.split(self.batch_size)])  # [T, D]
        if features.ndim != 2 or features.shape[0] != frames.shape[0]:
            raise ValueError(f"AdjacentFrameConsistency: the feature extractor must map [N, 3, H, W] to [N, D], "
                             f"got {list(features.shape)} for {frames.shape[0]} frames")
        if not torch.isfinite(features).all():
            raise ValueError("AdjacentFrameConsistency: the feature extractor returned NaN/inf")
        similarity = F.cosine_similarity(features[:-1], features[1:], dim=1).clamp(min=0)  # [T-1]
        return {"frame_consistency": float(similarity.double().mean())}
