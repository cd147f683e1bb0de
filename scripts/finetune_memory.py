"""Fine-tuning memory per open-weight model, computed from parameter counts (not measured on a GPU).

The transformers are built on the meta device from their published configurations (diffusers classes; no weights
are downloaded or allocated), their parameters counted, and the LoRA adapter sizes counted by adapting the same
meta model with ``framework.training.finetune.LoRA`` (``--rank``, attention projections ``to_q, to_k, to_v,
to_out.0`` as examples/wan_lora.yaml). Bytes per parameter:

* weights in bf16: 2; gradients in bf16: 2; AdamW's two moments in fp32: 8 (``precision: bf16-true`` keeps the
  moments in bf16: 4; ``bf16-mixed`` keeps fp32 weights, gradients and moments: 16);
* full fine-tune: weights + gradients + moments of every transformer parameter;
* LoRA: the frozen transformer's weights, plus weights, gradients and moments of the adapters only.

Activations (set by the clip's token count; activation checkpointing cuts them to about one block's) and the frozen
text encoder and VAE (their weights only: listed separately) come on top.

    python scripts/finetune_memory.py            # prints the markdown table of docs/pretrained.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# name -> (diffusers class, configuration as published in the model's transformer/config.json)
TRANSFORMERS = {
    "Wan 2.1 T2V 1.3B": ("WanTransformer3DModel", dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                                      num_layers=30)),
    "Wan 2.1 T2V 14B": ("WanTransformer3DModel", dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                                     num_layers=40)),
    "LTX-Video 0.9 (2B)": ("LTXVideoTransformer3DModel", dict()),
    "CogVideoX 2B": ("CogVideoXTransformer3DModel", dict(num_attention_heads=30, num_layers=30)),
    "CogVideoX 5B": ("CogVideoXTransformer3DModel", dict(num_attention_heads=48, num_layers=42,
                                                        use_rotary_positional_embeddings=True)),
}
# the frozen text encoder each pipeline uses: (transformers config class, encoder class, configuration)
UMT5_XXL = ("UMT5Config", "UMT5EncoderModel", dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                                                   num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))
T5_V1_1_XXL = ("T5Config", "T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                  num_heads=64, feed_forward_proj="gated-gelu"))
TEXT_ENCODERS = {"Wan 2.1 T2V 1.3B": ("UMT5-XXL", UMT5_XXL), "Wan 2.1 T2V 14B": ("UMT5-XXL", UMT5_XXL),
                 "LTX-Video 0.9 (2B)": ("T5-v1.1-XXL", T5_V1_1_XXL), "CogVideoX 2B": ("T5-v1.1-XXL", T5_V1_1_XXL),
                 "CogVideoX 5B": ("T5-v1.1-XXL", T5_V1_1_XXL)}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def transformer_counts(class_name: str, config: dict, rank: int) -> tuple[int, int]:
    """(transformer parameters, LoRA adapter parameters at ``rank``)."""
    import diffusers

    from framework.training.finetune import LoRA

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
        total = count(model)
        modules = nn.ModuleDict({"denoiser": model})
        LoRA(TARGETS, rank=rank).apply(modules)
    adapters = sum(p.numel() for p in modules.parameters() if p.requires_grad)
    return total, adapters


def encoder_count(spec: tuple[str, str, dict]) -> int:
    import transformers

    config_name, model_name, config = spec
    with torch.device("meta"):
        return count(getattr(transformers, model_name)(getattr(transformers, config_name)(**config)))


def table(rank: int) -> str:
    rows = ["| model | transformer params | full fine-tune (weights + grads + AdamW) | LoRA r=%d adapters | "
            "LoRA (frozen weights + adapter training) | frozen text encoder (bf16 weights) |" % rank,
            "|---|---|---|---|---|---|"]
    encoders: dict[str, int] = {}
    for name, (class_name, config) in TRANSFORMERS.items():
        total, adapters = transformer_counts(class_name, config, rank)
        encoder_name, spec = TEXT_ENCODERS[name]
        if encoder_name not in encoders:
            encoders[encoder_name] = encoder_count(spec)
        full = total * (2 + 2 + 8)
        lora = total * 2 + adapters * (2 + 2 + 8)
        rows.append(f"| {name} | {total / 1e9:.2f} B | {full / GIB:.1f} GiB | {adapters / 1e6:.1f} M | "
                    f"{lora / GIB:.1f} GiB | {encoder_name} {encoders[encoder_name] / 1e9:.2f} B: "
                    f"{encoders[encoder_name] * 2 / GIB:.1f} GiB |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    print(table(parser.parse_args().rank))


if __name__ == "__main__":
    main()
