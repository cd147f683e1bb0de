"""Encode / decode throughput of CausalVAE side by side with diffusers' Wan 2.1 video VAE (``AutoencoderKLWan``) of
the same size, both randomly initialised, in one run on the same CPU.

Comparable size: both are causal 3D VAEs with 4x time / 8x space compression; the Wan VAE is configured with the
same base width (32), channel multipliers (1, 2, 4, 4), ResBlocks per level (1) and latent channels (8) as
``CausalVAE(size=SMALL, latent_channels=8)`` (Wan keeps a mid-block attention layer, so it has a few more weights).
Wan always processes time in causal chunks (1 frame, then 4) with its feature cache; CausalVAE is timed both on the
whole clip and with its ``Tiling`` (causal-cache chunks; a single spatial tile at this size).

Timing: best of ``--repeats`` runs after one warm-up, 1 thread. The CPU is shared with other jobs, so absolute
numbers are noisy; the ratios within one run are what matter. Needs ``pip install 'kinetoscope[diffusers]'``.

    python benchmarks/vae_throughput.py [--frames 17] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plugins.compressors.causal_vae import CausalVAE, Tiling, VAESize  # noqa: E402


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vae_throughput.json")
    args = parser.parse_args()
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        sys.exit("needs diffusers: pip install 'kinetoscope[diffusers]'")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    latent_channels = 8
    ours = CausalVAE(latent_channels=latent_channels, size=VAESize.SMALL, tiling=None).eval()
    wan = AutoencoderKLWan(base_dim=32, z_dim=latent_channels, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * latent_channels,
                           latents_std=[1.0] * latent_channels).eval()
    video = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1  # [1, 3, T, H, W]
    tiling = Tiling()
    with torch.no_grad():
        z_ours = ours.posterior(video).mean  # [1, 8, t, h, w]
        z_wan = wan.encode(video).latent_dist.mode()  # [1, 8, t, h, w]
        assert z_ours.shape == z_wan.shape, (z_ours.shape, z_wan.shape)
        cases = {
            "CausalVAE (whole clip)": (lambda: ours.posterior(video).mean, lambda: ours.decode_latent(z_ours)),
            "CausalVAE (Tiling chunks)": (lambda: ours.encode_tiled(video, tiling),
                                          lambda: ours.decode_tiled(z_ours, tiling)),
            "diffusers AutoencoderKLWan": (lambda: wan.encode(video).latent_dist.mode(),
                                           lambda: wan.decode(z_wan).sample),
        }
        parameters = {"CausalVAE": sum(p.numel() for p in ours.parameters()),
                      "diffusers AutoencoderKLWan": sum(p.numel() for p in wan.parameters())}
        rows = {}
        for name, (encode, decode) in cases.items():
            encode_s, decode_s = best_seconds(encode, args.repeats), best_seconds(decode, args.repeats)
            rows[name] = {"encode_s": round(encode_s, 3), "decode_s": round(decode_s, 3),
                          "encode_frames_per_s": round(args.frames / encode_s, 2),
                          "decode_frames_per_s": round(args.frames / decode_s, 2)}
            print(name, json.dumps(rows[name]), flush=True)
    import diffusers

    reference = rows["diffusers AutoencoderKLWan"]
    result = {
        "benchmark": "vae_throughput",
        "command": " ".join(["python", "benchmarks/vae_throughput.py", *sys.argv[1:]]),
        "device": f"CPU ({platform.machine()}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
        "1 thread, shared machine (noisy; compare ratios)",
        "input": {"frames": args.frames, "height": args.size, "width": args.size,
                  "latent": list(z_ours.shape[1:])},
        "parameters": parameters,
        "results": rows,
        "speed_vs_wan": {name: {"encode": round(reference["encode_s"] / r["encode_s"], 2),
                                "decode": round(reference["decode_s"] / r["decode_s"], 2)}
                         for name, r in rows.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["speed_vs_wan"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
