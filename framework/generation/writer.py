"""Callbacks that turn predictions into files."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from framework.data.video_io import write_frame_grid, write_video


def write_tensor(path: Path, video, fps: float) -> Path:
    """The float video [3, T, H, W] as a safetensors file (written to a temporary name, then moved into place)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({"video": video.float().contiguous()}, str(tmp), metadata={"fps": repr(float(fps))})
    tmp.replace(path)
    return path


class VideoWriter(BasePredictionWriter):
    """Writes each generated video as MP4 (H.264) and/or GIF, a PNG frame grid, and an ``index.jsonl`` line (the
    prompt row's index, caption, task, size, seed, fps and files; a failed row's error instead of files).

    ``safetensors`` in ``formats`` also writes the decoded video losslessly (``{"video": float32 [3, T, H, W] in
    [-1, 1]}``, fps in the metadata): the exact output, for comparisons such as parity with a reference pipeline.

    Through ``kinetoscope``, a relative ``output_dir`` lies under ``trainer.default_root_dir``
    (``framework/cli/run_paths.py``)."""

    def __init__(self, output_dir: str = "samples", formats: list[str] | None = None, upscale: int = 4,
                 frame_grid: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.formats = list(formats) if formats is not None else ["mp4", "gif"]
        valid = {"mp4", "gif", "safetensors"}
        if unknown := [f for f in self.formats if f not in valid]:
            raise ValueError(f"VideoWriter: unknown formats {unknown}; valid choices: {sorted(valid)}")
        if upscale < 1:
            raise ValueError(f"VideoWriter: upscale must be >= 1, got {upscale}")
        self.upscale, self.frame_grid = upscale, frame_grid

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "index.jsonl").write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.output_dir / "index.jsonl", "a", encoding="utf-8") as index:
            for item in prediction:
                r = item.request
                if getattr(item, "error", None) is not None:  # a failed prompt row: recorded, nothing to write
                    index.write(json.dumps({"index": r.index, "caption": r.caption, "task": r.task.value,
                                            "error": item.error}) + "\n")
                    continue
                files = [write_tensor(self.output_dir / f"{r.name}.{fmt}", item.video, item.fps) if fmt == "safetensors"
                         else write_video(self.output_dir / f"{r.name}.{fmt}", item.video, item.fps, self.upscale)
                         for fmt in self.formats]
                if self.frame_grid:
                    files.append(write_frame_grid(self.output_dir / f"{r.name}.png", item.video, self.upscale))
                row = {"index": r.index, "caption": r.caption, "task": r.task.value, "frames": r.frames, "height": r.height,
                       "width": r.width, "seed": r.seed, "fps": item.fps, "files": [f.name for f in files]}
                index.write(json.dumps(row) + "\n")
