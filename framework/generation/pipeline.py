"""GenerationPipeline: prompts in, videos out, from the five plugins (and the frame-condition embedding).

The pipeline owns every step of generation; the modules it is given own the weights (``VideoDiffusion.pipeline()``
hands it the trained modules; ``kinetoscope predict``, the metric callbacks and any demo or server call it)::

    PromptRequest rows --prepare_task--> frame conditions / SDEdit starts (encoded by the compressor)
    captions --Conditioner--> Conditioning (+ micro-conditions) ; negative prompts / "" --> the unguided branch
    seeds --initial_noise--> latent noise [c, t, h, w] per prompt (CPU generator: the same video on any device)
    --Patcher.patchify--> packed tokens --Sampler.sample(guided model_fn, with given tokens)--> clean tokens
    --Patcher.unpatchify--> latents --Compressor.decode--> videos [3, T, H, W] in [-1, 1] --> GeneratedVideo

Extension points for models with their own conventions: ``initial_noise`` (or the ``noise`` argument of
``generate``) decides the starting latent; the sampler alone maps its schedule to the ``t`` it hands the
model function, so a sampler written for another timestep convention plugs in unchanged; ``decode`` goes through
the compressor's ``decode_list``.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framework.core.interfaces import Compressor, Conditioner, Denoiser, Patcher, Sampler
from framework.core.micro_conditions import MicroConditions, generation_fps
from framework.data.prompts import PromptRequest
from framework.generation.frame_conditioning import (
    FrameCondition,
    FrameConditionEmbedding,
    token_mask,
    ungiven_frames,
    with_given_tokens,
)
from framework.generation.guidance import guided_model_fn, unconditional_branch
from framework.generation.tasks import SDEdit, prepare_task
from framework.layers.packing import PackedSequence

log = logging.getLogger(__name__)


@dataclass
class GeneratedVideo:
    request: PromptRequest
    video: Tensor | None  # [3, T, H, W] in [-1, 1], on CPU; None when the prompt failed
    fps: float
    error: str | None = None  # why the prompt row could not be generated


@dataclass
class GivenTokens:
    """Frame conditions as tokens: which are given, their clean values and the projected given-frame channels."""

    given: Tensor  # [N] bool
    clean: Tensor  # [N, D]
    channels: Tensor | None  # [N, D], or None for a model without given-frame channels


@dataclass
class SDEditStart:
    """Where an SDEdit run starts: ``start`` noised to ``start_t`` (the sampler's own forward process)."""

    start_t: float
    start: PackedSequence


class GenerationPipeline:
    """Typed generation from plugins: ``generate`` for caption lists, ``predict`` for prompt rows.

    ``sampling_steps``, ``guidance_scale``, ``guidance_rescale`` and ``output_fps`` are the defaults a call may
    override; ``frame_embedding`` is the trained given-frame marker (None: plain replacement for given frames)."""

    def __init__(self, compressor: Compressor, patcher: Patcher, denoiser: Denoiser, conditioner: Conditioner,
                 sampler: Sampler, frame_embedding: FrameConditionEmbedding | None = None, sampling_steps: int = 30,
                 guidance_scale: float = 4.0, guidance_rescale: float = 0.0, output_fps: float = 8.0) -> None:
        if sampling_steps < 1:
            raise ValueError(f"GenerationPipeline: sampling_steps must be >= 1, got {sampling_steps}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"GenerationPipeline: guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.compressor, self.patcher, self.denoiser = compressor, patcher, denoiser
        self.conditioner, self.sampler, self.frame_embedding = conditioner, sampler, frame_embedding
        self.sampling_steps, self.guidance_scale = sampling_steps, guidance_scale
        self.guidance_rescale, self.output_fps = guidance_rescale, output_fps

    @property
    def modules(self) -> list[nn.Module]:
        parts = [self.compressor, self.patcher, self.denoiser, self.conditioner, self.sampler, self.frame_embedding]
        return [m for m in parts if m is not None]

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights are (generation runs there)."""
        param = next(self.denoiser.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @contextmanager
    def evaluating(self):
        """Every module in eval mode (no caption dropout or other training-only behaviour), restored after."""
        modes = [(m, m.training) for module in self.modules for m in module.modules()]
        for module in self.modules:
            module.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    # ------------------------------------------------------------------------------------------------ videos
    @torch.no_grad()
    def generate(
        self,
        captions: list[str],
        sizes: list[tuple[int, int, int]],
        seeds: list[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        negative_prompts: list[str] | None = None,
        frame_conditions: list[FrameCondition | None] | None = None,
        sdedits: list[SDEdit | None] | None = None,
        fps: list[float | None] | None = None,
        original_sizes: list[tuple[int, int] | None] | None = None,
        noise: list[Tensor] | None = None,
        decode: bool = True,
        sample_names: list[str] | None = None,
    ) -> list[Tensor]:
        """Sample one video per caption at its (frames, height, width) -> list of [3, T, H, W] in [-1, 1] (CPU).

        Guidance steers away from the empty caption, or from ``negative_prompts`` where given (an empty string
        there means the empty caption); ``guidance_rescale`` is Lin et al.'s (2023) rescale weight.
        ``frame_conditions`` gives clean latent frames per sample, kept exactly in the output latent;
        ``sdedits`` starts a sample from a noised latent (all in one call must share the strength). ``fps`` and
        ``original_sizes`` (height, width) are the micro-conditions a denoiser configured with them gets (None: the
        pipeline's ``output_fps``, or STILL_IMAGE_FPS for one frame, and the requested size). ``noise`` replaces
        the seeded initial latents [c, t, h, w] (see ``initial_noise``); ``decode=False`` returns the sampled
        latents [c, t, h, w] (on the pipeline's device) instead of decoding them. ``sample_names`` (e.g. the prompt
        rows, ``prompts.jsonl:3``) name the samples in warnings; default: their positions."""
        if not captions:
            raise ValueError("generate: the caption list is empty")
        if not len(captions) == len(sizes) == len(seeds):
            raise ValueError(f"generate: got {len(captions)} captions, {len(sizes)} sizes and {len(seeds)} seeds")
        steps = steps or self.sampling_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
        if negative_prompts is not None and len(negative_prompts) != len(captions):
            raise ValueError(f"generate: got {len(captions)} captions and {len(negative_prompts)} negative prompts")
        if negative_prompts is not None and not any(negative_prompts):
            negative_prompts = None  # all empty: the null condition itself
        noise_latents = self.initial_noise(captions, sizes, seeds) if noise is None else self._check_noise(noise, sizes)
        device = self.device
        micro = self.micro_conditions(sizes, fps, original_sizes)
        packed_noise = self.patcher.patchify([n.to(device) for n in noise_latents])
        names = sample_names or [f"sample {i}" for i in range(len(captions))]
        given = self.given_tokens(frame_conditions, noise_latents, names)
        start = self.sdedit_start(sdedits, noise_latents)
        with self.evaluating():
            if start is not None and start.start_t == 0.0:  # SDEdit at strength 0: the input itself
                clean = start.start
            else:
                cond = self.conditioner(captions)
                null = unconditional_branch(self.conditioner, len(captions), negative_prompts) if scale != 1.0 else None
                if self.denoiser.micro_conditions:  # the same frame rate and size on the guided and unguided branch
                    cond = cond.with_micro_conditions(micro)
                    null = null.with_micro_conditions(micro) if null is not None else None
                model_fn = guided_model_fn(self.denoiser, cond, null, scale, rescale)
                if given is not None:
                    marker = self.frame_embedding.marker if self.frame_embedding is not None else None
                    model_fn = with_given_tokens(model_fn, given.given, given.clean, marker, given.channels)
                start_kwargs = {} if start is None else {"start_t": start.start_t, "start": start.start}
                clean = self.sampler.sample(model_fn, packed_noise, steps, **start_kwargs)
            if given is not None:  # given frames come out exactly as given
                clean = clean.with_tokens(torch.where(given.given[:, None], given.clean, clean.tokens))
        latents = self.patcher.unpatchify(clean)
        if given is not None and given.channels is not None:
            # the model saw every given frame, also inside partly given tokens: keep them all
            for i, fc in enumerate(frame_conditions):
                if fc is not None:
                    keep = fc.frame_mask.to(device)[None, :, None, None]  # [1, t, 1, 1]
                    latents[i] = torch.where(keep, fc.latent.to(latents[i]), latents[i])
        return self.decode(latents) if decode else latents

    def decode(self, latents: list[Tensor]) -> list[Tensor]:
        """Latents [c, t, h, w] -> videos [3, T, H, W] in [-1, 1], float32 on CPU, through the compressor."""
        return [v.float().cpu() for v in self.compressor.decode_list(latents)]

    def initial_noise(self, captions: list[str], sizes: list[tuple[int, int, int]], seeds: list[int]) -> list[Tensor]:
        """Per prompt, Gaussian latent noise [c, t, h, w] from its own seed on a CPU generator (the same seed gives
        the same video on any device and in any batch); a size that does not fit is named with its caption."""
        noise = []
        for caption, (frames, height, width), seed in zip(captions, sizes, seeds):
            try:
                shape = self.compressor.latent_shape(frames, height, width)
                self.patcher.grid_size(shape)
            except ValueError as err:
                raise ValueError(f"cannot generate {frames}x{height}x{width} for {caption!r}: {err}") from None
            generator = torch.Generator().manual_seed(seed)
            noise.append(torch.randn(self.compressor.latent_channels, *shape, generator=generator))
        return noise

    def _check_noise(self, noise: list[Tensor], sizes: list[tuple[int, int, int]]) -> list[Tensor]:
        if len(noise) != len(sizes):
            raise ValueError(f"generate: got {len(noise)} noise latents for {len(sizes)} samples")
        for i, (n, (frames, height, width)) in enumerate(zip(noise, sizes)):
            expected = (self.compressor.latent_channels, *self.compressor.latent_shape(frames, height, width))
            if tuple(n.shape) != expected:
                raise ValueError(f"generate: sample {i}'s noise is {tuple(n.shape)}, its latent is {expected}")
        return noise

    # ------------------------------------------------------------------------------------------ conditioning
    def micro_conditions(
        self, sizes: list[tuple[int, int, int]], fps: list[float | None] | None,
        original_sizes: list[tuple[int, int] | None] | None,
    ) -> MicroConditions:
        """Micro-conditions for samples of ``sizes`` (frames, height, width), filling the defaults."""
        fps = [None] * len(sizes) if fps is None else fps
        original_sizes = [None] * len(sizes) if original_sizes is None else original_sizes
        if not len(fps) == len(original_sizes) == len(sizes):
            raise ValueError(f"generate: got {len(sizes)} sizes, {len(fps)} frame rates and {len(original_sizes)} "
                             "original sizes")
        rates = [generation_fps(frames, rate, self.output_fps) for (frames, _, _), rate in zip(sizes, fps)]
        originals = [(h, w) if original is None else original for (_, h, w), original in zip(sizes, original_sizes)]
        return MicroConditions.build(rates, originals, self.device)

    def given_tokens(self, frame_conditions: list[FrameCondition | None] | None,
                     noise_latents: list[Tensor], names: list[str]) -> GivenTokens | None:
        """The frame conditions as tokens, or None without any; ``names`` name the samples in warnings."""
        if frame_conditions is None or all(fc is None for fc in frame_conditions):
            return None
        if len(frame_conditions) != len(noise_latents):
            raise ValueError(f"generate: got {len(frame_conditions)} frame conditions for {len(noise_latents)} samples")
        latents, masks = [], []
        for i, (fc, noise) in enumerate(zip(frame_conditions, noise_latents)):
            if fc is not None and fc.latent.shape != noise.shape:
                raise ValueError(f"generate: sample {i}'s frame condition latent is {tuple(fc.latent.shape)}, "
                                 f"the video's latent is {tuple(noise.shape)}")
            latents.append(fc.latent if fc is not None else torch.zeros_like(noise))
            masks.append(fc.frame_mask if fc is not None else torch.zeros(noise.shape[1], dtype=torch.bool))
        device = self.device
        clean = self.patcher.patchify([latent.to(device, noise_latents[0].dtype) for latent in latents])
        shapes = [tuple(n.shape) for n in noise_latents]
        channels = (self.frame_embedding.given_channels(self.patcher, latents, masks, device)
                    if self.frame_embedding is not None else None)
        # A token is given only when all its latent frames are; without channels the others are generated anew.
        dropped = {} if channels is not None else {
            names[i]: n for i, n in enumerate(ungiven_frames(self.patcher, shapes, masks)) if n}
        if dropped:
            log.warning("generate: given latent frames that share a token with frames to generate are generated, not "
                        "kept (give whole tokens: a multiple of the patcher's frames); {prompt: frames}: %s", dropped)
        given = token_mask(self.patcher, shapes, masks).to(device)
        return GivenTokens(given, clean.tokens, channels)

    def sdedit_start(self, sdedits: list[SDEdit | None] | None, noise_latents: list[Tensor]) -> SDEditStart | None:
        """Where the sampler starts for the SDEdit inputs (None without any)."""
        if sdedits is None or all(s is None for s in sdedits):
            return None
        if any(s is None for s in sdedits) or len({s.strength for s in sdedits}) != 1 or len(sdedits) != len(noise_latents):
            raise ValueError("generate: SDEdit needs one edit per sample, all with the same strength")
        for i, (edit, noise) in enumerate(zip(sdedits, noise_latents)):
            if edit.latent.shape != noise.shape:
                raise ValueError(f"generate: sample {i}'s SDEdit latent is {tuple(edit.latent.shape)}, "
                                 f"the video's latent is {tuple(noise.shape)}")
        if "start_t" not in inspect.signature(self.sampler.sample).parameters:
            raise ValueError(f"SDEdit: sampler {type(self.sampler).__name__} cannot start from a partly noised input "
                             f"(its sample() takes no start_t); use RectifiedFlow or RectifiedFlowHeun")
        start = self.patcher.patchify([s.latent.to(self.device, noise_latents[0].dtype) for s in sdedits])
        return SDEditStart(float(sdedits[0].strength), start)

    # ------------------------------------------------------------------------------------------- prompt rows
    def predict(self, requests: list[PromptRequest]) -> list[GeneratedVideo]:
        """One video per prompt row, generated one row at a time; a row that fails (bad inputs: ``ValueError``) is
        logged and returned with its error, and the others still run."""
        results = []
        for r in requests:
            output_fps = self.output_fps if r.fps is None else r.fps  # the file plays at the asked rate
            try:
                if r.error is not None:
                    raise ValueError(r.error)
                inputs = prepare_task(r, self.compressor)
                (video,) = self.generate(
                    [r.caption], [(r.frames, r.height, r.width)], [r.seed],
                    guidance_scale=r.guidance, negative_prompts=[r.negative_prompt],
                    frame_conditions=[inputs.frame_condition], sdedits=[inputs.sdedit],
                    fps=[r.fps], original_sizes=[r.original_size], sample_names=[f"row {r.source or r.index}"],
                )
                results.append(GeneratedVideo(r, video, output_fps))
            except ValueError as err:
                log.error("prompt %s failed: %s", r.source or r.index, err)
                results.append(GeneratedVideo(r, None, output_fps, error=str(err)))
        return results
