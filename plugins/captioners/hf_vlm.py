"""A local Hugging Face vision-language model directory as a captioner (BLIP, GIT and other image-to-text models).

Loads with ``AutoModelForImageTextToText`` and ``AutoProcessor`` from a directory (``local_files_only=True``: no hub
access) and decodes greedily, so the same clip always gets the same caption. The clip's sampled frames arrive tiled
into one image (``framework.data.recaption.tile``), which single-image captioners such as BLIP (Li et al., "BLIP:
Bootstrapping Language-Image Pre-training", 2022) describe as a whole. An optional ``prompt`` is the text prefix
conditional captioners continue ("a video of"); it is stripped from the returned caption.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from framework.core.interfaces import Captioner


class HFVisionCaptioner(Captioner):
    """Greedy captions from a local transformers image-text-to-text model directory."""

    def __init__(self, model_dir: Path, max_new_tokens: int = 60, prompt: str | None = None) -> None:
        super().__init__()
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as err:
            raise ImportError("HFVisionCaptioner needs transformers: pip install -e .[text]") from err
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"HFVisionCaptioner: {model_dir} is not a transformers model directory (no config.json)")
        if max_new_tokens < 1:
            raise ValueError(f"HFVisionCaptioner: max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    @torch.no_grad()
    def caption(self, clips: list[list[Image.Image]]) -> list[str]:
        images = [clip[0] for clip in clips]  # one (tiled) image per clip
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(self.model.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.prompt:
            texts = [t[len(self.prompt):].strip() if t.lower().startswith(self.prompt.lower()) else t for t in texts]
        return texts
