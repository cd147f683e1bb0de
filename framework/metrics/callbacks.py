"""``VideoMetrics``: every N epochs (or steps) generate a fixed, seeded prompt set and score it against real clips.

Each evaluation samples the same captions with the same seeds (so successive numbers differ only because the model
changed), computes FVD (+ KID) against a reference set and the temporal-consistency metrics of both sets
(:class:`framework.metrics.evaluation.VideoMetricSuite`), logs them to every Lightning logger under ``eval/``, appends
them to ``<output_dir>/metrics.jsonl``, writes ``<output_dir>/step_<N>.json`` and a PNG grid of the generated videos
(one row per prompt, one column per frame). The reference set is embedded once and kept across evaluations.

Reference sets are typed (``ReferenceVideos`` subclasses), so YAML picks one by ``class_path``:
:class:`SyntheticReference` renders the built-in moving-shapes clips (and can supply the prompts: their captions),
:class:`ManifestReference` reads a folder or manifest of real clips with ``framework.data.video_io.read_video``.
In DDP every rank generates and embeds its share of the prompts; the metric states are summed across ranks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.data.synthetic import SyntheticMovingShapes
from framework.data.video_io import RGBConversion, write_frame_grid
from framework.metrics.evaluation import VideoMetricSuite, load_videos
from framework.metrics.fvd import FrechetVideoDistance, FVDPreset
from framework.training.ema import ema_weights

__all__ = ["ManifestReference", "ReferenceVideos", "SyntheticReference", "VideoMetrics", "stack_rows"]

log = logging.getLogger("kinetoscope.metrics")


class ReferenceVideos:
    """A fixed set of real clips to compare generated videos with."""

    def load(self, conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA) -> tuple[list[Tensor], list[str]]:
        """-> (videos, each [3, T, H, W] in [-1, 1]; their captions, "" where unknown). Files are decoded with
        ``conversion`` (the FVD protocol's)."""
        raise NotImplementedError


class SyntheticReference(ReferenceVideos):
    """The first ``num_videos`` clips of ``SyntheticMovingShapes`` at one (frames, height, width) size."""

    def __init__(self, num_videos: int = 16, frames: int = 16, height: int = 32, width: int = 32,
                 object_size: int = 5, speed: int = 1, seed: int = 1234) -> None:
        self.dataset = SyntheticMovingShapes(num_samples=num_videos, sizes=[(frames, height, width)],
                                             object_size=object_size, speed=speed, seed=seed)

    def load(self, conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA) -> tuple[list[Tensor], list[str]]:
        items = [self.dataset[i] for i in range(len(self.dataset))]  # rendered, not decoded: no conversion
        return [item["video"] for item in items], [item["caption"] for item in items]


class ManifestReference(ReferenceVideos):
    """Clips of a folder (``.mp4``/``.gif``) or a ``.csv``/``.jsonl`` manifest; unreadable files are skipped."""

    def __init__(self, path: str, max_videos: int | None = None, max_frames: int | None = None) -> None:
        self.path, self.max_videos, self.max_frames = path, max_videos, max_frames

    def load(self, conversion: RGBConversion = RGBConversion.BICUBIC_FULL_CHROMA) -> tuple[list[Tensor], list[str]]:
        loaded = load_videos(self.path, self.max_videos, self.max_frames, conversion=conversion)
        for path, why in loaded.skipped.items():
            log.warning("ManifestReference: skipped %s: %s", path, why)
        return loaded.videos, loaded.captions


def stack_rows(videos: list[Tensor]) -> Tensor:
    """Stack videos [3, T_i, H_i, W_i] vertically into one [3, max T, ΣH, max W] (padding -1 = black) for a grid."""
    frames = max(v.shape[1] for v in videos)
    width = max(v.shape[3] for v in videos)
    rows = [F.pad(v, (0, width - v.shape[3], 0, 0, 0, frames - v.shape[1]), value=-1.0) for v in videos]
    return torch.cat(rows, dim=2)  # [3, T, ΣH, W]


class VideoMetrics(L.Callback):
    """Generate ``captions`` (or the reference captions) at ``frames``×``height``×``width`` with seeds
    ``seed, seed+1, ...`` every ``every_n_epochs`` epochs (or ``every_n_steps`` steps) and score them.

    ``fvd_feature_extractor``: ``None`` loads the real TF-Hub I3D (``kinetoscope fetch-i3d`` first); any module
    with ``num_features`` works (tests pass a random ``InceptionI3D``); ``compute_fvd=False`` skips FVD.
    ``fvd_protocol`` names the preprocessing (``ORIGINAL_TF1``, ``STYLEGAN_V``, ...; recorded with every result);
    ``fvd_clip_length`` overrides its clip length, whose span must not exceed ``frames``; I3D needs at least 9.
    """

    def __init__(self, reference: ReferenceVideos, captions: list[str] | None = None, num_prompts: int = 8,
                 frames: int = 16, height: int = 32, width: int = 32, seed: int = 0,
                 every_n_epochs: int = 1, every_n_steps: int | None = None, sampling_steps: int | None = None,
                 guidance_scale: float | None = None, compute_fvd: bool = True,
                 fvd_feature_extractor: nn.Module | None = None, fvd_protocol: FVDPreset = FVDPreset.ORIGINAL_TF1,
                 fvd_clip_length: int | None = None, kid_subsets: int = 0,
                 temporal: bool = True, output_dir: str = "runs/eval", grid_upscale: int = 4) -> None:
        super().__init__()
        if every_n_epochs < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError(f"VideoMetrics: every_n_epochs/every_n_steps must be >= 1, got "
                             f"{every_n_epochs}/{every_n_steps}")
        self.fvd_protocol = fvd_protocol.value.with_overrides(fvd_clip_length)
        if compute_fvd and self.fvd_protocol.span > frames:
            raise ValueError(f"VideoMetrics: FVD protocol {self.fvd_protocol.name} needs {self.fvd_protocol.span} "
                             f"frames (clip_length {self.fvd_protocol.clip_length}, stride "
                             f"{self.fvd_protocol.frame_stride}), more than the generated frames={frames}")
        if compute_fvd and num_prompts < 2:
            raise ValueError(f"VideoMetrics: FVD needs at least 2 generated videos, got num_prompts={num_prompts}")
        self.reference, self.captions, self.num_prompts = reference, captions, num_prompts
        self.size = (frames, height, width)
        self.seed, self.every_n_epochs, self.every_n_steps = seed, every_n_epochs, every_n_steps
        self.sampling_steps, self.guidance_scale = sampling_steps, guidance_scale
        self.compute_fvd, self.fvd_feature_extractor = compute_fvd, fvd_feature_extractor
        self.kid_subsets, self.temporal = kid_subsets, temporal
        self.output_dir, self.grid_upscale = Path(output_dir), grid_upscale
        self.suite: VideoMetricSuite | None = None
        self.prompts: list[str] = []
        self.history: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.suite is not None:
            return
        fvd = None
        if self.compute_fvd:
            extractor = self.fvd_feature_extractor
            if extractor is None:
                from framework.metrics.i3d_weights import load_i3d

                extractor = load_i3d()
            fvd = FrechetVideoDistance(extractor, self.fvd_protocol, kid_subsets=self.kid_subsets)
        self.suite = VideoMetricSuite(fvd, temporal=self.temporal).to(pl_module.device)
        videos, captions = self.reference.load(self.fvd_protocol.decode)
        if fvd is not None and self.fvd_protocol.skip_short_videos:
            short = [i for i, v in enumerate(videos) if v.shape[1] < self.fvd_protocol.span]
            if short:
                log.warning("VideoMetrics: %d reference videos are shorter than the %d frames of FVD protocol %s "
                            "and are left out", len(short), self.fvd_protocol.span, self.fvd_protocol.name)
            videos = [v for i, v in enumerate(videos) if i not in short]
            captions = [c for i, c in enumerate(captions) if i not in short]
        if fvd is not None and len(videos) < 2:
            raise ValueError(f"VideoMetrics: the reference set has {len(videos)} videos; FVD needs at least 2")
        self.prompts = list(self.captions) if self.captions else [c for c in captions if c][: self.num_prompts]
        if not self.prompts:
            raise ValueError("VideoMetrics: no captions given and the reference set has none")
        rank, world = trainer.global_rank, trainer.world_size
        self.suite.update(videos[rank::world], real=True)

    def _due(self, trainer: L.Trainer, epoch_end: bool) -> bool:
        if trainer.sanity_checking:
            return False
        if self.every_n_steps is not None:
            return not epoch_end and trainer.global_step % self.every_n_steps == 0
        return epoch_end and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(trainer, epoch_end=False):
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer, epoch_end=True):
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate the prompt set, score it, log and write files; returns the metrics."""
        assert self.suite is not None, "VideoMetrics.setup() has not run"
        rank, world = trainer.global_rank, trainer.world_size
        indices = list(range(len(self.prompts)))[rank::world]
        # With EMACallback in the trainer the averaged weights generate, as they do for predict.
        with ema_weights(trainer, pl_module):
            videos = pl_module.pipeline().generate(
                [self.prompts[i] for i in indices], [self.size] * len(indices), [self.seed + i for i in indices],
                self.sampling_steps, self.guidance_scale)
        self.suite.update(videos, real=False)
        results = self.suite.compute()
        self.suite.reset(keep_real=True)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in results.items()}, step=step)
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "epoch": trainer.current_epoch, "metrics": results,
                      "fvd_protocol": self.fvd_protocol.record() if self.compute_fvd else None,
                      "prompts": self.prompts, "seeds": [self.seed + i for i in range(len(self.prompts))]}
            (self.output_dir / f"step_{step:07d}.json").write_text(json.dumps(record, indent=2) + "\n")
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as history:
                history.write(json.dumps(record) + "\n")
            grid = stack_rows(videos)  # [3, T, ΣH, W]
            write_frame_grid(self.output_dir / f"step_{step:07d}_grid.png", grid, upscale=self.grid_upscale)
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_video"):  # TensorBoard: [N, T, C, H, W] in [0, 1]
                    experiment.add_video("eval/samples", ((grid.transpose(0, 1)[None] + 1) / 2).clamp(0, 1),
                                         global_step=step, fps=4)
            self.history.append(record)
        return results
