"""Fréchet Video Distance (Unterthiner et al. 2018, arXiv:1812.01717) and KID on the same features, as a torchmetrics Metric.

Every FVD number depends on preprocessing that papers rarely state, so it is a named :class:`FVDProtocol` here,
chosen from :class:`FVDPreset` and written next to the number (``metrics.json``, the report, the callback's records):

* ``ORIGINAL_TF1`` -- the original code (google-research ``frechet_video_distance.py``): the first 16 frames of
  each video, ``tf.image.resize_bilinear`` to 224×224 (TF1: no half-pixel centres), values in [-1, 1], a short
  video is an error. Decoding is not part of that code; files are read with our bicubic full-chroma conversion.
* ``STYLEGAN_V`` -- StyleGAN-V's ``compute_fvd`` (also TATS's convention): the first 16 consecutive frames,
  ``F.interpolate`` bilinear resize (half-pixel centres), frames decoded with PyAV's plain ``rgb24`` conversion,
  videos shorter than the clip discarded.
* ``STYLEGAN_V_128F_STRIDE_8`` -- StyleGAN-V's "fvd2048_128f_subsample8f": 16 frames taken every 8th of the first
  128, otherwise as ``STYLEGAN_V``.

In all: features = the TF-Hub Kinetics-400 I3D's 400 logits averaged over time; FVD is the Fréchet distance between
the Gaussians fitted to the real and generated embeddings (float64, unbiased covariances).

State is streaming and DDP-safe: per set a float64 feature sum [D], outer-product sum [D, D] and count, all reduced
with ``sum`` across ranks, so memory does not grow with the number of clips. Only when ``kid_subsets > 0`` are the
raw features kept too (``cat``-reduced), because the kernel MMD of KID (Bińkowski et al. 2018) needs all pairs.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from framework.data.video_io import RGBConversion
from framework.metrics.frechet import covariance_from_sums, frechet_distance

__all__ = ["ClipStart", "FVDPreset", "FVDProtocol", "FrechetVideoDistance", "ResizeKernel", "polynomial_mmd",
           "prepare_clips", "resize_frames"]

I3D_RESOLUTION = 224
I3D_MIN_FRAMES = 9  # the 2x7x7 logits pool needs T/8 >= 2 after I3D's temporal strides
RANGE_TOLERANCE = 1e-3  # the reference code asserts values within [-1.001, 1.001]


class ResizeKernel(enum.Enum):
    """How frames are resized to 224×224 (both bilinear, no antialiasing).

    ``TF1_BILINEAR``: ``tf.image.resize_bilinear`` as used by the original FVD code (``align_corners=False``,
    no half-pixel centres: source = destination × in/out). ``HALF_PIXEL``: ``F.interpolate(mode="bilinear")``
    (source = (destination + ½) × in/out − ½), as in StyleGAN-V and most PyTorch code.
    """

    TF1_BILINEAR = "tf1_bilinear"
    HALF_PIXEL = "half_pixel"


class ClipStart(enum.Enum):
    """Where in a longer video the clip starts: ``FIRST`` at frame 0 (both reference codes), ``MIDDLE`` centred."""

    FIRST = "first"
    MIDDLE = "middle"


@dataclass(frozen=True)
class FVDProtocol:
    """Everything that turns a video file into an I3D input; ``name`` says which preset (and overrides) it is."""

    name: str
    resize: ResizeKernel
    decode: RGBConversion
    clip_length: int = 16
    frame_stride: int = 1
    clip_start: ClipStart = ClipStart.FIRST
    skip_short_videos: bool = False  # StyleGAN-V discards them; the original code would fail on them

    def __post_init__(self) -> None:
        if self.clip_length < 1 or self.frame_stride < 1:
            raise ValueError(f"FVD protocol {self.name}: clip_length and frame_stride must be >= 1, got "
                             f"{self.clip_length}, {self.frame_stride}")

    @property
    def span(self) -> int:
        """Frames a video needs: ``(clip_length − 1) · frame_stride + 1``."""
        return (self.clip_length - 1) * self.frame_stride + 1

    def clip_offset(self, frames: int) -> int:
        """The first frame of the clip in a video of ``frames`` frames (>= ``span``)."""
        return 0 if self.clip_start is ClipStart.FIRST else (frames - self.span) // 2

    def with_overrides(self, clip_length: int | None = None, frame_stride: int | None = None) -> FVDProtocol:
        """This protocol with another clip length / stride; the name records the change."""
        changes = {k: v for k, v in (("clip_length", clip_length), ("frame_stride", frame_stride))
                   if v is not None and v != getattr(self, k)}
        if not changes:
            return self
        label = ", ".join(f"{k}={v}" for k, v in changes.items())
        return dataclasses.replace(self, name=f"{self.name} ({label})", **changes)

    def record(self) -> dict[str, str | int | bool]:
        """JSON-ready description for ``metrics.json`` and reports."""
        return {"name": self.name, "resize": self.resize.value, "decode": self.decode.value,
                "clip_length": self.clip_length, "frame_stride": self.frame_stride,
                "clip_start": self.clip_start.value, "skip_short_videos": self.skip_short_videos,
                "resolution": I3D_RESOLUTION}

    def describe(self) -> str:
        """One line for a report."""
        return (f"{self.name}: {self.clip_length} frames (stride {self.frame_stride}, {self.clip_start.value} clip), "
                f"{self.resize.value} resize to {I3D_RESOLUTION}x{I3D_RESOLUTION}, {self.decode.value} decode"
                + (", short videos skipped" if self.skip_short_videos else ""))


class FVDPreset(enum.Enum):
    """The named protocols (see the module docstring); YAML and ``--fvd-protocol`` pick one by name."""

    ORIGINAL_TF1 = FVDProtocol("original_tf1", ResizeKernel.TF1_BILINEAR, RGBConversion.BICUBIC_FULL_CHROMA)
    STYLEGAN_V = FVDProtocol("stylegan_v", ResizeKernel.HALF_PIXEL, RGBConversion.PLAIN_RGB24,
                             skip_short_videos=True)
    STYLEGAN_V_128F_STRIDE_8 = FVDProtocol("stylegan_v_128f_stride_8", ResizeKernel.HALF_PIXEL,
                                           RGBConversion.PLAIN_RGB24, frame_stride=8, skip_short_videos=True)


def _tf1_axis_weights(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    source = torch.arange(n_out, device=device, dtype=torch.float64) * (n_in / n_out)  # [n_out]
    low = source.floor().long().clamp(max=n_in - 1)  # [n_out]
    high = (low + 1).clamp(max=n_in - 1)  # [n_out]
    return low, high, (source - low).to(torch.float32)


def resize_frames(frames: Tensor, size: int = I3D_RESOLUTION, kernel: ResizeKernel = ResizeKernel.TF1_BILINEAR) -> Tensor:
    """Bilinearly resize ``frames`` [N, C, H, W] to [N, C, size, size] (identity when already that size)."""
    if frames.shape[-2:] == (size, size):
        return frames
    if kernel is ResizeKernel.HALF_PIXEL:
        return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)  # [N, C, S, S]
    h_low, h_high, h_frac = _tf1_axis_weights(frames.shape[-2], size, frames.device)
    w_low, w_high, w_frac = _tf1_axis_weights(frames.shape[-1], size, frames.device)
    rows = frames[:, :, h_low] + (frames[:, :, h_high] - frames[:, :, h_low]) * h_frac[:, None]  # [N, C, S, W]
    return rows[..., w_low] + (rows[..., w_high] - rows[..., w_low]) * w_frac  # [N, C, S, S]


def prepare_clips(videos: Tensor | list[Tensor], protocol: FVDProtocol, size: int = I3D_RESOLUTION) -> Tensor:
    """Cut each video's clip and resize it as ``protocol`` says: ``[B, 3, T, H, W]`` (or a list of [3, T, H, W] of
    any sizes) in [-1, 1] -> ``[B, 3, clip_length, size, size]``.

    Raises ValueError for a wrong layout, values outside [-1, 1] (e.g. uint8 or [0, 255] input), NaNs, or a video
    shorter than ``protocol.span`` frames (never silently pads or loops a short clip; skipping short videos is the
    loader's job, so that it can list them).
    """
    if isinstance(videos, (list, tuple)):
        items = list(videos)
    elif videos.ndim == 5:
        items = list(videos.unbind(0))
    else:
        raise ValueError(f"videos must be [B, 3, T, H, W] or a list of [3, T, H, W], got shape {list(videos.shape)}")
    if not items:
        raise ValueError("videos is empty")
    span, stride = protocol.span, protocol.frame_stride
    clips = []
    for i, video in enumerate(items):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"video {i} must be [3, T, H, W], got shape {list(video.shape)}")
        if video.shape[1] < span:
            raise ValueError(
                f"video {i} has {video.shape[1]} frames; clip_length={protocol.clip_length} with "
                f"frame_stride={stride} needs at least {span}"
            )
        if torch.isnan(video).any():
            raise ValueError(f"video {i} contains NaN values")
        low, high = float(video.min()), float(video.max())
        if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise ValueError(f"video {i} has values in [{low:.3g}, {high:.3g}]; expected [-1, 1] (convert uint8 "
                             "frames with v / 127.5 - 1)")
        start = protocol.clip_offset(video.shape[1])
        clip = video[:, start:start + span:stride].float()  # [3, clip_length, H, W]
        frames = resize_frames(clip.transpose(0, 1), size, protocol.resize)  # [clip_length, 3, S, S]
        clips.append(frames.transpose(0, 1))  # [3, clip_length, S, S]
    return torch.stack(clips)  # [B, 3, clip_length, S, S]


def polynomial_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² with the cubic polynomial kernel k(a, b) = (aᵀb / D + 1)³ (KID, Bińkowski et al. 2018). Float64."""
    x, y = x.to(torch.float64), y.to(torch.float64)  # [M, D], [N, D]
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3  # [M, M]
    k_yy = (y @ y.T / d + 1) ** 3  # [N, N]
    k_xy = (x @ y.T / d + 1) ** 3  # [M, N]
    m, n = x.shape[0], y.shape[0]
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return term_xx + term_yy - 2 * k_xy.mean()


class FrechetVideoDistance(Metric):
    """FVD between ``update(videos, real=True)`` and ``update(videos, real=False)`` sets; ``compute()`` returns
    ``{"fvd": ...}`` plus ``{"kid": mean, "kid_std": std}`` over random subsets when ``kid_subsets > 0``.

    ``protocol``: an :class:`FVDProtocol` (``FVDPreset.X.value``); ``clip_length``/``frame_stride`` override its own.
    ``feature_extractor``: an ``nn.Module`` mapping ``[B, 3, T, 224, 224]`` in [-1, 1] to ``[B, D]``; it must have a
    ``num_features`` attribute or ``num_features`` must be given. For published-protocol numbers pass
    ``framework.metrics.i3d_weights.load_i3d()``; tests pass a randomly initialised ``InceptionI3D``.
    ``update_features`` accepts precomputed features (e.g. from a cache) instead of videos.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, feature_extractor: nn.Module, protocol: FVDProtocol = FVDPreset.ORIGINAL_TF1.value,
                 clip_length: int | None = None, frame_stride: int | None = None, num_features: int | None = None,
                 kid_subsets: int = 0, kid_subset_size: int = 1000, kid_seed: int = 0, batch_size: int = 8,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.protocol = protocol.with_overrides(clip_length, frame_stride)
        num_features = num_features or getattr(feature_extractor, "num_features", None)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(feature_extractor).__name__} has no int `num_features`; pass num_features=")
        if kid_subsets < 0 or kid_subset_size < 2:
            raise ValueError(f"kid_subsets must be >= 0 and kid_subset_size >= 2, got {kid_subsets}, {kid_subset_size}")
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)
        self.num_features, self.batch_size = num_features, batch_size
        self.kid_subsets, self.kid_subset_size, self.kid_seed = kid_subsets, kid_subset_size, kid_seed
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer_sum", torch.zeros(num_features, num_features, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
            if kid_subsets:
                self.add_state(f"{side}_features", [], dist_reduce_fx="cat")

    def train(self, mode: bool = True) -> FrechetVideoDistance:
        """The feature extractor stays in eval mode (a Lightning module's ``.train()`` must not flip it)."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    @torch.no_grad()
    def extract_features(self, videos: Tensor | list[Tensor]) -> Tensor:
        """Protocol features [B, D] (float64) of ``videos`` [B, 3, T, H, W] in [-1, 1], in batches of ``batch_size``."""
        clips = prepare_clips(videos, self.protocol)  # [B, 3, L, 224, 224]
        parameter = next(self.feature_extractor.parameters(), None)
        device = parameter.device if parameter is not None else clips.device
        features = [self.feature_extractor(chunk.to(device)).to(torch.float64)  # [b, D]
                    for chunk in clips.split(self.batch_size)]
        return torch.cat(features)  # [B, D]

    def update(self, videos: Tensor | list[Tensor], real: bool) -> None:
        self._add_features(self.extract_features(videos), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        """Add precomputed features [B, D] to the real or fake statistics (instead of ``update(videos, ...)``)."""
        # torchmetrics does this bookkeeping only inside ``update``: drop the cached compute() result and count the
        # update, so a compute() after this call sees the new features (and does not warn about a missing update).
        self._computed = None
        self._update_count += 1
        self._add_features(features, real)

    def _add_features(self, features: Tensor, real: bool) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be [B, {self.num_features}], got shape {list(features.shape)}")
        if not torch.isfinite(features).all():
            bad = int((~torch.isfinite(features)).any(dim=1).sum())
            raise ValueError(f"{bad} of {features.shape[0]} {'real' if real else 'fake'} feature vectors contain "
                             "NaN/inf (a diverged generator or a broken feature extractor)")
        side = "real" if real else "fake"
        x = features.to(device=self.real_sum.device, dtype=torch.float64)  # [B, D]
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + x.sum(dim=0))
        setattr(self, f"{side}_outer_sum", getattr(self, f"{side}_outer_sum") + x.T @ x)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + x.shape[0])
        if self.kid_subsets:
            getattr(self, f"{side}_features").append(x)

    def compute(self) -> dict[str, Tensor]:
        counts = {"real": int(self.real_count), "fake": int(self.fake_count)}
        if min(counts.values()) < 2:
            raise ValueError(f"FVD needs at least 2 real and 2 fake videos, got {counts['real']} real and "
                             f"{counts['fake']} fake")
        mu_real, sigma_real = covariance_from_sums(self.real_sum, self.real_outer_sum, counts["real"])
        mu_fake, sigma_fake = covariance_from_sums(self.fake_sum, self.fake_outer_sum, counts["fake"])
        result = {"fvd": frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)}
        if self.kid_subsets:
            result.update(self._kid())
        return result

    def _kid(self) -> dict[str, Tensor]:
        real, fake = self.real_features, self.fake_features
        real = torch.cat(real) if isinstance(real, list) else real  # [N_real, D]
        fake = torch.cat(fake) if isinstance(fake, list) else fake  # [N_fake, D]
        size = min(self.kid_subset_size, real.shape[0], fake.shape[0])
        generator = torch.Generator().manual_seed(self.kid_seed)
        scores = torch.stack([
            polynomial_mmd(real[torch.randperm(real.shape[0], generator=generator)[:size].to(real.device)],
                           fake[torch.randperm(fake.shape[0], generator=generator)[:size].to(fake.device)])
            for _ in range(self.kid_subsets)
        ])  # [subsets]
        return {"kid": scores.mean(), "kid_std": scores.std(unbiased=False)}


def fvd_comparison_videos(seed: int, num_videos: int = 128, batch_size: int = 8, frames: int = 16,
                          size: int = I3D_RESOLUTION):
    """Yield the clips of universome/fvd-comparison's ``compare_metrics.py`` in batches of [b, 3, T, S, S].

    That check draws ``np.random.RandomState(seed).rand(num_videos, frames, 224, 224, 3).astype(float32)`` (values in
    [0, 1], fed to I3D as they are) with seeds 1 (fake) and 2 (real); TF-Hub gives FVD 10.13808537. Drawing the
    same stream video by video keeps the exact numbers without holding 2 × 385 MB in memory.
    """
    import numpy as np

    state = np.random.RandomState(seed)
    for start in range(0, num_videos, batch_size):
        count = min(batch_size, num_videos - start)
        batch = state.rand(count, frames, size, size, 3).astype(np.float32)  # [b, T, S, S, 3]
        yield torch.from_numpy(batch).permute(0, 4, 1, 2, 3).contiguous()  # [b, 3, T, S, S]
