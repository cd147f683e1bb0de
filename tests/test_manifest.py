"""Manifest datasets: reading CSV / JSONL, PyAV clip decoding (seek, fps resampling, stride), images as 1-frame
videos, and bad files skipped, counted and reported with their paths while every good sample is kept."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from framework.data.buckets import Bucket, BucketConfig, BucketGrid, TokenGeometry
from framework.data.datamodules import Batching, ManifestVideoDataModule, collate_manifest
from framework.data.manifest import (
    ClipSampling,
    ClipStart,
    ManifestVideoDataset,
    SkippedSamplesReport,
    decode_clip,
    load_image,
    read_manifest,
)
from manifest_media import (
    frame_numbers,
    mixed_media,
    run_bounded,
    run_fit,
    tiny_model,
    write_manifest,
    write_numbered_mp4,
    write_still,
)

SMALL_BUCKETS = BucketConfig(resolutions=[16, 24], aspect_ratios=[16 / 9, 1.0, 9 / 16], frame_counts=[1, 4, 8],
                             size_multiple=8, aspect_tolerance=0.25)
GEOMETRY = TokenGeometry(patch_t=1, patch_h=4, patch_w=4)


# ----------------------------------------------------------------------------------------------------- reading
def test_csv_and_jsonl_rows_resolve_paths_against_the_manifest_folder(tmp_path):
    rows = [
        {"path": "clips/a.mp4", "caption": "first", "fps": "8", "frames": "12", "width": "64", "height": "36"},
        {"path": str(tmp_path / "abs.png"), "caption": "second", "fps": "", "frames": "", "width": "", "height": ""},
    ]
    (tmp_path / "sub").mkdir()
    csv_rows = read_manifest(write_manifest(tmp_path / "sub" / "m.csv", rows))
    assert csv_rows[0].path == (tmp_path / "sub" / "clips" / "a.mp4").resolve()
    assert csv_rows[0].name == "clips/a.mp4"
    assert (csv_rows[0].fps, csv_rows[0].frames, csv_rows[0].width, csv_rows[0].height) == (8.0, 12, 64, 36)
    assert csv_rows[0].captions == ("first",) and not csv_rows[0].is_image
    assert csv_rows[1].path == tmp_path / "abs.png" and csv_rows[1].is_image
    assert csv_rows[1].frames is None and csv_rows[1].fps is None

    jsonl = write_manifest(tmp_path / "m.jsonl", [
        {"path": "a.mp4", "captions": ["one", "two"], "num_frames": 30, "fps": 24},
        {"path": "b.png", "caption": "still"},
    ])
    rows = read_manifest(jsonl)
    assert rows[0].captions == ("one", "two") and rows[0].frames == 30 and rows[0].fps == 24.0
    assert rows[1].captions == ("still",) and rows[1].path == tmp_path / "b.png"


def test_csv_captions_column_may_hold_a_json_list(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.mp4", "captions": '["x", "y"]'}])
    assert read_manifest(manifest)[0].captions == ("x", "y")


def test_missing_column_names_the_column_and_the_file(tmp_path):
    manifest = write_manifest(tmp_path / "nocap.csv", [{"path": "a.mp4", "text": "hi"}])
    with pytest.raises(ValueError, match=r"nocap\.csv.*missing column 'caption'"):
        read_manifest(manifest)
    manifest = write_manifest(tmp_path / "nopath.jsonl", [{"path": "a.mp4", "caption": "x"}, {"caption": "y"}])
    with pytest.raises(ValueError, match=r"nopath\.jsonl \(line 2\): missing column 'path'"):
        read_manifest(manifest)


def test_bad_values_name_the_line_and_column(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.mp4", "caption": "x", "fps": "fast"}])
    with pytest.raises(ValueError, match=r"m\.csv, line 2: column 'fps' must be a number, got 'fast'"):
        read_manifest(manifest)
    with pytest.raises(ValueError, match="expected a .csv or .jsonl"):
        read_manifest(tmp_path / "m.txt")


# ---------------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    """24 frames at 12 fps, 36x64; frame k is grey level 8k."""
    return write_numbered_mp4(tmp_path_factory.mktemp("clip") / "numbered.mp4", 24, 36, 64, fps=12)


@pytest.mark.parametrize(
    "start_s, step_s, expected",
    [
        (0.0, 1 / 12, [0, 1, 2, 3]),  # native rate from the start
        (0.5, 1 / 12, [6, 7, 8, 9]),  # seek into the middle
        (0.25, 3 / 12, [3, 6, 9, 12]),  # stride 3
        (0.0, 1 / 6, [0, 2, 4, 6]),  # resample to 6 fps
        (1.0, 1 / 5, [12, 14, 17, 19]),  # resample to 5 fps: nearest of source frames 12, 14.4, 16.8, 19.2
        (0.5, 1 / 18, [6, 7, 7, 8]),  # upsample to 18 fps: a frame repeats (source 6, 6.67, 7.33, 8)
    ],
)
def test_decode_clip_takes_the_nearest_frame_to_each_target_time(numbered, start_s, step_s, expected):
    clip = decode_clip(numbered, Bucket(4, 16, 24), start_s, step_s)
    assert clip.shape == (3, 4, 16, 24) and clip.dtype == torch.float32
    assert frame_numbers(clip) == expected


def test_decode_clip_fails_with_the_path_when_the_clip_runs_past_the_end(numbered):
    with pytest.raises(ValueError, match="numbered.mp4.*truncated or zero-frame"):
        decode_clip(numbered, Bucket(8, 16, 24), 1.5, 1 / 12)  # needs 2.08 s of a 2 s clip


def test_clip_sampling_fps_and_stride():
    assert ClipSampling(fps=6).usable_frames(24, 12.0) == 12
    assert ClipSampling(frame_stride=3).usable_frames(24, 12.0) == 8
    assert ClipSampling().usable_frames(24, 12.0) == 24
    rng = random.Random(0)
    starts = {ClipSampling(frame_stride=2).start_s(24, 12.0, 10, rng) for _ in range(200)}
    assert min(starts) == 0.0 and max(starts) == pytest.approx(5 / 12)  # last start keeps frame 5 + 2*9 = 23
    assert ClipSampling(start=ClipStart.MIDDLE).start_s(24, 12.0, 4, rng) == pytest.approx(10 / 12)
    with pytest.raises(ValueError, match="frame_stride"):
        ClipSampling(frame_stride=0)


def test_aspect_preserving_resize_then_centre_crop(tmp_path):
    # a 40x80 (1:2) still with a red band at the left and a blue band at the right (an eighth of the width each),
    # cropped to a 1:1 bucket: the crop keeps the middle half, so neither band survives; the height is kept whole.
    image = torch.full((3, 1, 40, 80), -1.0)
    image[0, :, :, :10] = 1.0
    image[2, :, :, 70:] = 1.0
    from framework.data.video_io import write_frame_grid

    path = write_frame_grid(tmp_path / "bands.png", image)
    out = load_image(path, Bucket(1, 16, 16))
    assert out.shape == (3, 1, 16, 16)
    assert out.max() < -0.9  # only the black middle remains
    wide = load_image(path, Bucket(1, 16, 32))  # same aspect ratio: nothing cropped, the bands stay at the edges
    assert wide[0, 0, :, :2].mean() > 0.9 and wide[2, 0, :, -2:].mean() > 0.9


# ------------------------------------------------------------------------------------------------------ dataset
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    rows, broken = mixed_media(folder)
    return write_manifest(folder / "manifest.csv", rows), rows, broken


def test_bad_files_are_skipped_with_their_paths_and_good_ones_kept(media):
    manifest, rows, broken = media
    dataset = ManifestVideoDataset(read_manifest(manifest), BucketGrid(SMALL_BUCKETS), ClipSampling())
    good = [r["path"] for r in rows if r["path"] not in broken]
    assert sorted(s.row.name for s in dataset.samples) == sorted(good)
    assert sorted(Path(p).name for p in dataset.skipped.paths) == sorted(broken)
    reasons = {Path(p).name: why for p, why in dataset.skipped.entries.items()}
    assert "does not exist" in reasons["missing.mp4"]
    assert "no decodable video frames" in reasons["zero.avi"]
    assert "not a readable image" in reasons["broken.png"]
    assert "smaller than the smallest bucket" in reasons["tiny.png"]
    report = dataset.skipped.report("setup")
    assert f"{len(broken)} skipped" in report and all(name in report for name in broken)


def test_samples_come_out_at_their_bucket_size_images_as_one_frame(media):
    manifest, _, _ = media
    dataset = ManifestVideoDataset(read_manifest(manifest), BucketGrid(SMALL_BUCKETS), ClipSampling())
    for index, info in enumerate(dataset.samples):
        sample = dataset[index]
        assert tuple(sample["video"].shape) == (3, *info.bucket.shape), info.row.name
        assert sample["video"].min() >= -1 and sample["video"].max() <= 1
        assert sample["skipped"] == [] and sample["caption"] in info.row.captions
        if info.row.is_image:
            assert info.bucket.frames == 1 and sample["fps"] == 0.0
        else:
            assert info.bucket.frames == (4 if info.row.name == "short.mp4" else 8) and sample["fps"] == 8.0
        aspect = info.row.path.name
        if aspect.startswith("wide"):
            assert info.bucket.width > info.bucket.height
        if aspect.startswith("tall"):
            assert info.bucket.width < info.bucket.height


def test_a_file_that_fails_while_decoding_is_replaced_and_reported(tmp_path):
    """Metadata in the manifest means the file is not opened up front; the truncation shows only while decoding."""
    for name in ("a.mp4", "b.mp4"):
        write_numbered_mp4(tmp_path / name, 12, 32, 32, fps=8)
    data = (tmp_path / "b.mp4").read_bytes()
    (tmp_path / "b.mp4").write_bytes(data[: len(data) // 2])
    meta = {"fps": 8, "frames": 12, "width": 32, "height": 32}
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.mp4", "caption": "a", **meta},
                                                   {"path": "b.mp4", "caption": "b", **meta}])
    dataset = ManifestVideoDataset(read_manifest(manifest), BucketGrid(SMALL_BUCKETS), ClipSampling())
    assert len(dataset) == 2 and not dataset.skipped  # not detected yet
    batch = collate_manifest([dataset[0], dataset[1]])
    assert batch["ids"] == ["a.mp4", "a.mp4"]  # b's slot is filled by the good sample of the same bucket
    assert [v.shape for v in batch["videos"]] == [(3, 8, 24, 24)] * 2
    assert [Path(s.path).name for s in batch["skipped"]] == ["b.mp4"]
    assert dataset[1]["skipped"][0].path == str(tmp_path / "b.mp4")  # known bad: reported again, not re-decoded


# ------------------------------------------------------------------------------------------------- training run
class RecordShapes(L.Callback):
    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self.ids: dict[int, list[str]] = {}  # epoch -> sample ids in order

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes += [tuple(v.shape) for v in batch["videos"]]
        self.ids.setdefault(trainer.current_epoch, []).extend(batch["ids"])


def test_images_and_videos_train_in_one_run_and_bad_files_are_reported(media, tmp_path, caplog):
    manifest, rows, broken = media
    data = ManifestVideoDataModule(manifest, buckets=SMALL_BUCKETS, geometry=GEOMETRY, tokens_per_batch=96,
                                   batching=Batching.BUCKETS, seed=1)
    record = RecordShapes()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                        default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="kinetoscope.data"):
        trainer.fit(tiny_model(), datamodule=data)
    good = len(rows) - len(broken)
    assert len(record.shapes) == 2 * good  # every good sample, every epoch, none dropped
    assert {s[1] for s in record.shapes} == {1, 4, 8}  # stills and clips in the same run
    assert sorted(record.ids[0]) == sorted(record.ids[1]) and record.ids[0] != record.ids[1]  # reshuffled per epoch
    report = next(cb for cb in trainer.callbacks if isinstance(cb, SkippedSamplesReport))
    assert sorted(Path(p).name for p in report.last_report.paths) == sorted(broken)
    assert trainer.callback_metrics["data/skipped_samples"] == len(broken)
    epoch_reports = [r.message for r in caplog.records if r.message.startswith("epoch ")]
    assert len(epoch_reports) == 2 and all(name in epoch_reports[-1] for name in broken)
    assert any(f"{len(broken)} files skipped in this run" in r.message for r in caplog.records)
    written = json.loads((tmp_path / "skipped_samples.json").read_text())  # the run's output folder
    assert written["count"] == len(broken)
    assert sorted(Path(e["path"]).name for e in written["skipped"]) == sorted(broken)


def test_datamodule_without_usable_samples_fails_listing_why(tmp_path):
    write_still(tmp_path / "tiny.png", 4, 4)
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "tiny.png", "caption": "x"}])
    with pytest.raises(ValueError, match=r"no usable samples(.|\n)*tiny\.png: 4x4 is smaller"):
        ManifestVideoDataModule(manifest, buckets=SMALL_BUCKETS, geometry=GEOMETRY).dataset


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "manifest.csv"


@pytest.mark.skipif(not SHARED.is_file(), reason=f"real clips not present ({SHARED})")
def test_shared_real_clips_decode_at_bucket_sizes():
    grid = BucketGrid(BucketConfig(resolutions=[64, 128], frame_counts=[1, 8], size_multiple=16))
    dataset = ManifestVideoDataset(read_manifest(SHARED), grid, ClipSampling(fps=8))
    assert not dataset.skipped, dataset.skipped.report("shared clips")
    assert len(dataset) == len(read_manifest(SHARED))
    for index in range(0, len(dataset), 5):
        sample = dataset[index]
        assert tuple(sample["video"].shape) == (3, *dataset.samples[index].bucket.shape)


def test_decode_failures_in_worker_processes_reach_the_batches(tmp_path):
    """With DataLoader workers the failure is found in another process; it must still arrive with the batch."""
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_numbered_mp4(tmp_path / name, 12, 32, 32, fps=8)
    data = (tmp_path / "b.mp4").read_bytes()
    (tmp_path / "b.mp4").write_bytes(data[: len(data) // 2])
    meta = {"fps": 8, "frames": 12, "width": 32, "height": 32}
    manifest = write_manifest(tmp_path / "m.csv", [{"path": n, "caption": n, **meta} for n in ("a.mp4", "b.mp4", "c.mp4")])
    module = ManifestVideoDataModule(manifest, buckets=SMALL_BUCKETS, geometry=GEOMETRY, tokens_per_batch=288,
                                     num_workers=2)
    batches = list(module.train_dataloader())
    assert sorted(i for b in batches for i in b["ids"]) in (["a.mp4", "a.mp4", "c.mp4"], ["a.mp4", "c.mp4", "c.mp4"])
    skipped = [s for b in batches for s in b["skipped"]]
    assert [Path(s.path).name for s in skipped] == ["b.mp4"] and "Invalid data" in skipped[0].reason  # no index


# ------------------------------------------------------------------------------------------ fit through the CLI
# A CLI fit of the tiny config takes seconds on an idle machine and up to a minute or two on the shared 2-core one
# under load; past this limit the run is taken for hung and killed with its workers.
FIT_TIMEOUT_S = 240
META_40 = {"fps": 8, "frames": 12, "width": 40, "height": 40}  # 40x40 clips are resized to the 32x32 bucket


def clips_manifest(folder: Path, truncate: str | None = None) -> Path:
    """a.mp4, b.mp4, c.mp4 (12 frames, 40x40, 8 fps) with their metadata in the manifest, as `scan` writes it, so
    the files are not opened before training; ``truncate`` is cut in half: its header stays fine."""
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_numbered_mp4(folder / name, 12, 40, 40, fps=8)
    if truncate:
        data = (folder / truncate).read_bytes()
        (folder / truncate).write_bytes(data[: len(data) // 2])
    return write_manifest(folder / "m.csv", [{"path": n, "caption": f"clip {n}", **META_40}
                                             for n in ("a.mp4", "b.mp4", "c.mp4")])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_skips_a_clip_truncated_after_a_good_header_and_reports_it(tmp_path, num_workers):
    """Issue 20: the truncation shows only when a batch holding the clip is decoded; `fit` used to die there
    (`A frozen dataclass was passed to apply_to_collection`), with and without workers."""
    manifest = clips_manifest(tmp_path / "media", truncate="b.mp4")
    run = run_fit(tmp_path / "run", manifest, num_workers=num_workers, timeout_s=FIT_TIMEOUT_S)
    assert run.returncode is not None, f"fit hung for {FIT_TIMEOUT_S} s:\n{run.output[-3000:]}"
    assert run.returncode == 0, run.output[-3000:]
    # in the run's output file, with the reason, and printed
    assert [Path(p).name for p in run.skipped] == ["b.mp4"] and all(run.skipped.values())  # with a reason
    assert "1 files skipped in this run" in run.output and str(tmp_path / "media" / "b.mp4") in run.output
    # every slot of the epoch trained: b's by another clip of its bucket
    ids = run.trained_ids
    assert len(ids) == 3 and set(ids) == {"a.mp4", "c.mp4"}, ids


def test_fit_with_two_workers_after_decoding_in_the_parent_process_finishes(tmp_path):
    """Issue 20: once the training process had decoded video (a preview, or VideoMetrics' reference clips), forked
    workers hung forever in swscale (`avpriv_slicethread_free` under `sws_scale_frame`)."""
    manifest = clips_manifest(tmp_path / "media")
    run = run_fit(tmp_path / "run", manifest, num_workers=2, timeout_s=FIT_TIMEOUT_S,
                  decode_first=tmp_path / "media" / "a.mp4")
    assert run.returncode is not None, f"fit hung for {FIT_TIMEOUT_S} s:\n{run.output[-3000:]}"
    assert run.returncode == 0, run.output[-3000:]
    assert sorted(run.trained_ids) == ["a.mp4", "b.mp4", "c.mp4"]
    assert run.skipped == {}


FORKED_DECODE = """
import multiprocessing, sys
from framework.data.buckets import Bucket
from framework.data.manifest import decode_clip
from framework.data.video_io import read_video

read_video(sys.argv[1])  # the parent converts frames first (at 40x40)
with multiprocessing.get_context("fork").Pool(1) as pool:  # then a forked child converts at another size
    clip = pool.apply(decode_clip, (sys.argv[1], Bucket(4, 32, 32), 0.0, 0.125))
print(tuple(clip.shape))
"""


def test_decoding_in_a_forked_process_after_decoding_in_the_parent(tmp_path):
    """A loader the user builds with fork workers (or any forked helper) must not reuse the parent's swscale
    context either: the conversion threads it expects do not exist in the child."""
    write_numbered_mp4(tmp_path / "a.mp4", 12, 40, 40, fps=8)
    returncode, output = run_bounded([sys.executable, "-c", FORKED_DECODE, str(tmp_path / "a.mp4")], 120)
    assert returncode is not None, f"decoding in a forked child hung for 120 s:\n{output[-3000:]}"
    assert returncode == 0, output[-3000:]
    assert output.strip().splitlines()[-1] == "(3, 4, 32, 32)"
