"""Open-weight diffusers video transformers (Wan 2.1/2.2, LTX-Video) as a packed-sequence ``Denoiser``.

The diffusers transformer is held unchanged as ``self.transformer`` (so peft / ``load_lora_weights`` key names and
``save_pretrained`` stay diffusers'), loaded offline from a local folder. The adapter owns no weights of its own.

Patching: the transformer patchifies itself (Wan: a Conv3d over (1, 2, 2) patches; LTX: a linear layer over
single latent positions), with its own positional encoding over its own patch grid. So this denoiser pairs with the
identity patcher ``SpacetimePatcher(patch_t: 1, patch_h: 1, patch_w: 1)``: a token is one latent position with the
latent's channels, and ``forward`` folds each sample's tokens back into its latent ``[c, t, h, w]``, runs samples of
equal size as one batch through the transformer, and packs the predictions in the same layout. ``bind`` rejects any
other patcher (its tokens would not have the latent's channel count).

Per family (read from the folder's ``config.json`` ``_class_name``; ``FAMILIES`` below):

* timestep: ours is t in [0, 1] (1 = noise), theirs is ``t * num_train_timesteps`` (1000 for both);
* prediction: the flow velocity ``noise - clean`` for both, which is what ``RectifiedFlow`` and
  ``DiffusersFlowScheduler`` read with ``prediction: velocity``;
* text: Wan attends to all of its (zero-padded, 512-token) context and takes no mask; LTX takes the tokenizer's
  attention mask;
* LTX's rotary positions are scaled by (VAE temporal factor / frame rate, VAE spatial factor, VAE spatial factor),
  like ``LTXPipeline`` does; the frame rate is ``ltx_frame_rate`` (the pipeline's ``frame_rate``, 25 by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO
from framework.layers.packing import PackedSequence
from plugins.diffusers_folders import component_folder, load_diffusers_model


@dataclass(frozen=True)
class CallContext:
    """What a family's call needs besides the latents: the adapter's per-family settings."""

    frame_rate: float
    vae_temporal_factor: int
    vae_spatial_factor: int


@dataclass(frozen=True)
class TransformerFamily:
    """How one diffusers video transformer is called: latents ``[B, c, t, h, w]``, timesteps ``[B]`` in the model's
    own scale, text ``[B, L, d]`` with mask ``[B, L]`` -> prediction ``[B, c, t, h, w]``."""

    call: Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor, CallContext], Tensor]
    blocks: Callable[[nn.Module], nn.ModuleList]  # the model's transformer blocks, in call order


def _call_wan(model: nn.Module, latents: Tensor, timestep: Tensor, text: Tensor, mask: Tensor,
              ctx: CallContext) -> Tensor:
    # Wan attends to every context token; WanPipeline zero-pads the embeddings to 512 tokens instead of masking.
    return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def _call_ltx(model: nn.Module, latents: Tensor, timestep: Tensor, text: Tensor, mask: Tensor,
              ctx: CallContext) -> Tensor:
    b, c, t, h, w = latents.shape
    tokens = latents.flatten(2).transpose(1, 2)  # [B, t*h*w, c]: LTXPipeline._pack_latents with patch size 1
    scale = (ctx.vae_temporal_factor / ctx.frame_rate, ctx.vae_spatial_factor, ctx.vae_spatial_factor)
    out = model(hidden_states=tokens, encoder_hidden_states=text, timestep=timestep,
                encoder_attention_mask=mask.to(text.dtype), num_frames=t, height=h, width=w,
                rope_interpolation_scale=scale, return_dict=False)[0]  # [B, t*h*w, c]
    return out.transpose(1, 2).reshape(b, c, t, h, w)


FAMILIES: dict[str, TransformerFamily] = {
    "WanTransformer3DModel": TransformerFamily(call=_call_wan, blocks=lambda model: model.blocks),
    "LTXVideoTransformer3DModel": TransformerFamily(call=_call_ltx, blocks=lambda model: model.transformer_blocks),
}


def _patch_size(config) -> tuple[int, int, int]:
    """(pt, ph, pw) the transformer cuts latents into (Wan: ``patch_size`` (1, 2, 2); LTX: ``patch_size_t``,
    ``patch_size``)."""
    if isinstance(config.patch_size, (list, tuple)):
        return tuple(int(p) for p in config.patch_size)  # type: ignore[return-value]
    return int(getattr(config, "patch_size_t", 1) or 1), int(config.patch_size), int(config.patch_size)


class DiffusersVideoTransformer(Denoiser):
    """A local diffusers ``WanTransformer3DModel`` or ``LTXVideoTransformer3DModel`` behind the packed-sequence
    denoiser contract (pair it with ``SpacetimePatcher(1, 1, 1)``; it predicts the flow velocity)."""

    def __init__(self, path: Path, subfolder: str | None = "transformer", gradient_checkpointing: bool = False,
                 ltx_frame_rate: float = 25.0, ltx_vae_temporal_factor: int = 8,
                 ltx_vae_spatial_factor: int = 32) -> None:
        """``path`` is a pipeline folder and ``subfolder`` its transformer (``null``: ``path`` is the transformer
        folder itself). ``gradient_checkpointing`` turns on diffusers' activation checkpointing of every block.
        The ``ltx_*`` settings are LTXPipeline's ``frame_rate`` and its VAE's factors (rotary position scale)."""
        super().__init__()
        if ltx_frame_rate <= 0:
            raise ValueError(f"DiffusersVideoTransformer: ltx_frame_rate must be > 0, got {ltx_frame_rate}")
        self.folder = component_folder(path, subfolder)
        self.transformer, self.class_name = load_diffusers_model(self.folder, FAMILIES, "DiffusersVideoTransformer")
        self.family = FAMILIES[self.class_name]
        if getattr(self.transformer.config, "image_dim", None) is not None:
            raise ValueError(f"DiffusersVideoTransformer: {str(self.folder)!r} is a Wan image-to-video checkpoint "
                             f"(image_dim {self.transformer.config.image_dim}: CLIP image tokens), not supported; use "
                             f"a text-to-video checkpoint (image-to-video then works by frame replacement)")
        if subfolder and (Path(path).expanduser() / "transformer_2").is_dir():
            raise ValueError(f"DiffusersVideoTransformer: {str(Path(path))!r} is a two-expert (Wan 2.2 A14B) "
                             f"pipeline with transformer_2, not supported: sampling with one expert alone would "
                             f"not be that model")
        self.call_context = CallContext(ltx_frame_rate, ltx_vae_temporal_factor, ltx_vae_spatial_factor)
        config = self.transformer.config
        self.latent_channels = int(config.in_channels)
        self.text_dim = int(getattr(config, "text_dim", None) or config.caption_channels)
        self.model_patch_size = _patch_size(config)
        self.timestep_scale = 1000.0  # both families were trained on t * num_train_timesteps (1000)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def bind(self, io: DenoiserIO) -> None:
        if io.token_dim != self.latent_channels:
            raise ValueError(
                f"DiffusersVideoTransformer: {str(self.folder)!r} takes latents with {self.latent_channels} channels "
                f"and patchifies them itself, but the tokens have {io.token_dim} features: use the identity patcher "
                f"SpacetimePatcher(patch_t: 1, patch_h: 1, patch_w: 1) and a compressor with "
                f"{self.latent_channels} latent channels")
        if io.context_dim != self.text_dim:
            raise ValueError(f"DiffusersVideoTransformer: {str(self.folder)!r} takes text features of width "
                             f"{self.text_dim}, the conditioner gives {io.context_dim}")

    def block_stack(self) -> nn.ModuleList:
        return self.family.blocks(self.transformer)

    def check_latent_size(self, size: tuple[int, int, int]) -> None:
        """Raise naming the dimension of a latent (t, h, w) that the transformer's patches do not divide."""
        for name, n, p in zip(("frames", "height", "width"), size, self.model_patch_size):
            if n % p:
                raise ValueError(f"DiffusersVideoTransformer: latent {name} {n} is not divisible by the "
                                 f"transformer's patch size {p} (patch size {self.model_patch_size}, latent "
                                 f"(t, h, w) {size})")

    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        c = self.latent_channels
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, size in enumerate(x.grid_sizes):
            groups.setdefault(size, []).append(i)
        pieces = x.split()  # per sample [t*h*w, c]
        outputs: list[Tensor | None] = [None] * x.num_samples
        dtype = self.transformer.dtype
        for (t, h, w), indices in groups.items():
            self.check_latent_size((t, h, w))
            index = torch.tensor(indices, device=x.tokens.device)
            latents = torch.stack([pieces[i].reshape(t, h, w, c) for i in indices]).permute(0, 4, 1, 2, 3)
            prediction = self.family.call(  # [G, c, t, h, w]
                self.transformer, latents.to(dtype), timestep[index].float() * self.timestep_scale,
                cond.context[index].to(dtype), cond.context_mask[index], self.call_context)
            for row, i in enumerate(indices):
                outputs[i] = prediction[row].permute(1, 2, 3, 0).reshape(t * h * w, c)  # [t*h*w, c]
        return x.with_tokens(torch.cat(outputs).to(x.tokens.dtype))  # type: ignore[arg-type]
