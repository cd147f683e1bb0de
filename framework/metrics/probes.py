"""Capability probes: small synthetic suites with known answers for the "emergent" properties video models claim.

Each probe renders cases whose correct continuation is known exactly, scores any video against a case, and reports
the score of reference continuations next to the model's, so a number always comes with its scale:

* :class:`ObjectPermanenceProbe` -- an object moves at constant speed behind an occluding bar. A continuation
  passes when the bar stays in place and, in its last frames, the object has come out on the far side with the
  same colour and shape (square vs circle, from how much of its bounding box it fills). Ground truth scores 1; freezing the last context
  frame, letting the object vanish, or changing its colour behind the bar score 0.
* :class:`ConstantMotionProbe` -- an object moves at constant velocity over a long clip; the score is
  ``1 − min(1, |v_late − v_true| / |v_true|)`` with ``v_late`` the least-squares centroid velocity over the second
  half. Ground truth scores 1; a frozen frame scores 0.
* :class:`CameraPanProbe` -- a static textured scene under a constant-speed camera pan; the score is the warping
  error (:mod:`framework.metrics.temporal`, lower is better). Ground truth is ≈ 0; shuffled frames are far higher.

A model is any ``Callable[[list[ProbeCase]], list[Tensor]]`` returning one ``[3, T, H, W]`` video in [-1, 1] per case
(full length, context included). A video-continuation model uses ``case.context`` (the first frames); a text-to-video
model uses ``case.caption`` (see :func:`text_to_video`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.data.synthetic import BACKGROUND_COLOURS, OBJECT_COLOURS, shape_mask

__all__ = ["CameraPanProbe", "ConstantMotionProbe", "ObjectPermanenceProbe", "ProbeCase", "ProbeReport",
           "text_to_video"]

OCCLUDER_RGB = (128, 128, 128)
PIXEL_THRESHOLD = 80.0  # RGB distance (0..255) that separates object from background / occluder


@dataclass
class ProbeCase:
    """One known-answer case: ``target`` is the correct full video [3, T, H, W]; ``context`` its first frames."""

    name: str
    caption: str
    target: Tensor  # [3, T, H, W] in [-1, 1]
    context_frames: int
    colour: str = ""
    shape: str = ""
    velocity: tuple[float, float] = (0.0, 0.0)  # (dx, dy) px per frame

    @property
    def context(self) -> Tensor:
        return self.target[:, : self.context_frames]  # [3, C, H, W]


@dataclass
class ProbeReport:
    probe: str
    higher_is_better: bool
    model: float | None  # mean score of the model's videos (None when no model was given)
    baselines: dict[str, float]  # name -> mean score of a reference continuation


def _unit(rgb: tuple[int, int, int]) -> Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0  # [3]


def _paint(frame: Tensor, mask: Tensor, x: int, y: int, rgb: tuple[int, int, int]) -> None:
    """Draw ``mask`` [S, S] at top-left (x, y) of ``frame`` [3, H, W], clipped at the borders."""
    size = mask.shape[0]
    _, h, w = frame.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
    if x0 >= x1 or y0 >= y1:
        return
    sub = mask[y0 - y: y1 - y, x0 - x: x1 - x]  # [h', w']
    frame[:, y0:y1, x0:x1] = torch.where(sub[None], _unit(rgb)[:, None, None], frame[:, y0:y1, x0:x1])


def _pixels(video: Tensor) -> Tensor:
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"probe videos must be [3, T, H, W], got shape {list(video.shape)}")
    if torch.isnan(video).any():
        raise ValueError("probe video contains NaN values")
    return (video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # [3, T, H, W] in 0..255


def _foreground(pixels: Tensor, not_colours: list[tuple[int, int, int]]) -> Tensor:
    """[T, H, W] mask of pixels far (> PIXEL_THRESHOLD) from every colour in ``not_colours``."""
    masks = [torch.linalg.vector_norm(pixels - torch.tensor(c, dtype=torch.float32)[:, None, None, None], dim=0)
             > PIXEL_THRESHOLD for c in not_colours]
    return torch.stack(masks).all(dim=0)  # [T, H, W]


def _nearest_colour(mean_rgb: Tensor) -> str:
    names = list(OBJECT_COLOURS)
    table = torch.tensor([OBJECT_COLOURS[n] for n in names], dtype=torch.float32)  # [P, 3]
    return names[int(torch.linalg.vector_norm(table - mean_rgb[None], dim=1).argmin())]


def _shape_of(mask: Tensor) -> str:
    """'square' if the mask fills >= 90 % of its bounding box, else 'circle' (a 7-px disc fills ~76 %)."""
    ys, xs = mask.nonzero(as_tuple=True)
    box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
    return "square" if mask.sum() / box >= 0.9 else "circle"


def _centroids(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-frame centroid (x [T], y [T]) of ``mask`` [T, H, W] and which frames have any pixel ([T] bool)."""
    t, h, w = mask.shape
    area = mask.flatten(1).sum(1).float()  # [T]
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    cx = (mask.float() * xs).flatten(1).sum(1) / area.clamp(min=1)  # [T]
    cy = (mask.float() * ys[:, None]).flatten(1).sum(1) / area.clamp(min=1)  # [T]
    return cx, cy, area > 0


