"""Peak CPU memory of CausalVAE decoding 17, 65 and 129 frames: whole clip vs tiled/chunked vs streamed.

Goal (issue 4): tiled peak at 129 frames within 1.1x of tiled at 17 frames.

Each case runs in a fresh subprocess, so peaks do not leak between cases. A case builds the model (random init;
memory does not depend on the weights), a random latent, runs one tiny warm-up decode, reads its resident set size
(VmRSS), decodes, and reports ``ru_maxrss - VmRSS before``: the extra memory the decode needed at its peak, output
tensor included. Modes:

* ``whole``: ``decode_latent`` on the whole clip at once (no tiling),
* ``tiled``: ``decode_tiled`` (causal-cache chunks of ``chunk_latent_frames`` latent frames, spatial tiles) into one
  preallocated output tensor, which itself grows with the frame count (3 x T x H x W float32),
* ``streamed``: ``decode_stream``, each piece dropped after use (as a writer that appends frames to a file would).

    python benchmarks/vae_memory.py [--size 128] [--preset SMALL]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plugins.compressors.causal_vae import CausalVAE, Tiling, VAESize  # noqa: E402
from results_store import save_result  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

FRAMES = (17, 65, 129)
MODES = ("whole", "tiled", "streamed")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_case(frames: int, mode: str, size: int, preset: str, latent_channels: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiling = Tiling()
    vae = CausalVAE(latent_channels=latent_channels, size=VAESize[preset], tiling=None).eval()
    t, h, w = vae.latent_shape(frames, size, size)
    z = torch.randn(1, latent_channels, t, h, w)  # [1, c, t, h, w]
    with torch.no_grad():
        vae.decode_latent(torch.randn(1, latent_channels, 2, 1, 1))  # warm-up: allocator, thread pool, kernels
    before = rss_kib()
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "whole":
            out_frames = vae.decode_latent(z).shape[2]
        elif mode == "tiled":
            out_frames = vae.decode_tiled(z, tiling).shape[2]
        else:
            out_frames = sum(piece.shape[2] for piece in vae.decode_stream(z, tiling))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert out_frames == frames
    return {"frames": frames, "mode": mode, "peak_extra_mib": round((peak - before) / 1024, 1),
            "output_mib": round(3 * frames * size * size * 4 / 2**20, 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="height = width in pixels")
    parser.add_argument("--preset", choices=[s.name for s in VAESize], default="SMALL")
    parser.add_argument("--latent-channels", type=int, default=8)
    parser.add_argument("--case", nargs=2, metavar=("FRAMES", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None,
                        help="write here instead of a new file per run under benchmarks/results/vae_memory/")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), args.case[1], args.size, args.preset, args.latent_channels)))
        return
    rows = []
    for frames in FRAMES:
        for mode in MODES:
            command = [sys.executable, __file__, "--case", str(frames), mode, "--size", str(args.size),
                       "--preset", args.preset, "--latent-channels", str(args.latent_channels)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    peak = {(r["frames"], r["mode"]): r["peak_extra_mib"] for r in rows}
    ratios = {mode: round(peak[(129, mode)] / peak[(17, mode)], 3) for mode in MODES}
    tiling = Tiling()
    result = {
        "benchmark": "vae_memory",
        "command": " ".join(["python", "benchmarks/vae_memory.py", *sys.argv[1:]]),
        "device": f"CPU ({platform.machine()}), torch {torch.__version__}, 1 thread, shared machine",
        "model": {"class": "CausalVAE", "preset": args.preset, "latent_channels": args.latent_channels,
                  "resolution": [args.size, args.size]},
        "tiling": {"tile_latent": tiling.tile_latent, "overlap_latent": tiling.overlap_latent,
                   "context_latent": tiling.context_latent, "chunk_latent_frames": tiling.chunk_latent_frames},
        "measure": "ru_maxrss minus VmRSS just before the decode, fresh subprocess per case (MiB)",
        "cases": rows,
        "peak_ratio_129_over_17": ratios,
        "goal_tiled_129_within_1.1x_of_17": ratios["tiled"] <= 1.1,
    }
    out = save_result("vae_memory", result, path=args.out)  # default: a new file per run, earlier runs kept
    print(json.dumps(ratios))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
