"""Packed mixed-size batches vs uniform batches vs padding, in model FLOP/s.

Native-size training packs samples of different sizes into one token sequence (``PackedSequence``) with
block-diagonal attention. This measures one DiT training step (forward + backward) on:

* ``uniform``: B samples of one size (attention as one dense SDPA call) -- the reference;
* ``packed``: samples of mixed sizes and aspect ratios with the same total token count (``auto`` backend:
  per-sample SDPA on CPU, xformers on CUDA);
* ``padded``: the same mixed samples padded to the longest one and run as a uniform batch -- what a framework without
  packing computes.

Attention cost grows with each sample's length, so token throughput is not comparable across compositions; every
run is normalised by the model's own FLOP count (``DiT.flops_per_token``, forward x 3 for forward + backward) and
counts only useful (unpadded) tokens. Goal: packed >= 0.95x the uniform FLOP/s. Timings interleave the three runs;
ratios are given from the fastest repeat (least disturbed by other jobs on a shared CPU) and from the median.

    python benchmarks/packing_throughput.py            # -> a new benchmarks/results/packing_throughput/*.json per run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from framework.layers.attention import AttentionBackend, resolve_backend
from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.packing import PackedSequence
from plugins.denoisers.dit import DiT
from results_store import save_result  # benchmarks/ is on sys.path when a script here runs

CONTEXT_LEN, CONTEXT_DIM, TOKEN_DIM = 16, 64, 48

# Token grids (t, h, w). The uniform batch: 6 samples of 8x12x12 = 1152 tokens (6912 in all). The mixed batch has the
# same 6912 tokens: 16:9, 9:16, 1:1 and 4:3 clips of different lengths, and stills.
UNIFORM = [(8, 12, 12)] * 6
MIXED = [(8, 9, 16), (8, 16, 9), (4, 12, 16), (6, 12, 12), (2, 18, 32), (1, 16, 16), (1, 12, 16), (2, 16, 12),
         (1, 16, 24), (4, 9, 16), (1, 4, 8)]


def make_pack(grids: list[tuple[int, int, int]], device: torch.device, generator: torch.Generator) -> PackedSequence:
    return PackedSequence.from_grids(
        [torch.randn(*g, TOKEN_DIM, generator=generator) for g in grids]
    ).to(device)


def step_flops(model: DiT, seqlens: list[int]) -> float:
    """Forward + backward FLOPs (3x forward) of the blocks for samples of these token counts."""
    return 3.0 * sum(n * model.flops_per_token(n, CONTEXT_LEN) for n in seqlens)


def conditioning(batch: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> Conditioning:
    return Conditioning(
        torch.randn(batch, CONTEXT_LEN, CONTEXT_DIM, generator=generator).to(device, dtype),  # [B, L, Dc]
        torch.ones(batch, CONTEXT_LEN, dtype=torch.bool, device=device),  # [B, L]
        torch.randn(batch, CONTEXT_DIM, generator=generator).to(device, dtype),  # [B, Dp]
    )


def train_step(model: DiT, pack: PackedSequence, cond: Conditioning, timestep: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(pack, timestep, cond)  # [N, token_dim]
    out.tokens.float().square().mean().backward()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(width: int, depth: int, heads: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    model = DiT(width=width, depth=depth, num_heads=heads)
    model.bind(DenoiserIO(TOKEN_DIM, CONTEXT_DIM, CONTEXT_DIM))
    model.to(device=device, dtype=dtype).train()

    longest = max(MIXED, key=lambda s: s[0] * s[1] * s[2])
    cases = {"uniform": UNIFORM, "packed": MIXED, "padded": [longest] * len(MIXED)}
    useful_tokens = {"uniform": sum(t * h * w for t, h, w in UNIFORM), "packed": sum(t * h * w for t, h, w in MIXED)}
    useful_tokens["padded"] = useful_tokens["packed"]
    assert useful_tokens["uniform"] == useful_tokens["packed"], useful_tokens
    inputs = {}
    for name, grids in cases.items():
        pack = make_pack(grids, device, g).to(dtype=dtype)
        inputs[name] = (pack, conditioning(len(grids), device, dtype, g), torch.rand(len(grids), generator=g).to(device))
    useful_flops = {
        "uniform": step_flops(model, [t * h * w for t, h, w in UNIFORM]),
        "packed": step_flops(model, [t * h * w for t, h, w in MIXED]),
    }
    useful_flops["padded"] = useful_flops["packed"]  # the padded run does the packed run's useful work
    computed_flops = dict(useful_flops, padded=step_flops(model, [inputs["padded"][0].seqlens[0]] * len(MIXED)))

    times: dict[str, list[float]] = {name: [] for name in cases}
    for name in cases:  # warm-up (allocator, kernels)
        train_step(model, *inputs[name])
    for _ in range(repeats):
        for name in cases:
            times[name].append(timed(lambda: train_step(model, *inputs[name]), device))

    results = {}
    for name in cases:
        pack = inputs[name][0]
        seconds, best = statistics.median(times[name]), min(times[name])
        results[name] = {
            "samples": pack.num_samples,
            "tokens_computed": int(pack.tokens.shape[0]),
            "useful_tokens": useful_tokens[name],
            "attention_backend": resolve_backend(AttentionBackend.AUTO, pack, pack.tokens.device).value,
            "median_step_s": round(seconds, 4),
            "min_step_s": round(best, 4),
            "all_step_s": [round(t, 4) for t in times[name]],
            "useful_gflop_per_step": round(useful_flops[name] / 1e9, 3),
            "computed_gflop_per_step": round(computed_flops[name] / 1e9, 3),
            "useful_gflop_per_s": round(useful_flops[name] / seconds / 1e9, 3),
            "useful_gflop_per_s_best": round(useful_flops[name] / best / 1e9, 3),
        }
    uniform, uniform_best = results["uniform"]["useful_gflop_per_s"], results["uniform"]["useful_gflop_per_s_best"]
    return {
        "model": {"width": width, "depth": depth, "num_heads": heads, "context_len": CONTEXT_LEN},
        "grids": {name: [list(g) for g in grids] for name, grids in cases.items()},
        "runs": results,
        "packed_vs_uniform_flops_ratio": round(results["packed"]["useful_gflop_per_s_best"] / uniform_best, 3),
        "padded_vs_uniform_flops_ratio": round(results["padded"]["useful_gflop_per_s_best"] / uniform_best, 3),
        "packed_vs_uniform_flops_ratio_median": round(results["packed"]["useful_gflop_per_s"] / uniform, 3),
        "padded_vs_uniform_flops_ratio_median": round(results["padded"]["useful_gflop_per_s"] / uniform, 3),
        "padding_wasted_compute_pct": round(100 * (1 - useful_flops["padded"] / computed_flops["padded"]), 1),
        "padding_wasted_tokens_pct": round(
            100 * (1 - useful_tokens["padded"] / results["padded"]["tokens_computed"]), 1),
        "goal": "packed_vs_uniform_flops_ratio >= 0.95",
    }


def machine(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "commit": commit,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: steadier timings when other jobs share the cores)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write here instead of a new file per run under benchmarks/results/packing_throughput/")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    report = {"benchmark": "packing_throughput", "machine": machine(device), "dtype": str(dtype),
              "note": "CPU shared with other jobs: absolute times are noisy, ratios within one run are what matter",
              **run(args.width, args.depth, args.heads, args.repeats, device, dtype)}
    output = save_result("packing_throughput", report, path=args.output)  # default: a new file per run
    for name, r in report["runs"].items():
        print(f"{name:8s} {r['attention_backend']:9s} tokens {r['tokens_computed']:6d} (useful {r['useful_tokens']}) "
              f"step {r['min_step_s']:.3f}s best, {r['median_step_s']:.3f}s median  "
              f"useful {r['useful_gflop_per_s_best']:.1f} GFLOP/s best")
    print(f"packed / uniform FLOP/s: {report['packed_vs_uniform_flops_ratio']} best, "
          f"{report['packed_vs_uniform_flops_ratio_median']} median  (goal >= 0.95)")
    print(f"padded / uniform FLOP/s: {report['padded_vs_uniform_flops_ratio']} best, "
          f"{report['padded_vs_uniform_flops_ratio_median']} median  "
          f"(padding wastes {report['padding_wasted_compute_pct']}% of the compute)")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