def _slope(t: Tensor, v: Tensor) -> float:
    tc = t - t.mean()
    return float((tc * (v - v.mean())).sum() / (tc * tc).sum())


class _Probe:
    name = ""
    higher_is_better = True

    def cases(self) -> list[ProbeCase]:
        raise NotImplementedError

    def score(self, case: ProbeCase, video: Tensor) -> float:
        raise NotImplementedError

    def baselines(self, case: ProbeCase) -> dict[str, Tensor]:
        raise NotImplementedError

    def run(self, model: Callable[[list[ProbeCase]], list[Tensor]] | None = None) -> ProbeReport:
        """Score the reference continuations (and ``model``'s videos, if given) over every case."""
        cases = self.cases()
        totals: dict[str, float] = {}
        for case in cases:
            for name, video in self.baselines(case).items():
                totals[name] = totals.get(name, 0.0) + self.score(case, video)
        model_score = None
        if model is not None:
            videos = model(cases)
            if len(videos) != len(cases):
                raise ValueError(f"{self.name}: the model returned {len(videos)} videos for {len(cases)} cases")
            model_score = sum(self.score(c, v) for c, v in zip(cases, videos)) / len(cases)
        return ProbeReport(self.name, self.higher_is_better, model_score,
                           {name: total / len(cases) for name, total in totals.items()})


def _freeze(case: ProbeCase) -> Tensor:
    """The trivial continuation: repeat the last context frame."""
    last = case.target[:, case.context_frames - 1: case.context_frames]  # [3, 1, H, W]
    return torch.cat([case.context, last.expand(-1, case.target.shape[1] - case.context_frames, -1, -1)], dim=1)


