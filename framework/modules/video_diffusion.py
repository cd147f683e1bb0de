"""VideoDiffusion: trains a denoiser on compressed, patchified videos; generation is its pipeline's.

The module only wires the five plugins together for training; each owns its part of the recipe::

    videos -> Compressor.encode -> Patcher.patchify -> Sampler.training_loss(Denoiser(., t, Conditioner(captions)))

Generation (noise -> guided Sampler.sample -> Patcher.unpatchify -> Compressor.decode, with frame conditioning,
SDEdit and micro-conditions) lives in ``framework.generation.pipeline.GenerationPipeline``; ``pipeline()`` hands it
this module's plugins, and ``predict_step`` / ``generate`` call it. The exponential moving average of the weights is
``framework.training.ema.EMACallback``'s (a trainer callback), swapped into these modules for prediction.

With ``frame_conditioning`` set, training gives each sample clean latent frames drawn by a mask strategy
(``framework.generation.frame_conditioning``), and generation takes given frames (image-to-video, extension, interpolation)
or a video to edit (SDEdit); prompt rows choose the task (``framework.generation.tasks``).

A denoiser with ``micro_conditions`` gets each sample's frame rate and original size attached to its Conditioning:
from the batch's ``"fps"`` and ``"original_sizes"`` in training, from the prompt (default: ``output_fps`` and the
requested size) in generation, the same on both guidance branches (``framework.core.micro_conditions``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from framework.core.interfaces import Compressor, Conditioner, Denoiser, DenoiserIO, ModelFn, Patcher, Sampler
from framework.core.micro_conditions import MicroConditions
from framework.data.prompts import PromptRequest
from framework.generation.frame_conditioning import (
    FrameConditionEmbedding,
    FrameMaskProbabilities,
    sample_training_masks,
    token_mask,
    with_given_tokens,
)
from framework.generation.pipeline import GeneratedVideo, GenerationPipeline
from framework.layers.packing import PackedSequence
from framework.training.compilation import CompileMode, compile_in_place
from framework.training.finetune import FineTuning, complete_checkpoint, prune_checkpoint

log = logging.getLogger(__name__)

PLUGIN_ARGUMENTS = ("compressor", "patcher", "denoiser", "conditioner", "sampler")


class PromptRowsFailed(RuntimeError):
    """Some prompt rows could not be generated; the others were, and their outputs are kept."""


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
        sampling_steps: int = 30,
        guidance_scale: float = 4.0,
        guidance_rescale: float = 0.0,
        output_fps: float = 8.0,
        frame_conditioning: FrameMaskProbabilities | None = None,
        compile_denoiser: bool = False,
        compile_mode: CompileMode = "default",
        fused_optimizer: bool = False,
        ema_decay: float | None = None,
        finetuning: FineTuning | None = None,
    ) -> None:
        """``cosine_decay`` anneals the learning rate to ``min_lr_ratio`` of its peak by the end of training
        (``trainer.max_steps``). An exponential moving average of the weights is kept by
        ``framework.training.ema.EMACallback`` (in ``trainer.callbacks``), which swaps it in for prediction.
        ``frame_conditioning`` trains with given clean frames drawn by these mask strategies (docs/conditioning.md).
        ``compile_denoiser`` runs the denoiser through ``torch.compile`` with ``compile_mode`` for
        training and sampling, compiled once for any packed layout (``framework.training.compilation``);
        ``fused_optimizer`` uses AdamW's fused kernel (``fused=True``: one kernel for all parameters, CPU and GPU).
        ``ema_decay`` is accepted only so that configs and checkpoints from before EMACallback still load: it has
        no effect (a warning says where the EMA went). ``finetuning`` trains a pretrained model: LoRA adapters or a
        full fine-tune with parts frozen; checkpoints then hold only the trained weights
        (``framework.training.finetune``, docs/pretrained.md)."""
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"VideoDiffusion: learning_rate must be > 0, got {learning_rate}")
        if warmup_steps < 0:
            raise ValueError(f"VideoDiffusion: warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"VideoDiffusion: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"VideoDiffusion: guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if sampling_steps < 1:
            raise ValueError(f"VideoDiffusion: sampling_steps must be >= 1, got {sampling_steps}")
        if ema_decay:
            log.warning("VideoDiffusion: ema_decay=%s has no effect: the EMA is framework.training.ema.EMACallback's "
                        "(add it to trainer.callbacks with decay: %s); a checkpoint's former ema.* weights are handed "
                        "to it on load", ema_decay, ema_decay)
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
        if finetuning is not None:
            finetuning.apply(self.trained_modules())
        if compile_denoiser:
            compile_in_place(self.denoiser, compile_mode)

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
                                               ("sampler", self.sampler))
                     if module is not None and any(True for _ in module.parameters())]
        if uncovered:
            raise ValueError(f"VideoDiffusion: sharding (ModelParallelStrategy) covers the denoiser and conditioner; "
                             f"{', '.join(uncovered)} also hold weights (use strategy: ddp)")
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
            channels = self.frame_embedding.given_channels(self.patcher, latents, masks, self.device)
            model_fn = with_given_tokens(model_fn, given, clean.tokens, self.frame_embedding.marker, channels)
            extra["loss_mask"] = ~given
        per_sample = self.sampler.training_loss(model_fn, clean, **extra)  # [B]
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.finetuning is not None:  # the frozen base is rebuilt from its source on load
            prune_checkpoint(self, checkpoint)

    def on_train_end(self) -> None:
        """A fine-tune leaves its adapters where other tools read them: ``<default_root_dir>/lora/`` (LoRA)."""
        if self.finetuning is not None and self.trainer.is_global_zero:
            written = self.finetuning.export(self.denoiser, Path(self.trainer.default_root_dir) / "lora")
            if written is not None:
                log.info("fine-tuned adapters written to %s", written)

    def trained_modules(self) -> nn.ModuleDict:
        """The modules the optimizer trains (the compressor is frozen, the rest hold no weights)."""
        modules = {"denoiser": self.denoiser, "conditioner": self.conditioner}
        if self.frame_embedding is not None:
            modules["frame_embedding"] = self.frame_embedding
        return nn.ModuleDict(modules)

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
    def pipeline(self) -> GenerationPipeline:
        """A generation pipeline over this module's plugins and sampling defaults. It shares the module's weights
        (no copy), so it generates with whatever they hold: the averaged ones while ``EMACallback`` has them swapped
        in (prediction, ``VideoMetrics``)."""
        return GenerationPipeline(
            self.compressor, self.patcher, self.denoiser, self.conditioner, self.sampler, self.frame_embedding,
            sampling_steps=self.hparams.sampling_steps, guidance_scale=self.hparams.guidance_scale,
            guidance_rescale=self.hparams.guidance_rescale, output_fps=self.hparams.output_fps)

    def generate(self, *args, **kwargs) -> list[Tensor]:
        """``GenerationPipeline.generate`` with this module's weights and defaults."""
        return self.pipeline().generate(*args, **kwargs)

    def predict_step(self, batch: list[PromptRequest], batch_idx: int) -> list[GeneratedVideo]:
        """One prompt row at a time may fail (bad inputs); it is reported and the others still run."""
        results = self.pipeline().predict(batch)
        self._prediction_errors.extend(r.error for r in results if r.error is not None)
        return results

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written while VideoDiffusion kept its own average (``ema_decay``) hold it as ``ema.module.*``
        in the state dict: move it into ``EMACallback``'s state, so that callback resumes from it and predicts with it
        (the trained parameters only, as the callback averages them). A fine-tune's checkpoint lacks the frozen base:
        it is filled from this model, after checking it is the base the run was trained against."""
        if self.finetuning is not None:
            complete_checkpoint(self, checkpoint)
        state = checkpoint.get("state_dict", {})
        old = [key for key in state if key.startswith("ema.")]
        if not old:
            return
        values = {key: state.pop(key) for key in old}
        prefix = "ema.module."
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        average = {key[len(prefix):]: v for key, v in values.items() if key[len(prefix):] in trained}
        updates = int(values["ema.n_averaged"]) if "ema.n_averaged" in values else 0
        log.warning("checkpoint holds the module's own EMA (ema.*, from ema_decay): moved to EMACallback's state")
        checkpoint.setdefault("callbacks", {}).setdefault("EMACallback", {"average": average, "num_updates": updates})

    def on_predict_start(self) -> None:
        self._prediction_errors = []
        # Merged adapters: one matmul per adapted layer while sampling. Lightning runs this after the callbacks'
        # on_predict_start, so the adapters merged are EMACallback's averaged ones when it is used.
        if self.finetuning is not None:
            self.finetuning.merge(self.denoiser)

    def on_predict_epoch_end(self) -> None:
        # Before the callbacks' on_predict_end, where EMACallback puts the trained adapters back: unmerging after
        # that would subtract other adapters than were merged from the frozen base.
        if self.finetuning is not None:
            self.finetuning.unmerge(self.denoiser)

    def on_predict_end(self) -> None:
        if self._prediction_errors:
            raise PromptRowsFailed(
                f"{len(self._prediction_errors)} prompt row(s) failed (the other outputs are written):\n  "
                + "\n  ".join(self._prediction_errors)
            )

    def num_parameters(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in getattr(self, n).parameters()) for n in PLUGIN_ARGUMENTS}


