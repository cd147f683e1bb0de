"""Frame conditioning: clean latent frames given to the denoiser, for image-to-video, extension and interpolation.

A ``FrameCondition`` holds, per sample, a clean latent and a per-latent-frame mask (True = given). The denoiser
sees the clean tokens of given frames in place of the noisy ones ("replacement" conditioning, as in Ho et al.,
"Video Diffusion Models", 2022, Sec. 3.1, and the masked frames of Open-Sora 1.2 / Movie Gen's I2V), marked by a
learned per-token embedding added to those tokens so the model can tell given content from content to denoise
(the per-sample timestep stays the noise level of the rest). Given tokens are left out of the training loss, and
during sampling they are put back after every step and at the end, so given frames come out exactly as given
(in latent space; in pixel space as far as the compressor reconstructs them).

Training draws a mask per sample from ``FrameMaskStrategy`` with ``FrameMaskProbabilities``: no frames (plain
text-to-video, which keeps the model usable without context), the first frame (image-to-video), the first or last
k (extension forwards / backwards), first and last (interpolation) or a random contiguous span. Masks never cover
every latent frame, so each sample keeps something to learn.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framework.core.interfaces import ModelFn, Patcher
from framework.layers.packing import PackedSequence


class FrameMaskStrategy(str, enum.Enum):
    """Which latent frames a training sample is given clean."""

    NONE = "none"  # text-to-video
    FIRST_FRAME = "first_frame"  # image-to-video
    FIRST_K = "first_k"  # extend forward
    LAST_K = "last_k"  # extend backward
    FIRST_AND_LAST = "first_and_last"  # interpolate / connect (k frames at each end)
    RANDOM_SPAN = "random_span"  # a contiguous span anywhere


@dataclass
class FrameMaskProbabilities:
    """Relative weights of the training mask strategies (normalised; they need not sum to 1). ``max_k`` caps the
    number of given latent frames per end for FIRST_K / LAST_K / FIRST_AND_LAST and the span length.

    ``channels`` also gives the frames as extra input channels: every token gets the given latent values and the
    per-frame mask of the frames it covers (zeros elsewhere) through a learned projection added to its input, as in
    the channel-concatenated conditioning of Stable Video Diffusion (Blattmann et al., 2023) and Open-Sora. Unlike
    token replacement this works inside tokens that cover both given and generated frames (e.g. 8-frame tubes)."""

    none: float = 0.4
    first_frame: float = 0.2
    first_k: float = 0.1
    last_k: float = 0.1
    first_and_last: float = 0.1
    random_span: float = 0.1
    max_k: int = 2
    channels: bool = False

    def __post_init__(self) -> None:
        weights = self.weights()
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"FrameMaskProbabilities: weights must be >= 0 with a positive sum, got {weights.tolist()}")
        if self.max_k < 1:
            raise ValueError(f"FrameMaskProbabilities: max_k must be >= 1, got {self.max_k}")

    def weights(self) -> Tensor:
        """[len(FrameMaskStrategy)] in the enum's order."""
        return torch.tensor([float(getattr(self, s.name.lower())) for s in FrameMaskStrategy])