class ObjectPermanenceProbe(_Probe):
    """An object crosses behind a vertical occluding bar; does it come out the same? (see module docstring)."""

    name = "object_permanence"

    def __init__(self, frames: int = 20, height: int = 24, width: int = 48, object_size: int = 7, speed: int = 2,
                 occluder: tuple[int, int] = (18, 28), context_frames: int = 5, check_frames: int = 3) -> None:
        if occluder[1] - occluder[0] <= object_size:
            raise ValueError(f"the occluder {occluder} must be wider than the object ({object_size} px)")
        if 2 + (frames - 1) * speed + object_size > width:
            raise ValueError(f"{frames} frames at speed {speed} run off a {width}-px-wide frame")
        self.frames, self.height, self.width, self.size, self.speed = frames, height, width, object_size, speed
        self.occluder, self.context_frames, self.check_frames = occluder, context_frames, check_frames

    def render(self, colour: str, shape: str, background: str, after_colour: str | None = None,
               vanish: bool = False) -> Tensor:
        """The clip; ``after_colour`` repaints the object once it has been hidden, ``vanish`` removes it."""
        video = _unit(BACKGROUND_COLOURS[background])[:, None, None, None].repeat(1, self.frames, self.height,
                                                                                  self.width)  # [3, T, H, W]
        mask = shape_mask(shape, self.size)  # [S, S]
        y = (self.height - self.size) // 2
        hidden_from = None
        for t in range(self.frames):
            x = 2 + self.speed * t
            fully_hidden = self.occluder[0] <= x and x + self.size <= self.occluder[1]
            hidden_from = t if fully_hidden and hidden_from is None else hidden_from
            after = hidden_from is not None
            if not (vanish and after):
                _paint(video[:, t], mask, x, y, OBJECT_COLOURS[after_colour if after and after_colour else colour])
            video[:, t, :, self.occluder[0]: self.occluder[1]] = _unit(OCCLUDER_RGB)[:, None, None]
        return video

    def cases(self) -> list[ProbeCase]:
        cases = []
        for colour in OBJECT_COLOURS:
            for shape in ("square", "circle"):
                background = "black" if colour != "blue" else "white"
                cases.append(ProbeCase(
                    f"{colour}_{shape}", f"a {colour} {shape} moving right behind a gray bar on a {background} "
                    "background", self.render(colour, shape, background), self.context_frames, colour, shape,
                    (float(self.speed), 0.0)))
        return cases

    def baselines(self, case: ProbeCase) -> dict[str, Tensor]:
        background = case.caption.rsplit(" on a ", 1)[1].split()[0]
        other = next(c for c in OBJECT_COLOURS if c != case.colour)
        return {
            "ground_truth": case.target,
            "freeze_last_context_frame": _freeze(case),
            "object_vanishes": self.render(case.colour, case.shape, background, vanish=True),
            "colour_changes_behind_occluder": self.render(case.colour, case.shape, background, after_colour=other),
        }

    def score(self, case: ProbeCase, video: Tensor) -> float:
        """1 when the occluder stays in place (>= 80 % of its pixels occluder-gray in every frame) and, in the last
        ``check_frames`` frames, the object is out past it with the same colour and shape; else 0.

        Requiring the occluder keeps the probe about permanence: a model that never draws the bar (e.g. a text
        model ignoring "behind a gray bar") cannot pass by simply drawing the object on the right.
        """
        pixels = _pixels(video)  # [3, T, H, W]
        bar = pixels[:, :, :, self.occluder[0]: self.occluder[1]]  # [3, T, H, W_bar]
        bar_gray = ~_foreground(bar, [OCCLUDER_RGB])  # [T, H, W_bar]: within the threshold of the occluder colour
        if float(bar_gray.flatten(1).float().mean(1).min()) < 0.8:
            return 0.0
        tail = pixels[:, -self.check_frames:, :, self.occluder[1]:]  # [3, K, H, W'] right of the occluder
        background = [BACKGROUND_COLOURS[b] for b in BACKGROUND_COLOURS]
        mask = _foreground(tail, background + [OCCLUDER_RGB])  # [K, H, W']
        areas = mask.flatten(1).sum(1)  # [K]
        best = int(areas.argmax())
        full_area = int(shape_mask(case.shape, self.size).sum())
        if int(areas[best]) < full_area // 2:
            return 0.0
        mean_rgb = tail[:, best][:, mask[best]].mean(dim=1)  # [3]
        return float(_nearest_colour(mean_rgb) == case.colour and _shape_of(mask[best]) == case.shape)


