"""Reconstruction quality of a CausalVAE trained on CPU for a fixed wall-clock budget, on the real clips in
shared/data/videos, against down/up-sampling baselines that keep the same compression.

Split by *source* (no clip of a held-out source is trained on, its portrait crop included):
held out = blackswan (landscape + portrait), carphone (clip + still), kitesurfer.

Training (defaults, the recipe of configs/vae_train.yaml without its GAN): ``CompressorTraining`` with MSE + 1e-6
KL on a posterior sample, AdamW at 1e-3 after 100 linear warm-up steps, weights averaged (EMA 0.99), through a
Lightning Trainer with ``max_time`` (900 s, one thread), on batches of 4 random 48 x 48 crops of 9-, 5- and 1-frame
windows of the clips scaled to a short side of 128 px, decoded once and kept in memory. The VAE is the TINY preset
at base width 8 with 8 latent channels and the DCT shortcut.
Evaluation: centre 128 x 128 crops of the held-out clips (17 frames, or the longest 1 + 4k that fits), PSNR and
SSIM (torchmetrics, per frame, data range 2) of

* the VAE reconstruction (whole clip) and the tiled + chunked reconstruction (8-latent tiles, so 2 x 2 tiles),
* ``vae_untrained``: the same VAE before training, i.e. its fixed linear shortcut alone (``--shortcut dct``: the
  8 lowest DCT coefficients of each latent cell; what the training added is the difference to ``vae``),
* ``resample_same_factors``: 4x in time, 8x in space, 3 channels (fewer numbers than the 8-channel latent),
* ``resample_same_values``: 4x in time, sqrt(3 * 64 / c) in space (sqrt(24) ~ 4.9x for c = 8): as many numbers
  as the latent.

The CPU is shared by other jobs, so the step count reached in the budget varies between runs; it is reported.

    python benchmarks/vae_reconstruction.py [--budget-s 900] [--threads 1] [--latent-channels 8] ...  (--help)
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.functional.image import structural_similarity_index_measure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from framework.modules.compressor_training import CompressorTraining, psnr  # noqa: E402
from framework.data.video_io import read_video  # noqa: E402
from plugins.compressors.causal_vae import CausalVAE, ShortcutBasis, Tiling, VAESize  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "videos"
HELD_OUT_SOURCES = ("blackswan", "carphone", "kitesurfer")
SHORT_SIDE = 128
CROP = 48
MAX_FRAMES = 33  # longer clips are cut: memory, and 33 frames already give many 9-frame windows


def load_clip(path: Path) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1], scaled (area) so the short side is SHORT_SIDE px (never upscaled)."""
    video, _ = read_video(path, max_frames=MAX_FRAMES)  # [3, T, H, W]
    h, w = video.shape[-2:]
    scale = SHORT_SIDE / min(h, w)
    if scale < 1:
        size = (round(h * scale), round(w * scale))
        video = F.interpolate(video.transpose(0, 1), size=size, mode="area").transpose(0, 1)  # [3, T, h, w]
    return video.contiguous()


def load_split() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with open(DATA / "manifest.csv", newline="") as f:
        names = [row["path"] for row in csv.DictReader(f)]
    train, held_out = {}, {}
    for name in names:
        split = held_out if any(source in name for source in HELD_OUT_SOURCES) else train
        split[name] = load_clip(DATA / name)
    return train, held_out


class TrainingCurve(L.Callback):
    """Mean train/l1 over every 25 steps."""

    def __init__(self) -> None:
        self.window, self.points = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window.append(trainer.callback_metrics["train/l1"].item())
        if len(self.window) == 25:
            self.points.append([trainer.global_step, round(sum(self.window) / 25, 4)])
            self.window = []


