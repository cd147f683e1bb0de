"""VideoDiffusion: trains a denoiser on compressed, patchified videos and generates new ones.

The module only wires the five plugins together; each owns its part of the recipe::

    videos -> Compressor.encode -> Patcher.patchify -> Sampler.training_loss(Denoiser(., t, Conditioner(captions)))

Generation reverses it: noise with the requested size -> Sampler.sample (with classifier-free guidance) ->
Patcher.unpatchify -> Compressor.decode.

With ``frame_conditioning`` set, training gives each sample clean latent frames drawn by a mask strategy
(``framework.generation.frame_conditioning``), and generation takes given frames (image-to-video, extension, interpolation)
or a video to edit (SDEdit); prompt rows choose the task (``framework.generation.tasks``).

A denoiser with ``micro_conditions`` gets each sample's frame rate and original size attached to its Conditioning:
from the batch's ``"fps"`` and ``"original_sizes"`` in training, from the prompt (default: ``output_fps`` and the
requested size) in generation, the same on both guidance branches (``framework.core.micro_conditions``).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from framework.training.compilation import CompileMode, compile_in_place
from framework.training.finetune import FineTuning, complete_checkpoint, prune_checkpoint
from framework.data.prompts import PromptRequest
from framework.generation.frame_conditioning import (
    FrameCondition,
    FrameMaskProbabilities,
    channel_inputs,
    sample_training_masks,
    token_mask,
    ungiven_frames,
)
from framework.generation.tasks import SDEdit, prepare_task
from framework.generation.guidance import guided_model_fn, unconditional_branch
from framework.core.interfaces import Compressor, Conditioner, Denoiser, DenoiserIO, ModelFn, Patcher, Sampler
from framework.core.micro_conditions import MicroConditions, generation_fps
from framework.layers.packing import PackedSequence

log = logging.getLogger(__name__)

PLUGIN_ARGUMENTS = ("compressor", "patcher", "denoiser", "conditioner", "sampler")


@dataclass
class GeneratedVideo:
    request: PromptRequest
    video: Tensor | None  # [3, T, H, W] in [-1, 1], on CPU; None when the prompt failed
    fps: float
    error: str | None = None  # why the prompt row could not be generated


class PromptRowsFailed(RuntimeError):
    """Some prompt rows could not be generated; the others were, and their outputs are kept."""


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


def with_given_tokens(model_fn: ModelFn, given: Tensor, clean: Tensor, marker: Tensor | None,
                      channels: Tensor | None = None) -> ModelFn:
    """Feed ``model_fn`` the ``clean`` tokens [N, D] (plus ``marker`` [D]) where ``given`` [N] is True, and add
    ``channels`` [N, D] (the projected given-frame channels) to every token when set."""
    marked = clean if marker is None else clean + marker.to(clean.dtype)  # [N, D]

    def fn(x: PackedSequence, t: Tensor) -> PackedSequence:
        tokens = x.tokens if channels is None else x.tokens + channels  # [N, D]
        return model_fn(x.with_tokens(torch.where(given[:, None], marked, tokens)), t)

    return fn


class VideoDiffusion(L.LightningModule):
    """Text-to-video diffusion training and generation from five plugins (the compressor stays frozen)."""

    def __init__(
        self,
        compressor: Compressor,
        patcher: Patcher,
        denoiser: Denoiser,
        conditioner: Conditioner,
        sampler: Sampler,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        cosine_decay: bool = True,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.0,
        sampling_steps: int = 30,
        guidance_scale: float = 4.0,
        guidance_rescale: float = 0.0,
        output_fps: float = 8.0,
        frame_conditioning: FrameMaskProbabilities | None = None,
        compile_denoiser: bool = False,
        compile_mode: CompileMode = "default",
        fused_optimizer: bool = False,
        finetuning: FineTuning | None = None,
    ) -> None:
        """``cosine_decay`` anneals the learning rate to ``min_lr_ratio`` of its peak by the end of training
        (``trainer.max_steps``); ``ema_decay`` > 0 keeps an exponential moving average of the denoiser and
        conditioner weights, which ``generate`` uses: averaged weights give cleaner samples than the last step's.
        ``frame_conditioning`` trains with given clean frames drawn by these mask strategies (docs/conditioning.md).
        ``compile_denoiser`` runs the denoiser (and its EMA copy) through ``torch.compile`` with ``compile_mode`` for
        training and sampling, compiled once for any packed layout (``framework.training.compilation``);
        ``fused_optimizer`` uses AdamW's fused kernel (``fused=True``: one kernel for all parameters, CPU and GPU).
        ``finetuning`` trains a pretrained model: LoRA adapters or a full fine-tune with parts frozen; checkpoints
        then hold only the trained weights (``framework.training.finetune``, docs/pretrained.md)."""
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"VideoDiffusion: learning_rate must be > 0, got {learning_rate}")
        if warmup_steps < 0:
            raise ValueError(f"VideoDiffusion: warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"VideoDiffusion: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"VideoDiffusion: ema_decay must be in [0, 1), got {ema_decay}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"VideoDiffusion: guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if sampling_steps < 1:
            raise ValueError(f"VideoDiffusion: sampling_steps must be >= 1, got {sampling_steps}")
        # Under LightningCLI the hyperparameters are the plugins' class_path/init_args config, which
        # ``load_from_checkpoint`` re-instantiates; built directly in Python, the plugin objects themselves are left
        # out, because pickling modules into a checkpoint would make loading execute code.
        built_by_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=None if built_by_cli else [*PLUGIN_ARGUMENTS, "finetuning"])
        self.compressor, self.patcher, self.denoiser = compressor, patcher, denoiser
        self.conditioner, self.sampler = conditioner, sampler
        self.compressor.requires_grad_(False)
        token_dim = patcher.token_dim(compressor.latent_channels)
        denoiser.bind(DenoiserIO(token_dim=token_dim, context_dim=conditioner.context_dim,
                                 pooled_dim=conditioner.pooled_dim))
        self.frame_conditioning = frame_conditioning
        self.frame_embedding = None
        if frame_conditioning is not None:
            channel_dim = patcher.token_dim(compressor.latent_channels + 1) if frame_conditioning.channels else None
            self.frame_embedding = FrameConditionEmbedding(token_dim, channel_dim)
        self._prediction_errors: list[str] = []
        self.finetuning = finetuning
        if finetuning is not None:  # before the EMA copy, so it copies the adapted model
            finetuning.apply(self.trained_modules())
        self.ema = (
            AveragedModel(self.trained_modules(), multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            .requires_grad_(False)
            if ema_decay > 0 else None
        )
        if compile_denoiser:
            compile_in_place(self.denoiser, compile_mode)
            if self.ema is not None:
                compile_in_place(self.ema.module["denoiser"], compile_mode)

    def configure_model(self) -> None:
        """Shard for Lightning's ``ModelParallelStrategy`` (FSDP2: ``torch.distributed.fsdp.fully_shard`` over its
        ``data_parallel`` mesh dimension; a no-op under other strategies). Every block of every ``nn.ModuleList`` in
        the denoiser is one shard unit (its weights are gathered just for its own forward and backward), then the
        denoiser's and the conditioner's remaining weights; the frozen compressor stays whole on every rank."""
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.denoiser, FSDPModule):
            return  # already sharded (Lightning may call this hook again)
        uncovered = [name for name, module in (("frame_embedding", self.frame_embedding), ("patcher", self.patcher),
                                               ("sampler", self.sampler), ("ema", self.ema))
                     if module is not None and any(True for _ in module.parameters())]
        if uncovered:
            raise ValueError(f"VideoDiffusion: sharding (ModelParallelStrategy) covers the denoiser and conditioner; "
                             f"{', '.join(uncovered)} also hold weights (use strategy: ddp, or ema through "
                             f"EMACallback)")
        mesh = self.device_mesh["data_parallel"]
        for blocks in (m for m in self.denoiser.modules() if isinstance(m, nn.ModuleList)):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(self.denoiser, mesh=mesh)
        if any(p.requires_grad for p in self.conditioner.parameters()):
            fully_shard(self.conditioner, mesh=mesh)

    # ------------------------------------------------------------------------------------------------ training
    def encode_latents(self, videos: list[Tensor]) -> list[Tensor]:
        """Pixels [3, T, H, W] -> latents [c, t, h, w] with the frozen compressor."""
        with torch.no_grad():
            return self.compressor.encode_list(videos)

    def encode(self, videos: list[Tensor]) -> PackedSequence:
        return self.patcher.patchify(self.encode_latents(videos))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # A latent cache (``kinetoscope cache-latents``) serves pre-encoded latents; otherwise encode the pixels here.
        latents = list(batch["latents"]) if "latents" in batch else self.encode_latents(batch["videos"])  # [c, t, h, w]
        clean = self.patcher.patchify(latents)
        cond = self.conditioner(batch["captions"])
        if self.denoiser.micro_conditions:  # the clips' frame rates and original sizes
            cond = cond.with_micro_conditions(MicroConditions.from_batch(batch, self.device))
        model_fn: ModelFn = lambda x, t: self.denoiser(x, t, cond)  # noqa: E731
        extra = {}
        if self.frame_conditioning is not None:
            masks = sample_training_masks(self.frame_conditioning, [latent.shape[1] for latent in latents])
            given = token_mask(self.patcher, [tuple(latent.shape) for latent in latents], masks).to(self.device)
            # Given tokens enter clean and marked, and leave the loss. Also when none is given, so the marker is in
            # every step's graph (DDP requires each parameter to take part in every step).
            channels = self.given_channels(self.frame_embedding, latents, masks)
            model_fn = with_given_tokens(model_fn, given, clean.tokens, self.frame_embedding.marker, channels)
            extra["loss_mask"] = ~given
        per_sample = self.sampler.training_loss(model_fn, clean, **extra)  # [B]
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: Lightning runs the module's batch-end hook after the callbacks',
        # i.e. after ModelCheckpoint has saved, so a checkpoint would miss its own step's EMA update.
        self.update_ema()

    def update_ema(self) -> None:
        """Fold the current weights into the exponential moving average (no-op without ``ema_decay``)."""
        if self.ema is not None:
            self.ema.update_parameters(self.trained_modules())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.finetuning is not None:  # the frozen base is rebuilt from its source on load
            prune_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.finetuning is not None:
            complete_checkpoint(self, checkpoint)

    def on_train_end(self) -> None:
        """A fine-tune leaves its adapters where other tools read them: ``<default_root_dir>/lora/`` (LoRA)."""
        if self.finetuning is not None and self.trainer.is_global_zero:
            written = self.finetuning.export(self.sampling_modules()[0], Path(self.trainer.default_root_dir) / "lora")
            if written is not None:
                log.info("fine-tuned adapters written to %s", written)

    def trained_modules(self) -> nn.ModuleDict:
        """The modules the optimizer trains and EMA averages (the compressor is frozen, the rest hold no weights)."""
        modules = {"denoiser": self.denoiser, "conditioner": self.conditioner}
        if self.frame_embedding is not None:
            modules["frame_embedding"] = self.frame_embedding
        return nn.ModuleDict(modules)

    def sampling_modules(self) -> tuple[Denoiser, Conditioner]:
        """The EMA copies when EMA is on, else the trained modules."""
        if self.ema is not None:
            return self.ema.module["denoiser"], self.ema.module["conditioner"]
        return self.denoiser, self.conditioner

    def given_channels(self, embedding: FrameConditionEmbedding | None, latents: list[Tensor],
                       frame_masks: list[Tensor]) -> Tensor | None:
        """The projected given-frame channels [N, D] for latents [c, t, h, w] and their frame masks [t], or None for
        a model without ``FrameMaskProbabilities.channels``."""
        if embedding is None or embedding.channels is None:
            return None
        inputs = self.patcher.patchify([x.to(self.device) for x in channel_inputs(latents, frame_masks)])
        return embedding.channels(inputs.tokens)  # [N, D]

    def sampling_frame_embedding(self) -> FrameConditionEmbedding | None:
        """The frame-condition embedding generation uses (EMA copy when EMA is on); None without frame conditioning."""
        if self.frame_embedding is None:
            return None
        return self.ema.module["frame_embedding"] if self.ema is not None else self.frame_embedding

    def sampling_frame_marker(self) -> Tensor | None:
        """The given-frame marker generation uses (EMA copy when EMA is on); None for a model trained without frame
        conditioning, which then gets plain replacement (given tokens clean, unmarked)."""
        embedding = self.sampling_frame_embedding()
        return embedding.marker if embedding is not None else None

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in nn.ModuleList([self.trained_modules(), self.patcher, self.sampler]).parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # no weight decay on biases and norm gains
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.99),
                                      fused=hp.fused_optimizer or None)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        warmup, floor = hp.warmup_steps, hp.min_lr_ratio

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not hp.cosine_decay or total is None or total <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / (total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------- generation
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
        sample_names: list[str] | None = None,
    ) -> list[Tensor]:
        """Sample one video per caption at its (frames, height, width) -> list of [3, T, H, W] in [-1, 1] (CPU).

        Guidance steers away from the empty caption, or from ``negative_prompts`` where given (an empty string
        there means the empty caption); ``guidance_rescale`` is Lin et al.'s (2023) rescale weight.
        ``frame_conditions`` gives clean latent frames per sample, kept exactly in the output latent;
        ``sdedits`` starts a sample from a noised latent (all in one call must share the strength). ``fps`` and
        ``original_sizes`` (height, width) are the micro-conditions a denoiser configured with them gets (None: the
        model's ``output_fps``, or STILL_IMAGE_FPS for one frame, and the requested size). ``sample_names`` (e.g.
        the prompt rows, ``prompts.jsonl:3``) name the samples in warnings; default: their positions."""
        if not captions:
            raise ValueError("generate: the caption list is empty")
        if not len(captions) == len(sizes) == len(seeds):
            raise ValueError(f"generate: got {len(captions)} captions, {len(sizes)} sizes and {len(seeds)} seeds")
        steps = steps or self.hparams.sampling_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        rescale = self.hparams.guidance_rescale if guidance_rescale is None else guidance_rescale
        if negative_prompts is not None and len(negative_prompts) != len(captions):
            raise ValueError(f"generate: got {len(captions)} captions and {len(negative_prompts)} negative prompts")
        if negative_prompts is not None and not any(negative_prompts):
            negative_prompts = None  # all empty: the null condition itself
        noise_latents = []
        for caption, (frames, height, width), seed in zip(captions, sizes, seeds):
            try:
                shape = self.compressor.latent_shape(frames, height, width)
                self.patcher.grid_size(shape)
            except ValueError as err:
                raise ValueError(f"cannot generate {frames}x{height}x{width} for {caption!r}: {err}") from None
            generator = torch.Generator().manual_seed(seed)  # CPU noise: the same seed gives the same video anywhere
            noise_latents.append(torch.randn(self.compressor.latent_channels, *shape, generator=generator))
        micro = self._generation_micro_conditions(sizes, fps, original_sizes)
        noise = self.patcher.patchify([n.to(self.device) for n in noise_latents])
        names = sample_names or [f"sample {i}" for i in range(len(captions))]
        given, given_clean, channels = self._given_tokens(frame_conditions, noise_latents, names)
        start_kwargs = self._sdedit_start(sdedits, noise_latents)
        denoiser, conditioner = self.sampling_modules()
        was_training = self.training
        self.eval()  # no caption dropout or other training-only behaviour while sampling
        try:
            if start_kwargs.get("start_t") == 0.0:  # SDEdit at strength 0: the input itself
                clean = start_kwargs["start"]
            else:
                cond = conditioner(captions)
                null = unconditional_branch(conditioner, len(captions), negative_prompts) if scale != 1.0 else None
                if denoiser.micro_conditions:  # the same frame rate and size on the guided and unguided branch
                    cond = cond.with_micro_conditions(micro)
                    null = null.with_micro_conditions(micro) if null is not None else None
                model_fn = guided_model_fn(denoiser, cond, null, scale, rescale)
                if given is not None:
                    model_fn = with_given_tokens(model_fn, given, given_clean, self.sampling_frame_marker(), channels)
                clean = self.sampler.sample(model_fn, noise, steps, **start_kwargs)
            if given is not None:  # given frames come out exactly as given
                clean = clean.with_tokens(torch.where(given[:, None], given_clean, clean.tokens))
        finally:
            self.train(was_training)
        latents = self.patcher.unpatchify(clean)
        if channels is not None:  # the model saw every given frame, also inside partly given tokens: keep them all
            for i, fc in enumerate(frame_conditions):
                if fc is not None:
                    keep = fc.frame_mask.to(self.device)[None, :, None, None]  # [1, t, 1, 1]
                    latents[i] = torch.where(keep, fc.latent.to(latents[i]), latents[i])
        return [v.float().cpu() for v in self.compressor.decode_list(latents)]

    def _generation_micro_conditions(
        self, sizes: list[tuple[int, int, int]], fps: list[float | None] | None,
        original_sizes: list[tuple[int, int] | None] | None,
    ) -> MicroConditions:
        """Micro-conditions for samples of ``sizes`` (frames, height, width), filling the defaults."""
        fps = [None] * len(sizes) if fps is None else fps
        original_sizes = [None] * len(sizes) if original_sizes is None else original_sizes
        if not len(fps) == len(original_sizes) == len(sizes):
            raise ValueError(f"generate: got {len(sizes)} sizes, {len(fps)} frame rates and {len(original_sizes)} "
                             "original sizes")
        rates = [generation_fps(frames, rate, self.hparams.output_fps) for (frames, _, _), rate in zip(sizes, fps)]
        originals = [(h, w) if original is None else original for (_, h, w), original in zip(sizes, original_sizes)]
        return MicroConditions.build(rates, originals, self.device)

    def _given_tokens(
        self, frame_conditions: list[FrameCondition | None] | None, noise_latents: list[Tensor], names: list[str]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(given [N] bool, clean tokens [N, D], projected given-frame channels [N, D] or None) for the frame
        conditions, or (None, None, None) without any."""
        if frame_conditions is None or all(fc is None for fc in frame_conditions):
            return None, None, None
        if len(frame_conditions) != len(noise_latents):
            raise ValueError(f"generate: got {len(frame_conditions)} frame conditions for {len(noise_latents)} samples")
        latents, masks = [], []
        for i, (fc, noise) in enumerate(zip(frame_conditions, noise_latents)):
            if fc is not None and fc.latent.shape != noise.shape:
                raise ValueError(f"generate: sample {i}'s frame condition latent is {tuple(fc.latent.shape)}, "
                                 f"the video's latent is {tuple(noise.shape)}")
            latents.append(fc.latent if fc is not None else torch.zeros_like(noise))
            masks.append(fc.frame_mask if fc is not None else torch.zeros(noise.shape[1], dtype=torch.bool))
        clean = self.patcher.patchify([latent.to(self.device, noise_latents[0].dtype) for latent in latents])
        shapes = [tuple(n.shape) for n in noise_latents]
        channels = self.given_channels(self.sampling_frame_embedding(), latents, masks)
        # A token is given only when all its latent frames are; without channels the others are generated anew.
        dropped = {} if channels is not None else {
            names[i]: n for i, n in enumerate(ungiven_frames(self.patcher, shapes, masks)) if n}
        if dropped:
            log.warning("generate: given latent frames that share a token with frames to generate are generated, not "
                        "kept (give whole tokens: a multiple of the patcher's frames); {prompt: frames}: %s", dropped)
        given = token_mask(self.patcher, shapes, masks).to(self.device)
        return given, clean.tokens, channels

    def _sdedit_start(self, sdedits: list[SDEdit | None] | None, noise_latents: list[Tensor]) -> dict:
        """Keyword arguments that make the sampler start from the SDEdit inputs ({} without any)."""
        if sdedits is None or all(s is None for s in sdedits):
            return {}
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
        return {"start_t": float(sdedits[0].strength), "start": start}

    def predict_step(self, batch: list[PromptRequest], batch_idx: int) -> list[GeneratedVideo]:
        """One prompt row at a time may fail (bad inputs); it is reported and the others still run."""
        results = []
        for r in batch:
            output_fps = self.hparams.output_fps if r.fps is None else r.fps  # the file plays at the asked rate
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
                self._prediction_errors.append(str(err))
                results.append(GeneratedVideo(r, None, output_fps, error=str(err)))
        return results

    def on_predict_start(self) -> None:
        self._prediction_errors = []
        if self.finetuning is not None:  # merged adapters: one matmul per adapted layer while sampling
            self.finetuning.merge(self.sampling_modules()[0])

    def on_predict_end(self) -> None:
        if self.finetuning is not None:
            self.finetuning.unmerge(self.sampling_modules()[0])
        if self._prediction_errors:
            raise PromptRowsFailed(
                f"{len(self._prediction_errors)} prompt row(s) failed (the other outputs are written):\n  "
                + "\n  ".join(self._prediction_errors)
            )

    def num_parameters(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in getattr(self, n).parameters()) for n in PLUGIN_ARGUMENTS}


