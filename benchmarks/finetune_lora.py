"""Fine-tuning step cost: LoRA vs full fine-tune, ours vs a plain diffusers + peft loop, on a small random Wan
transformer (CPU), on identical inputs.

* **ours**: the ``DiffusersVideoTransformer`` denoiser plugin loaded from a local folder, adapted with
  ``framework.training.finetune.LoRA`` (or ``FullFineTuning``), trained with ``RectifiedFlow.training_loss`` on the
  packed latent positions, AdamW as ``VideoDiffusion`` configures it -- the path ``kinetoscope fit`` with
  ``examples/wan_lora.yaml`` runs, minus the (frozen) VAE and text encoder, which both sides would share;
* **diffusers + peft**: ``WanTransformer3DModel.from_pretrained`` of the same folder, ``transformer.add_adapter(
  LoraConfig(...))`` with the same rank, alpha and targets, the flow-matching loss written out in a plain loop.

Both see the same latents, text features and timesteps and run the same model FLOPs per step (counted with
``framework.training.flop_count`` and reported, not assumed). Each configuration runs in its own process (peak
memory is per process; the FLOPs are counted after the timed steps), ``--rounds`` times, the processes interleaved (ours, theirs, ours, ...) so drift in the
shared machine's load hits both; the JSON holds every round, the median and the spread.

Memory on CPU: ``training_mb`` is the process's peak resident set (``ru_maxrss``) minus its resident set just before
the first step (model, inputs and folder loaded), i.e. what the training steps added: gradients, AdamW states and
activations.

    python benchmarks/finetune_lora.py --threads 1          # writes benchmarks/results/finetune_lora/<run>.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of every block, as examples/wan_lora.yaml
CONFIGS = [("ours", "lora"), ("diffusers_peft", "lora"), ("ours", "full"), ("diffusers_peft", "full")]


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--model-width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def save_folder(args: argparse.Namespace, folder: Path) -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.model_width // args.heads,
        in_channels=args.channels, out_channels=args.channels, text_dim=args.text_dim, freq_dim=256,
        ffn_dim=4 * args.model_width, num_layers=args.depth,
    ).save_pretrained(folder)


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.frames, args.size, args.size)
    return {"clean": torch.randn(shape, generator=g), "noise": torch.randn(shape, generator=g),
            "text": torch.randn(args.batch, args.text_len, args.text_dim, generator=g),
            "t": torch.rand(args.batch, generator=g)}


def ours_step(args: argparse.Namespace, mode: str, data: dict[str, torch.Tensor]):
    """(step function, trainable parameter count) through our plugin, fine-tuning and loss."""
    from torch import nn

    from framework.core.interfaces import Conditioning, DenoiserIO
    from framework.layers.packing import PackedSequence
    from framework.training.finetune import FullFineTuning, LoRA
    from plugins.denoisers.diffusers_transformer import DiffusersVideoTransformer
    from plugins.samplers.rectified_flow import RectifiedFlow

    denoiser = DiffusersVideoTransformer(args.folder, subfolder=None, gradient_checkpointing=args.checkpointing)
    denoiser.bind(DenoiserIO(token_dim=args.channels, context_dim=args.text_dim, pooled_dim=1))
    method = LoRA(TARGETS, rank=args.rank) if mode == "lora" else FullFineTuning()
    method.apply(nn.ModuleDict({"denoiser": denoiser}))
    denoiser.train()
    sampler = RectifiedFlow()
    clean = PackedSequence.from_grids([x.permute(1, 2, 3, 0) for x in data["clean"]])  # latent positions [t, h, w, c]
    cond = Conditioning(data["text"], torch.ones(data["text"].shape[:2], dtype=torch.bool),
                        torch.zeros(args.batch, 1))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99))  # as VideoDiffusion.configure_optimizers

    def loss() -> torch.Tensor:
        return sampler.training_loss(lambda x, t: denoiser(x, t, cond), clean,
                                     generator=torch.Generator().manual_seed(0)).mean()

    return loss, optimizer, sum(p.numel() for p in params)


def diffusers_step(args: argparse.Namespace, mode: str, data: dict[str, torch.Tensor]):
    """(step function, trainable parameter count) of a plain diffusers + peft training loop."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    transformer = WanTransformer3DModel.from_pretrained(args.folder)
    if mode == "lora":
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS))
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99))
    clean, noise, text, t = data["clean"], data["noise"], data["text"], data["t"]

    def loss() -> torch.Tensor:
        sigma = t[:, None, None, None, None]
        noisy = (1 - sigma) * clean + sigma * noise
        prediction = transformer(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=text,
                                 return_dict=False)[0]
        return torch.nn.functional.mse_loss(prediction.float(), noise - clean)

    return loss, optimizer, sum(p.numel() for p in params)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    from framework.training.flop_count import count_flops

    torch.set_num_threads(args.threads)
    impl, mode = args.worker
    data = inputs(args)
    loss, optimizer, trainable = (ours_step if impl == "ours" else diffusers_step)(args, mode, data)
    before = rss_mb()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    flops = count_flops(lambda: loss().backward())  # forward + backward of one step, after the peak is read
    tokens = args.batch * args.frames * (args.size // 2) ** 2  # the transformer's (1, 2, 2) patches
    return {"impl": impl, "mode": mode, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_step": tokens, "flops_per_step": flops, "trainable_parameters": trainable,
            "rss_before_training_mb": before, "peak_rss_mb": peak, "training_mb": peak - before}


def main() -> None:
    args = arguments()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from benchmarks.results_store import save_result

    runs: dict[str, list[dict]] = {f"{impl}/{mode}": [] for impl, mode in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        save_folder(args, folder)
        passthrough = [a for a in sys.argv[1:]]
        for round_index in range(args.rounds):
            for impl, mode in CONFIGS if round_index % 2 == 0 else CONFIGS[::-1]:
                out = subprocess.run([sys.executable, __file__, *passthrough, "--folder", str(folder),
                                      "--worker", impl, mode], capture_output=True, text=True, timeout=1200,
                                     env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(f"{impl}/{mode} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[f"{impl}/{mode}"].append(result)
                print(f"round {round_index}: {impl:15s} {mode:5s} {result['tokens_per_s']:8.1f} tokens/s "
                      f"{result['training_mb']:7.1f} MB  {result['flops_per_step'] / 1e9:.2f} GFLOP/step",
                      flush=True)

    def summary(key: str) -> dict:
        rows = runs[key]
        speeds, memories = [r["tokens_per_s"] for r in rows], [r["training_mb"] for r in rows]
        return {"tokens_per_s_median": statistics.median(speeds), "tokens_per_s_min": min(speeds),
                "tokens_per_s_max": max(speeds), "training_mb_median": statistics.median(memories),
                "training_mb_min": min(memories), "training_mb_max": max(memories),
                "flops_per_step": rows[0]["flops_per_step"], "trainable_parameters": rows[0]["trainable_parameters"]}

    summaries = {key: summary(key) for key in runs}
    ratios = {mode: summaries[f"ours/{mode}"]["tokens_per_s_median"]
              / summaries[f"diffusers_peft/{mode}"]["tokens_per_s_median"] for mode in ("lora", "full")}
    payload = {
        "what": "fine-tuning training-step tokens/s and memory: LoRA vs full, ours (DiffusersVideoTransformer + "
                "framework.training.finetune + RectifiedFlow loss) vs a plain diffusers + peft loop, identical "
                "inputs, small random Wan transformer, CPU; rounds interleaved, one process per run",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "folder")},
        "lora_targets": TARGETS,
        "summary": summaries,
        "ours_over_diffusers_tokens_per_s": ratios,
        "runs": runs,
    }
    path = save_result("finetune_lora", payload)
    print(json.dumps({"summary": summaries, "ours_over_diffusers_tokens_per_s": ratios}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