class RandomCrops(IterableDataset):
    """Endless batches {"videos": [B x [3, T, crop, crop]]} with T drawn from (9, 9, 5, 1) per batch, cut from
    clips decoded once into memory."""

    def __init__(self, clips: dict[str, torch.Tensor], batch_size: int, crop: int = CROP, seed: int = 0) -> None:
        self.clips = [c for c in clips.values() if min(c.shape[-2:]) >= crop]
        self.batch_size, self.crop, self.seed = batch_size, crop, seed

    def __iter__(self):
        rng = random.Random(self.seed)
        while True:
            frames = rng.choice((9, 9, 5, 1))
            pool = [c for c in self.clips if c.shape[1] >= frames]
            crops = []
            for _ in range(self.batch_size):
                clip = rng.choice(pool)
                t0 = rng.randint(0, clip.shape[1] - frames)
                y0, x0 = rng.randint(0, clip.shape[2] - self.crop), rng.randint(0, clip.shape[3] - self.crop)
                crops.append(clip[:, t0 : t0 + frames, y0 : y0 + self.crop, x0 : x0 + self.crop].clone())
            yield {"videos": crops}


def eval_clip(clip: torch.Tensor) -> torch.Tensor:
    """Centre 128 x 128 crop of the first 1 + 4k (<= 17) frames -> [1, 3, T, 128, 128]."""
    frames = 1 + 4 * min(4, (clip.shape[1] - 1) // 4)
    h, w = clip.shape[-2:]
    y0, x0 = (h - SHORT_SIDE) // 2, (w - SHORT_SIDE) // 2
    return clip[None, :, :frames, y0 : y0 + SHORT_SIDE, x0 : x0 + SHORT_SIDE].contiguous()


def resample_baseline(video: torch.Tensor, temporal: int, spatial: float) -> torch.Tensor:
    """Down-sample ``video`` [1, 3, T, H, W] by ``temporal`` (keeping frame 0, like the causal latent) and by
    ``spatial`` (antialiased bilinear), then up-sample back (linear in time, bilinear in space)."""
    _, _, t, h, w = video.shape
    small_t = 1 + (t - 1) // temporal
    small_hw = (max(1, round(h / spatial)), max(1, round(w / spatial)))
    frames = video[0].transpose(0, 1)  # [T, 3, H, W]
    small = F.interpolate(frames, size=small_hw, mode="bilinear", antialias=True, align_corners=False)
    small = small[:: temporal] if t > 1 else small  # [t', 3, h', w']: frames 0, 4, 8, ...
    if t > 1:  # linear in time between kept frames
        flat = small.permute(1, 2, 3, 0).reshape(1, -1, small_t)  # [1, 3*h'*w', t']
        flat = F.interpolate(flat, size=t, mode="linear", align_corners=True)  # [1, 3*h'*w', T]
        small = flat.reshape(3, *small_hw, t).permute(3, 0, 1, 2)  # [T, 3, h', w']
    up = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)  # [T, 3, H, W]
    return up.transpose(0, 1)[None].clamp(-1, 1)  # [1, 3, T, H, W]


