"""The VideoMetrics callback in a fast_dev_run training (random I3D, tiny clips), and ``kinetoscope evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from framework.cli.main import main
from framework.data.datamodules import SyntheticVideoDataModule
from framework.data.synthetic import SyntheticMovingShapes
from framework.metrics.callbacks import ManifestReference, SyntheticReference, VideoMetrics, stack_rows
from framework.metrics.fvd import FVDPreset
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
    assert record["fvd_protocol"]["name"] == "original_tf1 (clip_length=9)"
    assert record["fvd_protocol"]["resize"] == "tf1_bilinear" and "fake/stuttering" in metrics
    grid = Image.open(tmp_path / "eval" / f"step_{record['step']:07d}_grid.png")
    assert grid.size == (9 * 16 * 4 + 8, 2 * 16 * 4)  # 9 frames per row, 2 prompts stacked, upscale 4, 1 px gaps
    # Repeating the evaluation reuses the reference statistics and regenerates the same seeded videos.
    again = callback.evaluate(trainer, trainer.lightning_module)
    assert again["fvd"] == pytest.approx(metrics["fvd"], rel=1e-6)
    assert again["real/temporal_flickering"] == pytest.approx(metrics["real/temporal_flickering"])


def test_callback_rejects_impossible_settings():
    reference = SyntheticReference(num_videos=2, frames=8, height=16, width=16)
    with pytest.raises(ValueError, match="original_tf1 needs 16 frames .* more than the generated frames=8"):
        VideoMetrics(reference, frames=8)
    with pytest.raises(ValueError, match="stylegan_v_128f_stride_8 needs 121 frames"):
        VideoMetrics(reference, frames=16, fvd_protocol=FVDPreset.STYLEGAN_V_128F_STRIDE_8)
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
    err = capsys.readouterr().err
    assert "real set: FVD (original_tf1: 16 frames" in err and "needs clips of at least 16 frames" in err
    assert "has 2 readable videos of 6-6 frames, 2 of them shorter (e.g. clip_0.mp4)" in err
    assert main(args + ["--clip-length", "4"]) == 1
    assert "I3D needs at least 9 frames per clip" in capsys.readouterr().err
    assert main(args + ["--skip-short"]) == 1
    assert "at least 2 of them per set; " in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # nothing decoded, nothing written


def test_manifest_reference_reads_a_manifest_and_skips_stills(tmp_path):
    clips = [SyntheticMovingShapes(2, sizes=[(4, 16, 16)], seed=0)[i] for i in range(2)]
    write_clips(tmp_path, [c["video"] for c in clips])
    Image.new("RGB", (16, 16)).save(tmp_path / "still.png")
    rows = ["path,caption"] + [f"clip_{i}.mp4,{c['caption']}" for i, c in enumerate(clips)] + ["still.png,a still"]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    videos, captions = ManifestReference(str(tmp_path / "manifest.csv")).load()
    assert len(videos) == 2 and videos[0].shape == (3, 4, 16, 16)
    assert captions == [c["caption"] for c in clips]


def texture_pan(frames: int, seed: int, size: int = 48, speed: int = 2) -> torch.Tensor:
    """A smooth colour texture panning ``speed`` px per frame: [3, T, size, size] in [-1, 1] (real-looking motion)."""
    wide = torch.rand(1, 3, size // 8, (size + speed * frames) // 8 + 1, generator=torch.Generator().manual_seed(seed))
    wide = F.interpolate(wide, scale_factor=8, mode="bicubic", align_corners=False).clamp(0, 1)[0] * 2 - 1
    return torch.stack([wide[:, :size, speed * t: speed * t + size] for t in range(frames)], dim=1)


def test_evaluate_takes_one_file_per_predicted_sample(tmp_path, capsys):
    """A predict folder holds every sample as .mp4, .gif and a .png grid: each sample counts once (its MP4), and
    8-frame quickstart samples get an up-front message saying what FVD needs instead of a late failure."""
    for i in range(3):
        video = texture_pan(8, seed=i)
        for suffix in (".mp4", ".gif"):
            write_video(tmp_path / "samples" / f"{i:04d}_sample{suffix}", video, fps=8)
        write_video(tmp_path / "real" / f"clip_{i}.mp4", texture_pan(8, seed=10 + i), fps=8)
    (tmp_path / "samples" / "0000_sample.png").write_bytes(b"")  # the frame grid: not a video
    (tmp_path / "samples" / "index.jsonl").write_text("")
    args = ["evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "samples"),
            "--output", str(tmp_path / "report"), "--random-i3d"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "needs clips of at least 16 frames and at least 2 of them per set" in err
    assert "has 3 readable videos of 8-8 frames" in err and "--no-fvd" in err
    assert main(args + ["--no-fvd", "--no-temporal"]) == 2
    assert "nothing to compute" in capsys.readouterr().err
    assert main(args + ["--no-fvd"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["fake_videos"] == 3 and report["real_videos"] == 3
    assert report["fvd_protocol"] is None and "one file per sample" in report["file_selection"]
    assert report["flagged"]["fake"] == {"stuttering": [], "static": []}


def test_evaluate_records_the_fvd_protocol_and_flags_stuttering_and_static_samples(tmp_path, capsys):
    for i in range(2):  # FVD's minimum; each clip is a random-I3D pass at 224x224
        write_video(tmp_path / "real" / f"clip_{i}.mp4", texture_pan(16, seed=i), fps=8)
    stuttered = texture_pan(16, seed=5)
    stuttered[:, 1::2] = stuttered[:, 0::2]  # every other frame a copy of its predecessor
    frozen = texture_pan(1, seed=6).expand(3, 16, 48, 48)
    for name, video in (("moving", texture_pan(16, seed=4)), ("stuttered", stuttered), ("frozen", frozen)):
        write_video(tmp_path / "fake" / f"{name}.mp4", video, fps=8)
    code = main(["evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--random-i3d",
                 "--fvd-protocol", "stylegan_v", "--output", str(tmp_path / "report"), "--flow-max-size", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: 1 fake videos are stuttering" in captured.err
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["fvd_protocol"] == {"name": "stylegan_v", "resize": "half_pixel", "decode": "plain_rgb24",
                                      "clip_length": 16, "frame_stride": 1, "clip_start": "first",
                                      "skip_short_videos": True, "resolution": 224}
    assert report["flagged"]["fake"] == {"stuttering": ["stuttered.mp4"], "static": ["frozen.mp4"]}
    assert report["flagged"]["real"] == {"stuttering": [], "static": []}
    assert report["metrics"]["fake/stuttering"] == pytest.approx(1 / 3)
    assert report["metrics"]["real/repeated_frames"] == 0 and report["metrics"]["fvd"] > 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Warnings: repeated or frozen frames" in markdown
    assert "1 of 3 fake videos are stuttering: `stuttered.mp4`" in markdown
    assert "stylegan_v: 16 frames (stride 1, first clip), half_pixel resize" in markdown