def strategy_mask(strategy: FrameMaskStrategy, frames: int, max_k: int, generator: torch.Generator | None = None) -> Tensor:
    """A frame mask [frames] bool for one strategy; never covers every frame (a 1-frame latent gets none)."""
    mask = torch.zeros(frames, dtype=torch.bool)
    if frames < 2 or strategy is FrameMaskStrategy.NONE:
        return mask
    randint = lambda high: int(torch.randint(1, high + 1, (1,), generator=generator))  # noqa: E731, uniform 1..high
    if strategy is FrameMaskStrategy.FIRST_FRAME:
        mask[0] = True
    elif strategy is FrameMaskStrategy.FIRST_K:
        mask[: randint(min(max_k, frames - 1))] = True
    elif strategy is FrameMaskStrategy.LAST_K:
        mask[frames - randint(min(max_k, frames - 1)):] = True
    elif strategy is FrameMaskStrategy.FIRST_AND_LAST:
        k = randint(max(1, min(max_k, (frames - 1) // 2)))
        mask[:k] = True
        mask[frames - k:] = True
        if mask.all():  # 2 frames: keep one free
            mask[-1] = False
    else:  # RANDOM_SPAN
        length = randint(min(max_k, frames - 1))
        start = int(torch.randint(0, frames - length + 1, (1,), generator=generator))
        mask[start: start + length] = True
    return mask


def sample_training_masks(
    probabilities: FrameMaskProbabilities, latent_frames: list[int], generator: torch.Generator | None = None
) -> list[Tensor]:
    """One frame mask [t_i] bool per sample, each with a strategy drawn from ``probabilities``."""
    weights = probabilities.weights()
    strategies = list(FrameMaskStrategy)
    picks = torch.multinomial(weights / weights.sum(), len(latent_frames), replacement=True, generator=generator)
    return [strategy_mask(strategies[int(p)], t, probabilities.max_k, generator) for p, t in zip(picks, latent_frames)]


@dataclass
class FrameCondition:
    """Clean latent frames given for one sample: ``latent`` [c, t, h, w] (values where ``frame_mask`` is False are
    ignored) and ``frame_mask`` [t] bool, True for given latent frames."""

    latent: Tensor
    frame_mask: Tensor

    def __post_init__(self) -> None:
        if self.frame_mask.dim() != 1 or self.frame_mask.shape[0] != self.latent.shape[1]:
            raise ValueError(
                f"FrameCondition: frame_mask {tuple(self.frame_mask.shape)} must be [t] for a latent "
                f"{tuple(self.latent.shape)} [c, t, h, w]"
            )


def token_mask(patcher: Patcher, latent_shapes: list[tuple[int, ...]], frame_masks: list[Tensor]) -> Tensor:
    """Per-token mask [N] bool, True where every latent frame a token covers is given, laid out as ``patcher``
    packs latents of ``latent_shapes`` ([c, t, h, w] each): the frame masks are patchified like the latents."""
    grids = []
    for shape, mask in zip(latent_shapes, frame_masks):
        _, t, h, w = shape
        grids.append(mask.float().to(torch.float32)[None, :, None, None].expand(1, t, h, w))  # [1, t, h, w]
    packed = patcher.patchify(grids)  # tokens [N, pt * ph * pw]
    return packed.tokens.min(dim=1).values > 0.5  # [N]


def ungiven_frames(patcher: Patcher, latent_shapes: list[tuple[int, ...]], frame_masks: list[Tensor]) -> list[int]:
    """Per sample, how many given latent frames are *not* kept because they share a token with a frame to generate
    (``token_mask`` gives whole tokens only): e.g. 3 given frames with 4-frame tokens -> 3, with 2-frame tokens -> 1."""
    given = token_mask(patcher, latent_shapes, frame_masks)  # [N]
    grids = [torch.zeros(1, *shape[1:]) for shape in latent_shapes]  # [1, t, h, w] each
    packed = patcher.patchify(grids)
    covered = patcher.unpatchify(packed.with_tokens(given[:, None].float().expand_as(packed.tokens)))
    # A frame is kept when every spatial token over it is given (token_mask is the same across space).
    return [int((mask & ~(grid[0].amin(dim=(1, 2)) > 0.5)).sum()) for mask, grid in zip(frame_masks, covered)]


def channel_inputs(latents: list[Tensor], frame_masks: list[Tensor]) -> list[Tensor]:
    """The extra input channels of ``FrameMaskProbabilities.channels``: per sample the latent [c, t, h, w] zeroed on
    frames not given, and the frame mask as one more channel -> [c + 1, t, h, w]."""
    inputs = []
    for latent, mask in zip(latents, frame_masks):
        given = mask.to(latent.device, latent.dtype)[None, :, None, None].expand(1, *latent.shape[1:])  # [1, t, h, w]
        inputs.append(torch.cat([latent * given, given], dim=0))  # [c + 1, t, h, w]
    return inputs


class FrameConditionEmbedding(nn.Module):
    """A learned vector added to the tokens of given (clean) frames, so the denoiser tells them from noisy ones."""

    def __init__(self, token_dim: int, channel_dim: int | None = None) -> None:
        super().__init__()
        # Unit scale like the data: a clear marker from step 0 (the denoiser's input projection is linear, so
        # this is a per-token embedding in its width).
        self.marker = nn.Parameter(torch.randn(token_dim))  # [D]
        # Given frames as extra channels (FrameMaskProbabilities.channels): concatenating channels before the
        # denoiser's linear input projection equals adding a linear projection of them, so no denoiser changes.
        # Zero-initialised: training starts from the plain model.
        self.channels = nn.Linear(channel_dim, token_dim) if channel_dim is not None else None
        if self.channels is not None:
            nn.init.zeros_(self.channels.weight)
            nn.init.zeros_(self.channels.bias)

    def given_channels(self, patcher: Patcher, latents: list[Tensor], frame_masks: list[Tensor],
                       device: torch.device) -> Tensor | None:
        """The projected given-frame channels [N, D] for latents [c, t, h, w] and their frame masks [t], or None for
        a model without ``FrameMaskProbabilities.channels``."""
        if self.channels is None:
            return None
        inputs = patcher.patchify([x.to(device) for x in channel_inputs(latents, frame_masks)])
        return self.channels(inputs.tokens)  # [N, D]


def with_given_tokens(model_fn: ModelFn, given: Tensor, clean: Tensor, marker: Tensor | None,
                      channels: Tensor | None = None) -> ModelFn:
    """Feed ``model_fn`` the ``clean`` tokens [N, D] (plus ``marker`` [D]) where ``given`` [N] is True, and add
    ``channels`` [N, D] (the projected given-frame channels) to every token when set."""
    marked = clean if marker is None else clean + marker.to(clean.dtype)  # [N, D]

    def fn(x: PackedSequence, t: Tensor) -> PackedSequence:
        tokens = x.tokens if channels is None else x.tokens + channels  # [N, D]
        return model_fn(x.with_tokens(torch.where(given[:, None], marked, tokens)), t)

    return fn
