"""50-step sampling latency: ``VideoDiffusion`` with the open-weight Wan plugins vs diffusers' ``WanPipeline``, on the
same random Wan-architecture weights, prompt, noise, steps and guidance, in one run.

Both generate one video end to end (prompt encoding, ``--steps`` guided steps with the folder's scheduler, VAE
decode) from the same local folder. Differences in our path: the guided and unguided branches run as one batch of
two (the pipeline makes two transformer calls per step), and the prompt and negative prompt are encoded once.
Runs are interleaved (ours, theirs, ours, ...) because the CPU is shared; the ratio of medians is the figure, with
every run kept. The two outputs are also compared (max |difference|), so the timing is of the same computation.

    python benchmarks/pretrained_sampling.py                      # tiny-but-not-trivial Wan, 50 steps, 3 runs each
    python benchmarks/pretrained_sampling.py --compile            # also both transformers under torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.results_store import save_result  # noqa: E402


def build(folder: Path, width: int, layers: int, scheduler: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
    from pretrained_fixtures import tiny_t5_tokenizer, tiny_umt5, tiny_wan_transformer, tiny_wan_vae

    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    sched = (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
             if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler(shift=3.0))
    text_dim = 64
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=tiny_umt5(len(tokenizer), d_model=text_dim),
                       vae=tiny_wan_vae(z_dim=16), scheduler=sched,
                       transformer=tiny_wan_transformer(in_channels=16, text_dim=text_dim, width=width, layers=layers))
    pipe.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model-width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile both transformers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import WanPipeline

    from framework.modules.video_diffusion import VideoDiffusion
    from plugins.compressors.diffusers_video_vae import DiffusersVideoVAE
    from plugins.conditioners.t5_text import T5TextConditioner
    from plugins.denoisers.diffusers_transformer import DiffusersVideoTransformer
    from plugins.patchers.spacetime import SpacetimePatcher
    from plugins.samplers.diffusers_scheduler import DiffusersFlowScheduler

    caption, negative, seed = "a red square moving left on a black background", "blurry static", 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "wan"
        build(folder, args.model_width, args.layers, args.scheduler)
        ours = VideoDiffusion(DiffusersVideoVAE(folder), SpacetimePatcher(1, 1, 1), DiffusersVideoTransformer(folder),
                              T5TextConditioner(folder), DiffusersFlowScheduler(folder), sampling_steps=args.steps,
                              guidance_scale=args.guidance, compile_denoiser=args.compile).eval()
        pipe = WanPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        if args.compile:
            pipe.transformer = torch.compile(pipe.transformer)
        shape = ours.compressor.latent_shape(args.frames, args.height, args.width)
        noise = torch.randn(ours.compressor.latent_channels, *shape, generator=torch.Generator().manual_seed(seed))
        tokens = shape[0] * (shape[1] // 2) * (shape[2] // 2)

        def run_ours() -> torch.Tensor:
            with torch.no_grad():
                return ours.generate([caption], [(args.frames, args.height, args.width)], [seed],
                                     negative_prompts=[negative])[0]

        def run_theirs() -> torch.Tensor:
            out = pipe(caption, negative_prompt=negative, height=args.height, width=args.width,
                       num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       latents=noise[None], output_type="pt").frames[0]
            return out.permute(1, 0, 2, 3) * 2 - 1

        def timed(fn) -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            video = fn()
            return time.perf_counter() - start, video

        # warm-up (and compilation with --compile), then interleaved timed runs
        _, video_ours = timed(run_ours)
        _, video_theirs = timed(run_theirs)
        max_diff = float((video_ours - video_theirs).abs().max())
        with torch.no_grad():
            latent = ours.compressor.encode(video_ours[None])
            decode_s, _ = timed(lambda: ours.compressor.decode(latent))
        times_ours, times_theirs = [], []
        for _ in range(args.runs):
            times_ours.append(timed(run_ours)[0])
            times_theirs.append(timed(run_theirs)[0])
        median_ours, median_theirs = statistics.median(times_ours), statistics.median(times_theirs)
        payload = {
            "settings": vars(args), "tokens_per_branch": tokens, "latent_shape": list(shape),
            "transformer_parameters": sum(p.numel() for p in ours.denoiser.parameters()),
            "threads": torch.get_num_threads(),
            "ours_s": times_ours, "diffusers_s": times_theirs,
            "ours_median_s": median_ours, "diffusers_median_s": median_theirs,
            "ratio_ours_over_diffusers": median_ours / median_theirs,
            "per_run_ratios": [a / b for a, b in zip(times_ours, times_theirs)],
            "vae_decode_s": decode_s, "max_abs_video_difference": max_diff,
        }
    path = save_result("pretrained_sampling", payload)
    print(f"ours {median_ours:.2f} s, diffusers {median_theirs:.2f} s (medians of {args.runs}): "
          f"{median_ours / median_theirs:.3f}x; per run {[round(r, 3) for r in payload['per_run_ratios']]}; "
          f"VAE decode {decode_s:.2f} s; max |video difference| {max_diff:.2e}; {path}")


if __name__ == "__main__":
    main()
