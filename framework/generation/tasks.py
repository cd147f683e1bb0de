"""Turns a prompt's task (image-to-video, extension, interpolation, SDEdit) into what ``generate`` consumes.

Given pixels are read with ``framework.data.video_io.read_video`` (stills too), resized to the requested size if they
differ, encoded with the model's compressor and placed at latent frames:

============== ============================================= ==============================================
task           given pixels                                  latent frames they fill
============== ============================================= ==============================================
image_to_video ``image``                                     the first
extend_forward the last ``context_frames`` of ``video``      the first ones (the output continues the video)
extend_backward the first ``context_frames`` of ``video``    the last ones (the output leads into the video)
interpolate    the last ``context_frames`` of ``video`` and  the first ones and the last ones
               the first ``context_frames`` of ``video_end``
sdedit         the first ``frames`` of ``video``             all, noised to ``strength`` (not kept fixed)
============== ============================================= ==============================================

Each context is encoded on its own, so with a causal VAE the frames of a context placed at the end are encoded
as if they started a clip; they are reproduced within the VAE's error, not exactly (exactly with ``PixelCompressor``).
Problems with a row's inputs raise ``ValueError`` naming the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.data.prompts import GenerationTask, PromptRequest
from framework.generation.frame_conditioning import FrameCondition
from framework.core.interfaces import Compressor
from framework.data.video_io import VideoDecodeError, read_video


@dataclass
class SDEdit:
    """Start sampling from ``latent`` [c, t, h, w] noised to ``strength`` in [0, 1] (Meng et al., "SDEdit", 2022):
    0 returns the input, 1 ignores it (pure noise)."""

    latent: Tensor
    strength: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"SDEdit: strength must be in [0, 1], got {self.strength}")


@dataclass
class TaskInputs:
    frame_condition: FrameCondition | None = None
    sdedit: SDEdit | None = None


def _where(request: PromptRequest, field: str) -> str:
    return f"prompt row {request.source or request.index}, field {field!r}"


def _read(request: PromptRequest, field: str) -> Tensor:
    """The video (or still) in ``request.<field>`` as [3, T, height, width] in [-1, 1]."""
    path = getattr(request, field)
    try:
        video, _ = read_video(path)  # [3, T, H, W]
    except (VideoDecodeError, OSError) as err:
        raise ValueError(f"{_where(request, field)}: cannot read {path}: {err}") from None
    if video.shape[-2:] != (request.height, request.width):
        frames = video.permute(1, 0, 2, 3)  # [T, 3, H, W]
        frames = F.interpolate(frames, size=(request.height, request.width), mode="bilinear", antialias=True,
                               align_corners=False)
        video = frames.permute(1, 0, 2, 3).clamp(-1, 1)  # [3, T, height, width]
    return video


def _frames(request: PromptRequest, field: str, video: Tensor, count: int, from_end: bool) -> Tensor:
    available = video.shape[1]
    if available < count:
        raise ValueError(
            f"{_where(request, field)}: {getattr(request, field)} has {available} frames, fewer than the "
            f"{count} requested as context"
        )
    return video[:, available - count:] if from_end else video[:, :count]


def _encode(compressor: Compressor, request: PromptRequest, field: str, pixels: Tensor) -> Tensor:
    try:
        compressor.latent_shape(pixels.shape[1], request.height, request.width)
    except ValueError as err:
        raise ValueError(f"{_where(request, field)}: the context does not fit the compressor: {err}") from None
    param = next(compressor.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        return compressor.encode(pixels[None].to(device))[0]  # [c, t_c, h, w]


def prepare_task(request: PromptRequest, compressor: Compressor) -> TaskInputs:
    """The frame condition or SDEdit start for ``request`` (nothing for text-to-video)."""
    task = request.task
    if task is GenerationTask.TEXT_TO_VIDEO:
        return TaskInputs()
    t, h, w = compressor.latent_shape(request.frames, request.height, request.width)
    if task is GenerationTask.SDEDIT:
        pixels = _frames(request, "video", _read(request, "video"), request.frames, from_end=False)
        return TaskInputs(sdedit=SDEdit(_encode(compressor, request, "video", pixels), request.strength))

    n = request.context_frames
    if task is GenerationTask.IMAGE_TO_VIDEO:
        pieces = [("image", _read(request, "image")[:, :1], False)]  # (field, pixels, at the end)
    elif task is GenerationTask.EXTEND_FORWARD:
        pieces = [("video", _frames(request, "video", _read(request, "video"), n, from_end=True), False)]
    elif task is GenerationTask.EXTEND_BACKWARD:
        pieces = [("video", _frames(request, "video", _read(request, "video"), n, from_end=False), True)]
    else:  # INTERPOLATE
        pieces = [("video", _frames(request, "video", _read(request, "video"), n, from_end=True), False),
                  ("video_end", _frames(request, "video_end", _read(request, "video_end"), n, from_end=False), True)]
    latent = torch.zeros(compressor.latent_channels, t, h, w)  # [c, t, h, w]
    mask = torch.zeros(t, dtype=torch.bool)  # [t]
    for field, pixels, at_end in pieces:
        context = _encode(compressor, request, field, pixels).cpu()  # [c, t_c, h, w]
        t_c = context.shape[1]
        too_long = 2 * t_c > t if len(pieces) == 2 else t_c >= t
        if too_long:
            raise ValueError(
                f"{_where(request, 'context_frames')}: {pixels.shape[1]} context frames ({t_c} latent) leave nothing "
                f"to generate in {request.frames} frames ({t} latent)"
            )
        span = slice(t - t_c, t) if at_end else slice(0, t_c)
        latent[:, span] = context
        mask[span] = True
    return TaskInputs(frame_condition=FrameCondition(latent, mask))
