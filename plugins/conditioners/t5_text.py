"""The T5 / UMT5 text encoder of an open-weight video pipeline, encoding prompts exactly as that pipeline does.

``HFTextConditioner`` keeps only each caption's real tokens (our own denoisers mask the rest). A pretrained video
transformer instead expects the context its pipeline built in training, and the pipelines differ
(diffusers 0.42, ``_get_t5_prompt_embeds``):

=============  ==========  ==================  =========================================  ===============
pipeline       max_length  encoder sees mask   tokens beyond the prompt                   prompt cleaning
=============  ==========  ==================  =========================================  ===============
Wan (UMT5)     512         yes                 zeroed (the transformer attends to them)   ftfy/html/space
LTX-Video      128         no                  kept; the transformer takes the mask       no
CogVideoX      226         no                  kept; no mask anywhere                     no
=============  ==========  ==================  =========================================  ===============

The defaults are Wan's; ``configs/`` set the others. Every prompt is padded to ``max_length`` (the context is
always ``[B, max_length, d]``) and ``context_mask`` is the tokenizer's attention mask. Negative prompts and the null
condition go through the same encoding: for guidance the unconditional branch is the encoded negative prompt, or the
encoded empty prompt ("", the pipelines' default negative prompt).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from torch import Tensor

from framework.core.interfaces import Conditioner, Conditioning
from plugins.conditioners.hf_text import _load_encoder
from plugins.diffusers_folders import component_folder


def clean_prompt(text: str) -> str:
    """WanPipeline's ``prompt_clean``: ftfy's text repair when installed, HTML entities unescaped (twice), runs of
    whitespace collapsed."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class T5TextConditioner(Conditioner):
    """Frozen local T5 / UMT5 encoder with a video pipeline's exact prompt encoding (defaults: Wan's)."""

    def __init__(self, path: Path, encoder_subfolder: str | None = "text_encoder",
                 tokenizer_subfolder: str | None = "tokenizer", max_length: int = 512, encoder_mask: bool = True,
                 zero_padding: bool = True, clean_prompts: bool = True, caption_dropout: float = 0.0) -> None:
        """``path`` is a pipeline folder with the transformers encoder in ``encoder_subfolder`` and the tokenizer in
        ``tokenizer_subfolder`` (``null``: in ``path`` itself). ``encoder_mask`` passes the attention mask to the
        encoder; ``zero_padding`` zeroes the features beyond each prompt's tokens; ``clean_prompts`` applies Wan's
        prompt cleaning. ``caption_dropout`` (training only) replaces captions by "" -- the null condition guidance
        uses."""
        super().__init__()
        if max_length < 2:
            raise ValueError(f"T5TextConditioner: max_length must be >= 2, got {max_length}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"T5TextConditioner: caption_dropout must be in [0, 1], got {caption_dropout}")
        self.encoder_dir = component_folder(path, encoder_subfolder)
        self.tokenizer_dir = component_folder(path, tokenizer_subfolder)
        for folder, what in ((self.encoder_dir, "config.json"), (self.tokenizer_dir, "tokenizer_config.json")):
            if not (folder / what).is_file():
                raise FileNotFoundError(f"T5TextConditioner: {str(folder)!r} is not a transformers "
                                        f"{'model' if what == 'config.json' else 'tokenizer'} folder (no {what})")
        try:
            self.encoder, self.tokenizer = _load_encoder(self.encoder_dir, self.tokenizer_dir)
        except (OSError, ValueError) as err:
            raise ValueError(f"T5TextConditioner: cannot load the encoder from {str(self.encoder_dir)!r} and the "
                             f"tokenizer from {str(self.tokenizer_dir)!r}: {err}") from err
        model_type = self.encoder.config.model_type
        if model_type not in ("t5", "mt5", "umt5"):
            raise ValueError(f"T5TextConditioner: {str(self.encoder_dir)!r} holds a {model_type!r} model, not a T5, "
                             f"mT5 or UMT5 encoder")
        self.encoder.requires_grad_(False).eval()
        self.max_length, self.encoder_mask = max_length, encoder_mask
        self.zero_padding, self.clean_prompts = zero_padding, clean_prompts
        self.caption_dropout = caption_dropout
        self.context_dim = self.pooled_dim = int(self.encoder.config.d_model)

    def train(self, mode: bool = True) -> T5TextConditioner:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout inside the encoder while the denoiser trains
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (context [B, max_length, d] float32, mask [B, max_length] bool)."""
        prompts = [clean_prompt(c) for c in captions] if self.clean_prompts else list(captions)
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)  # [B, L] each
        hidden = self.encoder(ids, mask if self.encoder_mask else None).last_hidden_state.float()  # [B, L, d]
        real = mask.bool()
        if self.zero_padding:
            hidden = hidden * real[..., None]
        return hidden, real

    def forward(self, captions: list[str]) -> Conditioning:
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        context, mask = self.encode(captions)
        # Every T5 tokenizer appends </s>, so each row has at least one real token to average.
        pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, d]
        return Conditioning(context=context, context_mask=mask, pooled=pooled)
