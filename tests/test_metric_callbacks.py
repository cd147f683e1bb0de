"""The VideoMetrics callback in a fast_dev_run training (random I3D, tiny clips), and ``kinetoscope evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from framework.cli.main import main
from framework.data.datamodules import SyntheticVideoDataModule
from framework.data.synthetic import SyntheticMovingShapes
from framework.metrics.callbacks import ManifestReference, SyntheticReference, VideoMetrics, stack_rows
from framework.metrics.i3d import InceptionI3D
from framework.modules import VideoDiffusion
from framework.data.video_io import write_video
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow

FLOW_KEYS = ("warping_error", "motion_smoothness", "dynamic_degree", "temporal_flickering", "frame_consistency")


def tiny_model() -> VideoDiffusion:
    return VideoDiffusion(PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
                          HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(), sampling_steps=2)


def test_video_metrics_callback_runs_in_fast_dev_run(tmp_path):
    torch.manual_seed(0)
    callback = VideoMetrics(
        SyntheticReference(num_videos=2, frames=9, height=16, width=16), num_prompts=2, frames=9, height=16,
        width=16, fvd_feature_extractor=InceptionI3D(), fvd_clip_length=9, output_dir=str(tmp_path / "eval"),
    )
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(tiny_model(), SyntheticVideoDataModule(num_samples=8, sizes=[(4, 16, 16)], batch_size=4))

    record = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[0])
    metrics = record["metrics"]
    assert metrics["fvd"] > 0  # an untrained model's noise is far from the moving-shapes clips
    for key in FLOW_KEYS:
        assert f"fake/{key}" in metrics and f"real/{key}" in metrics
    # The reference clips (the first 2 synthetic clips) are the prompts: same captions, fixed seeds.
    assert record["prompts"] == [c for _, c in zip(range(2), SyntheticReference(2, 9, 16, 16).load()[1])]
    assert record["seeds"] == [0, 1]
    grid = Image.open(tmp_path / "eval" / f"step_{record['step']:07d}_grid.png")
    assert grid.size == (9 * 16 * 4 + 8, 2 * 16 * 4)  # 9 frames per row, 2 prompts stacked, upscale 4, 1 px gaps
    # Repeating the evaluation reuses the reference statistics and regenerates the same seeded videos.
    again = callback.evaluate(trainer, trainer.lightning_module)
    assert again["fvd"] == pytest.approx(metrics["fvd"], rel=1e-6)
    assert again["real/temporal_flickering"] == pytest.approx(metrics["real/temporal_flickering"])


def test_callback_rejects_impossible_settings():
    reference = SyntheticReference(num_videos=2, frames=8, height=16, width=16)
    with pytest.raises(ValueError, match="fvd_clip_length=16 exceeds the generated frames=8"):
        VideoMetrics(reference, frames=8)
    with pytest.raises(ValueError, match="at least 2 generated videos"):
        VideoMetrics(reference, num_prompts=1, frames=16)


def test_stack_rows_pads_mixed_sizes():
    grid = stack_rows([torch.zeros(3, 2, 4, 6), torch.ones(3, 3, 5, 4)])
    assert grid.shape == (3, 3, 9, 6)
    assert grid[:, 2, :4].eq(-1).all() and grid[:, :, 4:, 4:].eq(-1).all()


def write_clips(folder: Path, videos: list[torch.Tensor]) -> None:
    for i, video in enumerate(videos):
        write_video(folder / f"clip_{i}.mp4", video, fps=8)


def test_evaluate_command_writes_json_and_markdown(tmp_path, capsys):
    clips = [SyntheticMovingShapes(4, sizes=[(6, 32, 32)], seed=0)[i]["video"] for i in range(4)]
    write_clips(tmp_path / "real", clips[:2])
    write_clips(tmp_path / "fake", [c.flip(1) for c in clips[2:]])  # played backwards
    (tmp_path / "fake" / "broken.mp4").write_bytes(b"not a video")
    code = main(["evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--no-fvd",
                 "--output", str(tmp_path / "report")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["real_videos"] == 2 and report["fake_videos"] == 2
    assert str(tmp_path / "fake" / "broken.mp4") in report["skipped"]
    assert 0 < report["metrics"]["fake/temporal_flickering"] <= 1
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| temporal_flickering |" in markdown and "broken.mp4" in markdown


def test_evaluate_command_reports_short_clips_and_small_sets(tmp_path, capsys):
    clips = [SyntheticMovingShapes(3, sizes=[(6, 32, 32)], seed=0)[i]["video"] for i in range(3)]
    write_clips(tmp_path / "real", clips[:2])
    write_clips(tmp_path / "fake", clips[2:])
    args = ["evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--random-i3d",
            "--output", str(tmp_path / "report")]
    assert main(args) == 1
    assert "fewer than the 16 frames needed" in capsys.readouterr().err
    assert main(args + ["--clip-length", "4"]) == 1
    assert "fake set: FVD needs at least 2 videos, found 1" in capsys.readouterr().err


def test_manifest_reference_reads_a_manifest_and_skips_stills(tmp_path):
    clips = [SyntheticMovingShapes(2, sizes=[(4, 16, 16)], seed=0)[i] for i in range(2)]
    write_clips(tmp_path, [c["video"] for c in clips])
    Image.new("RGB", (16, 16)).save(tmp_path / "still.png")
    rows = ["path,caption"] + [f"clip_{i}.mp4,{c['caption']}" for i, c in enumerate(clips)] + ["still.png,a still"]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    videos, captions = ManifestReference(str(tmp_path / "manifest.csv")).load()
    assert len(videos) == 2 and videos[0].shape == (3, 4, 16, 16)
    assert captions == [c["caption"] for c in clips]
