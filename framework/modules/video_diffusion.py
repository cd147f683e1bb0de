"""VideoDiffusion: trains a denoiser on compressed, patchified videos and generates new ones.

The module only wires the five plugins together; each owns its part of the recipe::

    videos -> Compressor.encode -> Patcher.patchify -> Sampler.training_loss(Denoiser(., t, Conditioner(captions)))

Generation reverses it: noise with the requested size -> Sampler.sample (with classifier-free guidance) ->
Patcher.unpatchify -> Compressor.decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from framework.data.prompts import PromptRequest
from framework.guidance import guided_model_fn, unconditional_branch
from framework.interfaces import Compressor, Conditioner, Denoiser, DenoiserIO, Patcher, Sampler
from framework.packing import PackedSequence

PLUGIN_ARGUMENTS = ("compressor", "patcher", "denoiser", "conditioner", "sampler")


@dataclass
class GeneratedVideo:
    request: PromptRequest
    video: Tensor  # [3, T, H, W] in [-1, 1], on CPU
    fps: float


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
    ) -> None:
        """``cosine_decay`` anneals the learning rate to ``min_lr_ratio`` of its peak by the end of training
        (``trainer.max_steps``); ``ema_decay`` > 0 keeps an exponential moving average of the denoiser and
        conditioner weights, which ``generate`` uses: averaged weights give cleaner samples than the last step's."""
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
        self.save_hyperparameters(ignore=None if built_by_cli else list(PLUGIN_ARGUMENTS))
        self.compressor, self.patcher, self.denoiser = compressor, patcher, denoiser
        self.conditioner, self.sampler = conditioner, sampler
        self.compressor.requires_grad_(False)
        denoiser.bind(
            DenoiserIO(
                token_dim=patcher.token_dim(compressor.latent_channels),
                context_dim=conditioner.context_dim,
                pooled_dim=conditioner.pooled_dim,
            )
        )
        self.ema = (
            AveragedModel(self.trained_modules(), multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            .requires_grad_(False)
            if ema_decay > 0 else None
        )

    # ------------------------------------------------------------------------------------------------ training
    def encode(self, videos: list[Tensor]) -> PackedSequence:
        with torch.no_grad():
            latents = self.compressor.encode_list(videos)  # list of [c, t, h, w]
        return self.patcher.patchify(latents)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # A latent cache (``kinetoscope cache-latents``) serves pre-encoded latents; otherwise encode the pixels here.
        clean = self.patcher.patchify(batch["latents"]) if "latents" in batch else self.encode(batch["videos"])
        cond = self.conditioner(batch["captions"])
        per_sample = self.sampler.training_loss(lambda x, t: self.denoiser(x, t, cond), clean)  # [B]
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["captions"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.trained_modules())

    def trained_modules(self) -> nn.ModuleDict:
        """The modules the optimizer trains and EMA averages (the compressor is frozen, the rest hold no weights)."""
        return nn.ModuleDict({"denoiser": self.denoiser, "conditioner": self.conditioner})

    def sampling_modules(self) -> tuple[Denoiser, Conditioner]:
        """The EMA copies when EMA is on, else the trained modules."""
        if self.ema is not None:
            return self.ema.module["denoiser"], self.ema.module["conditioner"]
        return self.denoiser, self.conditioner

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in nn.ModuleList([self.trained_modules(), self.patcher, self.sampler]).parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)  # no weight decay on biases and norm gains
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.99))
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
    ) -> list[Tensor]:
        """Sample one video per caption at its (frames, height, width) -> list of [3, T, H, W] in [-1, 1] (CPU).

        Guidance steers away from the empty caption, or from ``negative_prompts`` where given (an empty string
        there means the empty caption); ``guidance_rescale`` is Lin et al.'s (2023) rescale weight."""
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
        noise = self.patcher.patchify([n.to(self.device) for n in noise_latents])
        denoiser, conditioner = self.sampling_modules()
        was_training = self.training
        self.eval()  # no caption dropout or other training-only behaviour while sampling
        try:
            cond = conditioner(captions)
            null = unconditional_branch(conditioner, len(captions), negative_prompts) if scale != 1.0 else None
            clean = self.sampler.sample(guided_model_fn(denoiser, cond, null, scale, rescale), noise, steps)
        finally:
            self.train(was_training)
        latents = self.patcher.unpatchify(clean)
        return [v.float().cpu() for v in self.compressor.decode_list(latents)]

    def predict_step(self, batch: list[PromptRequest], batch_idx: int) -> list[GeneratedVideo]:
        videos = self.generate(
            [r.caption for r in batch],
            [(r.frames, r.height, r.width) for r in batch],
            [r.seed for r in batch],
            negative_prompts=[r.negative_prompt for r in batch],
        )
        return [GeneratedVideo(r, v, self.hparams.output_fps) for r, v in zip(batch, videos)]

    def num_parameters(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in getattr(self, n).parameters()) for n in PLUGIN_ARGUMENTS}


