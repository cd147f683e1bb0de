"""Embedded default dataset: deterministic captioned clips of a coloured shape moving on a background.

Why it exists: the framework needs a dataset that ships with the code (no downloads), renders in
microseconds on a CPU, and whose captions are *checkable* -- the colour and motion direction named in
a caption can be measured back from a video (see ``framework.metrics.motion_probe``), so a benchmark
can tell a model that learned text-conditioned motion from one that did not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

__all__ = [
    "OBJECT_COLOURS",
    "BACKGROUND_COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "DIRECTION_VECTORS",
    "ClipSpec",
    "validate_spec",
    "shape_mask",
    "render_clip",
    "sample_spec",
    "SyntheticMovingShapes",
]

# Saturated, well-separated object colours (pairwise RGB distance >= 255), so the nearest-palette
# lookup in the motion probe is unambiguous even for noisy generated videos.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}

# Every object colour is >= 221 (Euclidean, 0..255 scale) away from every background colour, so a
# fixed foreground threshold (~80) separates object from background with a wide margin.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}

SHAPES: tuple[str, ...] = ("square", "circle")

# Image coordinates: x = column (grows right), y = row (grows down), so "up" decreases y.
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; frozen so it can be hashed, cached and compared."""

    colour: str
    shape: str
    direction: str
    background: str
    frames: int
    height: int
    width: int
    start_x: int
    start_y: int
    object_size: int
    speed: int

    @property
    def caption(self) -> str:
        """Fixed template so captions can be parsed back (``motion_probe.parse_caption``)."""
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    def position(self, t: int) -> tuple[int, int]:
        """Top-left (x, y) of the object at frame ``t``."""
        dx, dy = DIRECTION_VECTORS[self.direction]
        return self.start_x + dx * self.speed * t, self.start_y + dy * self.speed * t


def validate_spec(spec: ClipSpec) -> None:
    """Raise ValueError naming the offending field; rendering a clipped object would make captions lie."""
    if spec.colour not in OBJECT_COLOURS:
        raise ValueError(f"colour={spec.colour!r} is not one of {sorted(OBJECT_COLOURS)}")
    if spec.shape not in SHAPES:
        raise ValueError(f"shape={spec.shape!r} is not one of {list(SHAPES)}")
    if spec.direction not in DIRECTION_VECTORS:
        raise ValueError(f"direction={spec.direction!r} is not one of {list(DIRECTIONS)}")
    if spec.background not in BACKGROUND_COLOURS:
        raise ValueError(f"background={spec.background!r} is not one of {sorted(BACKGROUND_COLOURS)}")
    for name in ("frames", "height", "width", "object_size"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if not isinstance(spec.speed, int) or spec.speed < 0:
        raise ValueError(f"speed={spec.speed!r} must be a non-negative int")
    for name in ("start_x", "start_y"):
        if not isinstance(getattr(spec, name), int):
            raise ValueError(f"{name}={getattr(spec, name)!r} must be an int")
    # Motion is linear, so checking the first and last frame covers every frame in between.
    for t in (0, spec.frames - 1):
        x, y = spec.position(t)
        if not 0 <= x <= spec.width - spec.object_size:
            raise ValueError(
                f"start_x={spec.start_x} puts the object (size {spec.object_size}) at x={x} at frame {t}, "
                f"outside width={spec.width} (direction={spec.direction}, speed={spec.speed})"
            )
        if not 0 <= y <= spec.height - spec.object_size:
            raise ValueError(
                f"start_y={spec.start_y} puts the object (size {spec.object_size}) at y={y} at frame {t}, "
                f"outside height={spec.height} (direction={spec.direction}, speed={spec.speed})"
            )


def shape_mask(shape: str, size: int) -> torch.Tensor:
    """Boolean [size, size] sprite; the circle is the disk inscribed in the box (corners missing)."""
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)  # [S, S]
    if shape == "circle":
        centre = (size - 1) / 2.0
        coords = torch.arange(size, dtype=torch.float32) - centre  # [S]
        dist2 = coords[:, None] ** 2 + coords[None, :] ** 2  # [S, S]
        return dist2 <= (size / 2.0) ** 2  # [S, S]; size 5 -> 5x5 minus its 4 corners
    raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")


def _to_unit(rgb: tuple[int, int, int]) -> torch.Tensor:
    """uint8 RGB -> float32 [3] in [-1, 1], the pixel convention of every video in the framework."""
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0  # [3]


def render_clip(spec: ClipSpec) -> torch.Tensor:
    """Render ``spec`` to a float32 video [3, T, H, W] in [-1, 1] (pixel = rgb / 127.5 - 1)."""
    validate_spec(spec)
    T, H, W, S = spec.frames, spec.height, spec.width, spec.object_size
    sprite = shape_mask(spec.shape, S)  # [S, S]
    mask = torch.zeros(T, H, W, dtype=torch.bool)  # [T, H, W]
    for t in range(T):
        x, y = spec.position(t)
        mask[t, y : y + S, x : x + S] = sprite
    bg = _to_unit(BACKGROUND_COLOURS[spec.background])[:, None, None, None]  # [3, 1, 1, 1]
    fg = _to_unit(OBJECT_COLOURS[spec.colour])[:, None, None, None]  # [3, 1, 1, 1]
    video = torch.where(mask[None], fg, bg)  # [3, T, H, W]
    return video.contiguous()