def scores(reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    frames_r, frames_t = reconstruction[0].transpose(0, 1), target[0].transpose(0, 1)  # [T, 3, H, W]
    ssim = structural_similarity_index_measure(frames_r.clamp(-1, 1), frames_t, data_range=2.0)
    return {"psnr_db": round(psnr(reconstruction, target).item(), 3), "ssim": round(float(ssim), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=900.0, help="training wall-clock budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--latent-channels", type=int, default=8)
    parser.add_argument("--base-channels", type=int, default=8, help="CausalVAE base width (TINY preset: 16)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--l1-weight", type=float, default=0.0)
    parser.add_argument("--mse-weight", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--crop", type=int, default=CROP)
    parser.add_argument("--shortcut", type=ShortcutBasis, default=ShortcutBasis.DCT, choices=list(ShortcutBasis))
    parser.add_argument("--posterior-mean", action="store_true", help="decode the posterior mean, not a sample")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vae_reconstruction.json")
    args = parser.parse_args()
    if not (DATA / "manifest.csv").is_file():
        sys.exit(f"no clips at {DATA} (needs shared/data/videos beside the repository)")
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    train, held_out = load_split()
    print(f"train clips: {len(train)}, held-out: {sorted(held_out)}")
    vae = CausalVAE(latent_channels=args.latent_channels, size=VAESize.TINY, base_channels=args.base_channels,
                    tiling=None, shortcut=args.shortcut)
    module = CompressorTraining(vae, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                                l1_weight=args.l1_weight, mse_weight=args.mse_weight, kl_weight=1e-6,
                                sample_posterior=not args.posterior_mean, ema_decay=args.ema_decay,
                                log_reconstructions_every_n_steps=0, statistics_batches=16)
    untrained = copy.deepcopy(vae).eval()  # step 0: the shortcut's linear autoencoder
    curve = TrainingCurve()
    trainer = L.Trainer(accelerator="cpu", max_time={"seconds": args.budget_s}, max_steps=-1, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir="/tmp/kinetoscope_vae_benchmark",
                        callbacks=[curve])
    start = time.perf_counter()
    trainer.fit(module, DataLoader(RandomCrops(train, args.batch_size, args.crop), batch_size=None))
    train_s = time.perf_counter() - start
    print(f"trained {trainer.global_step} steps in {train_s:.0f} s (incl. latent statistics)")

    vae.eval()
    tiling = Tiling(tile_latent=8, overlap_latent=4, context_latent=4, chunk_latent_frames=2)
    values_ratio = 3 * 4 * 64 / args.latent_channels  # input numbers per latent number (ignoring the first frame)
    rows = {}
    methods = ("vae", "vae_tiled", "vae_untrained", "resample_same_factors", "resample_same_values")
    with torch.no_grad():
        for name, clip in sorted(held_out.items()):
            video = eval_clip(clip)  # [1, 3, T, 128, 128]
            latent = vae.encode(video)
            whole = vae.decode(latent)
            vae.tiling = tiling
            tiled = vae.decode(vae.encode(video))
            vae.tiling = None
            rows[name] = {
                "frames": video.shape[2],
                "vae": scores(whole, video),
                "vae_tiled": scores(tiled, video),
                "vae_untrained": scores(untrained.decode(untrained.encode(video)), video),
                "tiled_vs_whole_psnr_db": round(psnr(tiled, whole).item(), 2),
                "resample_same_factors": scores(resample_baseline(video, 4, 8.0), video),
                "resample_same_values": scores(resample_baseline(video, 4, math.sqrt(3 * 64 / args.latent_channels)), video),
            }
            print(name, json.dumps(rows[name]))
    mean = {m: {k: round(sum(r[m][k] for r in rows.values()) / len(rows), 3) for k in ("psnr_db", "ssim")}
            for m in methods}
    result = {
        "benchmark": "vae_reconstruction",
        "command": " ".join(["python", "benchmarks/vae_reconstruction.py", *sys.argv[1:]]),
        "device": f"CPU ({platform.machine()}), torch {torch.__version__}, {args.threads} thread(s), shared",
        "model": {"class": "CausalVAE", "size": "TINY", "base_channels": args.base_channels,
                  "latent_channels": args.latent_channels, "shortcut": args.shortcut.value, "learning_rate": args.learning_rate,
                  "warmup_steps": args.warmup_steps, "l1_weight": args.l1_weight, "mse_weight": args.mse_weight,
                  "ema_decay": args.ema_decay, "sample_posterior": not args.posterior_mean,
                  "parameters": sum(p.numel() for p in vae.parameters()),
                  "input_values_per_latent_value": values_ratio},
        "training": {"budget_s": args.budget_s, "wall_s": round(train_s, 1), "steps": trainer.global_step,
                     "batch_size": args.batch_size, "crop": args.crop, "train_clips": sorted(train),
                     "train_l1_every_25_steps": curve.points},
        "held_out": rows,
        "mean_over_held_out": mean,
        "tiling": {"tile_latent": tiling.tile_latent, "overlap_latent": tiling.overlap_latent,
                   "context_latent": tiling.context_latent, "chunk_latent_frames": tiling.chunk_latent_frames},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(mean, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
