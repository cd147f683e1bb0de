"""Our DiT vs diffusers' WanTransformer3DModel of the same width, depth and heads, on the same input, in one run.

Measures, side by side and interleaved (the CPU is shared, so absolute timings are noisy; ratios within one run are
what matter):

* training-step throughput (tokens/s): forward, MSE loss, backward and an AdamW step, for the eager models with
  AdamW's default (foreach) and ``fused=True`` implementations, and optionally under ``torch.compile``;
* sampling latency for ``--sampling-steps`` (50) steps: our RectifiedFlow Euler sampler calling our DiT through
  ``guided_model_fn`` (as ``VideoDiffusion.generate`` does: caption keys/values prepared once per run) vs diffusers'
  ``FlowMatchEulerDiscreteScheduler`` driving the Wan transformer, both unguided; eager, and with ``--compile`` also
  both compiled (ours with ``framework.training.compilation.compile_in_place``, i.e. ``VideoDiffusion(compile_denoiser=True)``;
  diffusers' with ``torch.compile``).

Both models see 640 tokens by default: 2 clips of 16 latent channels x 5 x 16 x 16, patch 1x2x2 (320 tokens each),
16 caption tokens of width 64. Wan's FFN width is set to 4x the model width, like DiT's MLP. Model FLOPs per step
are counted with ``framework.training.flop_count`` (PyTorch's FlopCounterMode plus the CPU attention kernel it misses), not
estimated, and reported next to the throughput.

``--precision bf16`` runs forward and loss under ``torch.autocast(bfloat16)`` with fp32 weights and optimizer state
(what Lightning's ``precision="bf16-mixed"`` does), for both models. ``--device cuda`` moves both models and inputs to
the GPU and synchronises around every timed call. Model FLOPs utilisation (MFU) is the counted FLOPs per step over
the step time, divided by a peak: the card's dense spec figure for known GPUs (``GPU_PEAK_TFLOPS``, or
``--peak-tflops``), and in every case also the throughput of a large square matmul measured here at the same
precision (``measured_gemm_tflops``), the rate a perfect implementation's matmuls could reach on this machine.

    pip install -e .[diffusers]
    python benchmarks/dit_vs_diffusers.py --threads 1     # eager, a new benchmarks/results/dit_vs_diffusers/*.json
    python benchmarks/dit_vs_diffusers.py --compile       # also torch.compile (slow to compile on a small CPU)
    python benchmarks/dit_vs_diffusers.py --device cuda --precision bf16 --compile \
        --model-width 1152 --depth 28 --heads 16 --frames 8 --height 64 --width 64 \
        --out benchmarks/results/dit_vs_diffusers_h100_bf16.json   # DiT-XL widths on a GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from framework.training.compilation import compile_in_place
from framework.training.flop_count import counting_mode
from framework.generation.guidance import guided_model_fn
from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.packing import PackedSequence
from plugins.denoisers.dit import DiT
from plugins.samplers.rectified_flow import RectifiedFlow
from results_store import save_result  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]

GPU_PEAK_TFLOPS = {  # dense (no sparsity) tensor-core peaks from the vendors' data sheets, by substring of the name
    "bf16": {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0},
    "fp32": {"H200": 66.9, "H100 PCIe": 51.2, "H100": 66.9, "A100": 19.5},  # fp32 without TF32
}


def spec_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The data-sheet peak of this GPU at ``precision``, or None (CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS[precision].items() if key in name), None)


def measured_gemm_tflops(device: torch.device, precision: str, size: int) -> float:
    """TFLOP/s of a ``size`` x ``size`` x ``size`` matmul at ``precision``: the matmul rate this machine reaches."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args) -> AbstractContextManager:
    """bf16 autocast around forward and loss when ``--precision bf16`` (weights stay fp32), else a no-op."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def make_inputs(args) -> dict:
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(args.batch, args.channels, args.frames, args.height, args.width, generator=g)  # [B, C, T, H, W]
    target = torch.randn(latent.shape, generator=g)
    context = torch.randn(args.batch, args.context_len, args.context_dim, generator=g)  # [B, L, Dc]
    t = torch.rand(args.batch, generator=g)  # [B] in [0, 1]
    return {k: v.to(args.device) for k, v in {"latent": latent, "target": target, "context": context, "t": t}.items()}


def patchify(latent: torch.Tensor) -> PackedSequence:
    """[B, C, T, H, W] -> packed 1x2x2 patches (the same token grid Wan builds internally)."""
    grids = []
    for x in latent:  # [C, T, H, W]
        c, t, h, w = x.shape
        x = x.reshape(c, t, h // 2, 2, w // 2, 2).permute(1, 2, 4, 0, 3, 5)  # [t, h/2, w/2, C, 2, 2]
        grids.append(x.reshape(t, h // 2, w // 2, c * 4))  # [t, h/2, w/2, C*4]
    return PackedSequence.from_grids(grids)


class Ours:
    name = "kinetoscope DiT"

    def __init__(self, args, inputs) -> None:
        self.model = DiT(width=args.model_width, depth=args.depth, num_heads=args.heads)
        self.model.bind(DenoiserIO(token_dim=args.channels * 4, context_dim=args.context_dim,
                                   pooled_dim=args.context_dim))
        self.model.to(args.device)
        self.x = patchify(inputs["latent"])
        self.target = patchify(inputs["target"]).tokens
        mask = torch.ones(args.batch, args.context_len, dtype=torch.bool, device=args.device)
        self.cond = Conditioning(inputs["context"], mask, inputs["context"].mean(1))
        self.t = inputs["t"]
        self.args = args

    def loss(self, model) -> torch.Tensor:
        with autocast(self.args):
            prediction = model(self.x, self.t, self.cond).tokens  # [N, token_dim]
        return torch.nn.functional.mse_loss(prediction.float(), self.target)

    @staticmethod
    def compiled(model):
        return compile_in_place(copy.deepcopy(model))  # what VideoDiffusion(compile_denoiser=True) does

    @torch.no_grad()
    def sample(self, steps: int, model=None) -> torch.Tensor:
        model_fn = guided_model_fn(self.model if model is None else model, self.cond, None, 1.0)  # unguided, as generate() binds it
        with autocast(self.args):
            return RectifiedFlow(shift=3.0).sample(model_fn, self.x, steps).tokens


class Diffusers:
    name = "diffusers WanTransformer3DModel"

    def __init__(self, args, inputs) -> None:
        from diffusers import WanTransformer3DModel

        self.model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.model_width // args.heads,
            in_channels=args.channels, out_channels=args.channels, text_dim=args.context_dim, freq_dim=256,
            ffn_dim=4 * args.model_width, num_layers=args.depth,
        ).to(args.device)
        self.latent, self.target, self.context = inputs["latent"], inputs["target"], inputs["context"]
        self.timestep = inputs["t"] * 1000  # Wan takes timesteps in [0, 1000]
        self.args = args

    def loss(self, model) -> torch.Tensor:
        with autocast(self.args):
            out = model(self.latent, self.timestep, self.context, return_dict=False)[0]  # [B, C, T, H, W]
        return torch.nn.functional.mse_loss(out.float(), self.target)

    @staticmethod
    def compiled(model):
        return torch.compile(model)

    @torch.no_grad()
    def sample(self, steps: int, model=None) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        model = self.model if model is None else model
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        x = self.latent
        with autocast(self.args):
            for t in scheduler.timesteps.to(x.device):
                velocity = model(x, t.expand(x.shape[0]), self.context, return_dict=False)[0]
                x = scheduler.step(velocity, t, x, return_dict=False)[0]
        return x


def train_step_fn(system, fused: bool, compile_model: bool) -> Callable[[], None]:
    forward = system.compiled(system.model.train()) if compile_model else system.model.train()
    optimizer = torch.optim.AdamW(forward.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        loss = system.loss(forward)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def counted_flops(system) -> int:
    """Forward + backward FLOPs of one training step, counted by PyTorch's FLOP counter."""
    with counting_mode() as counter:
        system.loss(system.model.train()).backward()
    system.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_interleaved(
    fns: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and this thread's CPU seconds per call. On a shared machine the wall clock also counts the time
    other jobs held the core; the thread's CPU time does not (with one intra-op thread, all compute is on it).
    On a GPU the device is synchronised before and after each call, so the wall clock covers its kernels."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):  # alternate so that load spikes on the shared CPU hit every variant alike
        for name, fn in fns.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return wall, cpu


def time_sampling(
    samplers: dict[str, tuple[Ours | Diffusers, torch.nn.Module]], args
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up (and so compile) each sampler on one run of ``args.sampling_steps`` steps, then time such runs
    interleaved, like the training steps. The warm-up uses the timed step count: a compiled model may specialise
    on it (ours does not since guided_model_fn copies the timestep, tests/test_compile.py), and a recompile must
    not land in a timed run."""
    with torch.no_grad():
        for name, (system, model) in samplers.items():
            start = time.perf_counter()
            system.sample(args.sampling_steps, model)
            print(f"sample warm-up {name:28s} {time.perf_counter() - start:6.1f} s")
        return time_interleaved(
            {name: (lambda system=system, model=model: system.sample(args.sampling_steps, model))
             for name, (system, model) in samplers.items()},
            warmup=0, repeats=args.sampling_repeats, device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--context-len", type=int, default=16)
    parser.add_argument("--context-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--sampling-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: forward and loss under bf16 autocast, fp32 weights (Lightning's bf16-mixed)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak at --precision, for MFU (default: GPU_PEAK_TFLOPS for known GPUs)")
    parser.add_argument("--gemm-size", type=int, default=None,
                        help="side of the square matmul whose rate is the measured peak (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write here instead of a new file per run under benchmarks/results/dit_vs_diffusers/")
    args = parser.parse_args()
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = make_inputs(args)
    systems = {"ours": Ours(args, inputs), "diffusers": Diffusers(args, inputs)}
    tokens = args.batch * args.frames * (args.height // 2) * (args.width // 2)
    params = {k: sum(p.numel() for p in s.model.parameters()) for k, s in systems.items()}
    flops = {k: counted_flops(s) for k, s in systems.items()}
    print(f"{tokens} tokens per step; parameters {params}; counted train-step GFLOPs "
          f"{ {k: round(v / 1e9, 3) for k, v in flops.items()} }")
    gemm_size = args.gemm_size or (8192 if args.device.type == "cuda" else 2048)
    gemm_tflops = measured_gemm_tflops(args.device, args.precision, gemm_size)
    spec_tflops = args.peak_tflops or spec_peak_tflops(args.device, args.precision)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "cpu"
    print(f"{device_name}: {args.precision} {gemm_size}^3 matmul {gemm_tflops:.3f} TFLOP/s; "
          f"spec peak {spec_tflops or 'unknown'} TFLOP/s")

    variants = {}
    for key in systems:
        variants[f"{key}/eager/adamw_foreach"] = (key, False, False)
        variants[f"{key}/eager/adamw_fused"] = (key, True, False)
        if args.compile:
            variants[f"{key}/compiled/adamw_fused"] = (key, True, True)
    fns = {name: train_step_fn(systems[key], fused, compiled) for name, (key, fused, compiled) in variants.items()}
    times, cpu_times = time_interleaved(fns, args.warmup, args.repeats, args.device)
    train = {}
    for name, samples in times.items():
        median, median_cpu = statistics.median(samples), statistics.median(cpu_times[name])
        key = variants[name][0]
        achieved_tflops = flops[key] / median / 1e12
        train[name] = {"median_step_ms": round(1000 * median, 2), "tokens_per_s": round(tokens / median),
                       "achieved_gflops_per_s": round(1000 * achieved_tflops, 2),
                       "mfu_vs_measured_gemm": round(achieved_tflops / gemm_tflops, 4),
                       "mfu_vs_spec_peak": round(achieved_tflops / spec_tflops, 4) if spec_tflops else None,
                       "median_step_cpu_ms": round(1000 * median_cpu, 2)}
        mfu = f"MFU {100 * achieved_tflops / spec_tflops:.1f}% of spec, " if spec_tflops else ""
        print(f"train  {name:32s} {1000 * median:8.1f} ms/step  {tokens / median:9.0f} tokens/s  "
              f"({mfu}{100 * achieved_tflops / gemm_tflops:.1f}% of measured matmul rate; "
              f"CPU {1000 * median_cpu:.1f} ms)")
    ratios, cpu_ratios = {}, {}
    for variant in sorted({n.split("/", 1)[1] for n in train}):
        ratios[variant] = round(train[f"ours/{variant}"]["tokens_per_s"] / train[f"diffusers/{variant}"]["tokens_per_s"], 3)
        cpu_ratios[variant] = round(train[f"diffusers/{variant}"]["median_step_cpu_ms"]
                                    / train[f"ours/{variant}"]["median_step_cpu_ms"], 3)
    ratios["ours_best_vs_diffusers_eager_foreach"] = round(
        max(v["tokens_per_s"] for n, v in train.items() if n.startswith("ours/"))
        / train["diffusers/eager/adamw_foreach"]["tokens_per_s"], 3)
    print(f"throughput ratio ours / diffusers: {ratios}; by CPU time: {cpu_ratios}")

    samplers = {}
    for key, s in systems.items():
        s.model.eval()
        samplers[f"{key}/eager"] = (s, s.model)
        if args.compile:
            samplers[f"{key}/compiled"] = (s, s.compiled(s.model))
    sampling, sampling_cpu = time_sampling(samplers, args)
    modes = ["eager", "compiled"] if args.compile else ["eager"]

    def summarise(samples: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
        latency = {k: round(statistics.median(v), 3) for k, v in samples.items()}
        ratio = {mode: round(latency[f"ours/{mode}"] / latency[f"diffusers/{mode}"], 3) for mode in modes}
        if args.compile:
            ratio["ours_compiled_vs_diffusers_eager"] = round(latency["ours/compiled"] / latency["diffusers/eager"], 3)
        return latency, ratio

    latency, latency_ratio = summarise(sampling)
    cpu_latency, cpu_latency_ratio = summarise(sampling_cpu)
    print(f"sample {args.sampling_steps} steps: {latency} s; ours / diffusers = {latency_ratio}")
    print(f"sample {args.sampling_steps} steps, CPU time: {cpu_latency} s; ours / diffusers = {cpu_latency_ratio}")

    import diffusers

    result = {
        "what": "training-step tokens/s and sampling latency, kinetoscope DiT vs diffusers WanTransformer3DModel "
                "with identical width/depth/heads on identical input, interleaved in one run",
        "command": " ".join(["python", "benchmarks/dit_vs_diffusers.py", *sys.argv[1:]]),
        "device": str(args.device), "device_name": device_name, "threads": args.threads,
        "precision": "float32" if args.precision == "fp32" else "bf16 autocast, fp32 weights",
        "peak_tflops": {"measured_gemm": round(gemm_tflops, 4), "gemm_size": gemm_size, "spec": spec_tflops},
        "note": ("wall times with the GPU synchronised around each call; the *_cpu figures are host time only and "
                 "do not measure the GPU" if args.device.type == "cuda" else
                 "shared CPU (other jobs running): absolute times are noisy, ratios within this run are what matter; "
                 "the *_cpu figures are this thread's CPU time, which does not count time other jobs held the core"
                 + ("" if args.threads == 1 else
                    f"; with {args.threads} threads they count the calling thread only (it also waits for the "
                    "others), so the wall figures are the measure")),
        "config": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items() if k != "out"}
                  | {"tokens_per_step": tokens},
        "parameters": params, "train_step_gflops_counted": {k: round(v / 1e9, 4) for k, v in flops.items()},
        "train": train, "throughput_ratio_ours_over_diffusers": ratios,
        "throughput_ratio_ours_over_diffusers_cpu_time": cpu_ratios,
        "sampling": {"steps": args.sampling_steps, "median_latency_s": latency,
                     "latency_ratio_ours_over_diffusers": latency_ratio, "median_cpu_s": cpu_latency,
                     "cpu_time_ratio_ours_over_diffusers": cpu_latency_ratio},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
    }
    out = save_result("dit_vs_diffusers", result, path=args.out)  # default: a new file per run, earlier runs kept
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