def sample_spec(
    rng: random.Random, frames: int, height: int, width: int, object_size: int, speed: int
) -> ClipSpec:
    """Draw attributes uniformly and a start so the whole travel stays inside the frame."""
    colour = rng.choice(tuple(OBJECT_COLOURS))
    shape = rng.choice(SHAPES)
    direction = rng.choice(DIRECTIONS)
    background = rng.choice(tuple(BACKGROUND_COLOURS))
    travel = (frames - 1) * speed
    dx, dy = DIRECTION_VECTORS[direction]

    def pick(extent: int, step: int, axis: str) -> int:
        # Free room on this axis; along the motion axis the travel must fit too.
        moving = step != 0
        room = extent - object_size - (travel if moving else 0)
        if room < 0:
            raise ValueError(
                f"{axis}={extent} is too small for object_size={object_size}"
                + (f" travelling {travel} px ({frames} frames at speed {speed})" if moving else "")
            )
        offset = rng.randint(0, room)
        # Moving towards lower coordinates: start at least `travel` px from the low edge.
        return offset + travel if step < 0 else offset

    start_x = pick(width, dx, "width")
    start_y = pick(height, dy, "height")
    return ClipSpec(
        colour=colour,
        shape=shape,
        direction=direction,
        background=background,
        frames=frames,
        height=height,
        width=width,
        start_x=start_x,
        start_y=start_y,
        object_size=object_size,
        speed=speed,
    )


class SyntheticMovingShapes(Dataset):
    """Deterministic, download-free captioned video dataset with mixed (frames, height, width) sizes.

    Sample ``i`` depends only on ``(seed, i)``: its RNG is seeded from a string (hashed with SHA-512
    by ``random.Random``, not the per-process ``hash()``), so results are identical across processes,
    workers and access orders.

    ``speed`` is in pixels per frame at ``fps``. With ``frame_rates``, samples cycle through those rates (every
    size with every rate) and the object keeps its speed in pixels per *second*: at rate ``r`` it moves
    ``speed * fps / r`` pixels per frame, which must be a whole number. The same caption then shows different motion
    per frame at different rates -- what the fps micro-condition (``framework/core/micro_conditions.py``) is for.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        sizes: Sequence[tuple[int, int, int]] = ((8, 16, 16), (8, 16, 24), (8, 24, 16), (4, 16, 16)),
        object_size: int = 5,
        speed: int = 1,
        seed: int = 0,
        fps: float = 8.0,
        frame_rates: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(object_size, int) or object_size < 1:
            raise ValueError(f"object_size must be a positive int, got {object_size!r}")
        if not isinstance(speed, int) or speed < 1:
            # Captions always name a direction, so a motionless object would make them false.
            raise ValueError(f"speed must be a positive int, got {speed!r}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        frame_rates = tuple(float(r) for r in frame_rates) if frame_rates else (float(fps),)
        pixel_steps = []  # pixels per frame at each rate
        for rate in frame_rates:
            step = speed * fps / rate if rate > 0 else 0.0
            if not rate > 0 or abs(step - round(step)) > 1e-9 or round(step) < 1:
                raise ValueError(f"frame_rates entry {rate!r}: the object would move speed * fps / rate = "
                                 f"{speed} * {fps} / {rate} pixels per frame; that must be a whole number >= 1")
            pixel_steps.append(int(round(step)))
        sizes = tuple(tuple(s) for s in sizes)
        if not sizes:
            raise ValueError("sizes must contain at least one (frames, height, width) triple")
        for size in sizes:
            if len(size) != 3 or not all(isinstance(v, int) and v >= 1 for v in size):
                raise ValueError(f"sizes entry {size!r} must be three positive ints (frames, height, width)")
            frames, height, width = size
            need = (frames - 1) * max(pixel_steps) + object_size
            # Direction is random per sample, so both axes must fit the full travel.
            if height < need or width < need:
                raise ValueError(
                    f"sizes entry {size!r} is too small: object_size={object_size} travelling "
                    f"{(frames - 1) * max(pixel_steps)} px needs height and width >= {need}"
                )
        self.num_samples = num_samples
        self.sizes: tuple[tuple[int, int, int], ...] = sizes  # type: ignore[assignment]
        self.object_size = object_size
        self.speed = speed
        self.seed = seed
        self.fps = float(fps)
        self.frame_rates, self.pixel_steps = frame_rates, tuple(pixel_steps)

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return i % self.num_samples

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """(frames, height, width) of sample ``i`` without rendering -- for size-bucketing samplers."""
        return self.sizes[self._index(i) % len(self.sizes)]

    def _rate_index(self, i: int) -> int:
        """Which of ``frame_rates`` sample ``i`` has: cycles so that every size meets every rate."""
        return (self._index(i) // len(self.sizes)) % len(self.frame_rates)

    def fps_of(self, i: int) -> float:
        """Frame rate of sample ``i``."""
        return self.frame_rates[self._rate_index(i)]

    def spec(self, i: int) -> ClipSpec:
        """The ClipSpec of sample ``i``; cheap, so benchmarks can get ground truth without pixels."""
        i = self._index(i)
        frames, height, width = self.sizes[i % len(self.sizes)]
        rng = random.Random(f"kinetoscope-synthetic:{self.seed}:{i}")
        return sample_spec(rng, frames, height, width, self.object_size, self.pixel_steps[self._rate_index(i)])

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        spec = self.spec(i)
        return {
            "video": render_clip(spec),  # [3, T, H, W] in [-1, 1]
            "caption": spec.caption,
            "id": f"synthetic-{self.seed}-{i}",
            "fps": self.fps_of(i),
            "original_size": (spec.height, spec.width),  # rendered at its size: no resize, no crop
            "spec": spec,
        }
