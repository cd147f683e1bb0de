"""Tiny random open-weight pipelines saved as local diffusers folders (nothing downloaded).

``save_tiny_wan(root)`` writes a Wan 2.1 text-to-video pipeline folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) built with ``from_config``-sized random
weights, and a word-level Unigram tokenizer made here with ``tokenizers`` and saved as a T5 tokenizer; the same for
LTX-Video (``save_tiny_ltx``) and a CogVideoX VAE (``save_tiny_cogvideox_vae``).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a red green blue yellow square circle moving left right up down on the black white gray background "
         "blurry static").split()


def tiny_t5_tokenizer():
    """A Unigram tokenizer over ``WORDS`` (plus single letters for anything else) with T5's special tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_ids=0)


def tiny_umt5(vocab_size: int, d_model: int = 16, umt5: bool = True):
    import transformers

    config_class = transformers.UMT5Config if umt5 else transformers.T5Config
    model_class = transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel
    config = config_class(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, dropout_rate=0.0)
    return model_class(config).eval()


def tiny_wan_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=(torch.randn(z_dim, generator=g) * 0.3).tolist(),
        latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist(),
    ).eval()


def tiny_wan_transformer(in_channels: int = 4, text_dim: int = 16, width: int = 32, layers: int = 2):
    from diffusers import WanTransformer3DModel

    heads = 2
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=width // heads, in_channels=in_channels,
        out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=2 * width, num_layers=layers,
        rope_max_seq_len=64,
    ).eval()


def save_tiny_wan(root: Path, scheduler: str = "euler", shift: float = 3.0, seed: int = 0, width: int = 32,
                  layers: int = 2) -> Path:
    """A Wan pipeline folder at ``root``; ``scheduler`` "euler" (FlowMatchEulerDiscreteScheduler) or "unipc"
    (UniPCMultistepScheduler with flow sigmas, Wan's default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    if scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=tiny_umt5(len(tokenizer)), vae=tiny_wan_vae(),
                       transformer=tiny_wan_transformer(width=width, layers=layers), scheduler=sched)
    pipe.save_pretrained(root)
    return Path(root)


def save_tiny_ltx(root: Path, seed: int = 0) -> Path:
    """An LTX-Video pipeline folder at ``root`` (T5 encoder, 4x time / 8x space VAE, patch-1 transformer)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ).eval()
    g = torch.Generator().manual_seed(2)
    vae.latents_mean.copy_(torch.randn(8, generator=g) * 0.3)
    vae.latents_std.copy_(torch.rand(8, generator=g) + 0.5)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    ).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=sched, vae=vae, text_encoder=tiny_umt5(len(tokenizer), umt5=False),
                       tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(root)
    return Path(root)


def save_tiny_cogvideox_vae(root: Path) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    vae.save_pretrained(root)
    return Path(root)