class ConstantMotionProbe(_Probe):
    """Does an object keep its velocity over a long clip? (see module docstring)."""

    name = "constant_motion"

    def __init__(self, frames: int = 32, height: int = 24, width: int = 48, object_size: int = 5,
                 context_frames: int = 8) -> None:
        self.frames, self.height, self.width, self.size = frames, height, width, object_size
        self.context_frames = context_frames
        # (dx, dy) chosen so the travel fits: 1 px/frame horizontally, 0.5 px/frame diagonally (every other frame).
        self.velocities = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down_right": (1.0, 0.5)}
        if (frames - 1) + object_size + 2 > width:
            raise ValueError(f"{frames} frames at 1 px/frame run off a {width}-px-wide frame")

    def render(self, colour: str, velocity: tuple[float, float]) -> Tensor:
        video = _unit(BACKGROUND_COLOURS["black"])[:, None, None, None].repeat(1, self.frames, self.height,
                                                                               self.width)  # [3, T, H, W]
        mask = shape_mask("square", self.size)
        x0 = 1 if velocity[0] >= 0 else self.width - self.size - 1
        y0 = 2
        for t in range(self.frames):
            _paint(video[:, t], mask, round(x0 + velocity[0] * t), int(y0 + velocity[1] * t), OBJECT_COLOURS[colour])
        return video

    def cases(self) -> list[ProbeCase]:
        return [ProbeCase(f"{colour}_{name}", f"a {colour} square moving {name.replace('_', ' ')} at constant "
                          "speed on a black background", self.render(colour, velocity), self.context_frames, colour,
                          "square", velocity)
                for name, velocity in self.velocities.items() for colour in ("red", "green", "yellow")]

    def baselines(self, case: ProbeCase) -> dict[str, Tensor]:
        return {"ground_truth": case.target, "freeze_last_context_frame": _freeze(case),
                "stops_half_way": torch.cat([case.target[:, : self.frames // 2],
                                             case.target[:, self.frames // 2 - 1: self.frames // 2]
                                             .expand(-1, self.frames - self.frames // 2, -1, -1)], dim=1)}

    def score(self, case: ProbeCase, video: Tensor) -> float:
        pixels = _pixels(video)[:, video.shape[1] // 2:]  # [3, T/2, H, W]: the second half
        mask = _foreground(pixels, [BACKGROUND_COLOURS["black"]])  # [T/2, H, W]
        cx, cy, visible = _centroids(mask)
        if int(visible.sum()) < 2:
            return 0.0
        t = torch.arange(mask.shape[0], dtype=torch.float32)[visible]
        vx, vy = _slope(t, cx[visible]), _slope(t, cy[visible])
        true = torch.tensor(case.velocity)
        error = float(torch.linalg.vector_norm(torch.tensor([vx, vy]) - true) / torch.linalg.vector_norm(true))
        return max(0.0, 1.0 - min(1.0, error))


class CameraPanProbe(_Probe):
    """A static textured scene seen by a camera panning at constant speed; score = warping error (lower is better)."""

    name = "camera_pan"
    higher_is_better = False

    def __init__(self, frames: int = 12, size: int = 48, speed: int = 2, context_frames: int = 4,
                 num_cases: int = 3) -> None:
        self.frames, self.size, self.speed = frames, size, speed
        self.context_frames, self.num_cases = context_frames, num_cases

    def render(self, seed: int) -> Tensor:
        wide = self.size + self.speed * self.frames
        coarse = torch.rand(1, 3, self.size // 6, wide // 6, generator=torch.Generator().manual_seed(seed))
        scene = F.interpolate(coarse, size=(self.size, wide), mode="bicubic", align_corners=False)[0]
        scene = scene.clamp(0, 1) * 2 - 1  # [3, H, W_scene]
        return torch.stack([scene[:, :, self.speed * t: self.speed * t + self.size] for t in range(self.frames)],
                           dim=1)  # [3, T, H, W]

    def cases(self) -> list[ProbeCase]:
        return [ProbeCase(f"scene_{i}", "a camera pans right across a static scene", self.render(i),
                          self.context_frames, velocity=(float(-self.speed), 0.0)) for i in range(self.num_cases)]

    def baselines(self, case: ProbeCase) -> dict[str, Tensor]:
        order = torch.randperm(self.frames, generator=torch.Generator().manual_seed(0))
        return {"ground_truth": case.target, "shuffled_frames": case.target[:, order]}

    def score(self, case: ProbeCase, video: Tensor) -> float:
        from framework.metrics.temporal import flow_scores

        return flow_scores(video)["warping_error"]


def text_to_video(pl_module, steps: int | None = None, seed: int = 0) -> Callable[[list[ProbeCase]], list[Tensor]]:
    """Adapt a text-to-video ``VideoDiffusion`` (its ``generate``) to the probe model signature: one video per case
    from its caption, at the case's size, with seeds ``seed, seed+1, ...``."""

    def model(cases: list[ProbeCase]) -> list[Tensor]:
        sizes = [tuple(c.target.shape[1:]) for c in cases]
        return pl_module.generate([c.caption for c in cases], sizes, [seed + i for i in range(len(cases))], steps)

    return model
