"""Prompt extension at inference: a short user prompt becomes a descriptive caption like the re-captioned training data.

A model trained on long descriptive captions (``kinetoscope recaption``; DALL-E 3 and Sora do the same with
"upsampled" prompts) follows long prompts best, while users write short ones. ``PromptExtension`` rewrites each
prompt before generation, either

* with a local causal language model directory (``model_dir``; transformers ``AutoModelForCausalLM``, loaded with
  ``local_files_only=True``, greedy decoding so a prompt always extends the same way): the model continues
  ``instruction.format(caption=...)`` and its continuation is the new caption; or
* with a ``template`` (no model): ``template.format(caption=...)``, e.g. the default
  ``"{caption}. The camera is static; the motion is smooth and continuous."``.

The prediction index (``index.jsonl``) records the caption actually generated from, i.e. the extended one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class PromptExtension:
    """How ``predict`` extends prompts: a local language model when ``model_dir`` is set, else ``template``."""

    template: str = "{caption}. The camera is static; the motion is smooth and continuous."
    model_dir: Path | None = None
    instruction: str = "Describe this video in one detailed sentence: {caption}\nDescription:"
    max_new_tokens: int = 60

    def __post_init__(self) -> None:
        for name in ("template", "instruction"):
            if "{caption}" not in getattr(self, name):
                raise ValueError(f"PromptExtension: {name} must contain '{{caption}}', got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"PromptExtension: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"PromptExtension: {self.model_dir} is not a transformers model directory")

    def extend(self, captions: list[str]) -> list[str]:
        """Extended captions, one per input; the empty caption (unconditional) stays empty."""
        if self.model_dir is None:
            return [self.template.format(caption=c.strip().rstrip(".")) if c else c for c in captions]
        return _LanguageModel.load(Path(self.model_dir)).continue_texts(
            [self.instruction.format(caption=c) for c in captions], self.max_new_tokens, keep=captions
        )


class _LanguageModel:
    """A local causal LM, loaded once per directory."""

    _loaded: dict[Path, _LanguageModel] = {}

    def __init__(self, model_dir: Path) -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise ImportError("PromptExtension with model_dir needs transformers: pip install -e .[text]") from err
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    @classmethod
    def load(cls, model_dir: Path) -> _LanguageModel:
        key = model_dir.resolve()
        if key not in cls._loaded:
            cls._loaded[key] = cls(key)
        return cls._loaded[key]

    def continue_texts(self, prompts: list[str], max_new_tokens: int, keep: list[str]) -> list[str]:
        import torch

        out = []
        for prompt, original in zip(prompts, keep):
            if not original:
                out.append(original)
                continue
            ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                generated = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            text = " ".join(text.split())
            out.append(text or original)  # a model that says nothing leaves the prompt as it was
        return out
