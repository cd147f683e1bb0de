"""Streaming data on LitData (``framework/data/streaming.py``): ``kinetoscope optimize`` writes a manifest's clips
into LitData chunks with 2 worker processes; the stream equals ``ManifestVideoDataset`` sample for sample (bit-equal
pixels, caption, fps, original size); ``kinetoscope fit`` trains from a folder and from ``s3://`` on a local moto
S3 server; a misspelled bucket, an unreachable endpoint, a corrupt chunk and another schema fail with errors that
name the dataset."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("litdata")
pytest.importorskip("moto")

from framework.cli.main import main  # noqa: E402
from framework.data.buckets import BucketConfig, TokenGeometry  # noqa: E402
from framework.data.datamodules import ManifestVideoDataModule  # noqa: E402
from framework.data.manifest import ClipSampling, ClipStart  # noqa: E402
from framework.data.streaming import ObjectStorage, StreamDataError, open_stream  # noqa: E402
from framework.training.reliability import read_loss_log  # noqa: E402
from manifest_media import REPO, run_bounded, write_corrupt, write_manifest, write_numbered_mp4, write_still  # noqa: E402

BUCKETS = {"resolutions": [32], "aspect_ratios": [1.0], "frame_counts": [1, 8], "size_multiple": 16}
STREAM_CONFIG = REPO / "tests" / "reliability" / "tiny_stream.yaml"


def manifest_config(folder: Path, manifest: Path) -> Path:
    config = {"data": {"class_path": "framework.data.datamodules.ManifestVideoDataModule", "init_args": {
        "manifest": str(manifest), "buckets": BUCKETS, "geometry": {"patch_t": 1, "patch_h": 4, "patch_w": 4},
        "clip": {"fps": 8.0, "start": "BEGINNING"}}}}
    path = folder / "manifest_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, optimized folder): 5 clips of 10..14 frames, 3 stills, one corrupt file; `kinetoscope optimize`
    with 2 workers."""
    tmp = tmp_path_factory.mktemp("streaming")
    media = tmp / "media"
    media.mkdir()
    rows = []
    for i in range(5):
        write_numbered_mp4(media / f"clip{i}.mp4", 10 + i, 32, 32, fps=8)
        rows.append({"path": f"clip{i}.mp4", "caption": f"clip number {i}"})
    for i in range(3):
        write_still(media / f"still{i}.png", 40, 40, seed=i)  # resized: original size 40x40
        rows.append({"path": f"still{i}.png", "caption": f"still number {i}"})
    write_corrupt(media / "corrupt.mp4")
    rows.append({"path": "corrupt.mp4", "caption": "broken"})
    manifest = write_manifest(media / "manifest.csv", rows)
    output = tmp / "optimized"
    code, out = run_bounded([sys.executable, "-m", "framework.cli.main", "optimize", "-c",
                             str(manifest_config(tmp, manifest)), "--output", str(output), "--workers", "2"], 300, tmp)
    assert code == 0, out[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts == {"output": str(output), "samples": 8, "written": 8, "left_out": 1}  # the corrupt file
    return manifest, output


def reference(manifest: Path) -> ManifestVideoDataModule:
    return ManifestVideoDataModule(manifest, buckets=BucketConfig(**BUCKETS), geometry=TokenGeometry(patch_h=4, patch_w=4),
                                   clip=ClipSampling(fps=8.0, start=ClipStart.BEGINNING))


@pytest.mark.slow
def test_stream_equals_the_manifest_sample_for_sample(optimized) -> None:
    manifest, output = optimized
    expected = {s["id"]: s for s in (reference(manifest).dataset[i] for i in range(8))}
    stream = open_stream(str(output))
    got = {s["id"]: s for s in (stream[i] for i in range(len(stream)))}
    assert sorted(got) == sorted(expected)
    for name, sample in got.items():
        want = expected[name]
        assert sample["video"].dtype == want["video"].dtype and sample["video"].shape == want["video"].shape
        assert sample["video"].equal(want["video"]), name  # uint8 pixels stored: bit-equal after decoding
        assert (sample["caption"], sample["fps"], sample["original_size"]) == \
            (want["caption"], want["fps"], want["original_size"])
    assert {s["video"].shape[1] for s in got.values()} == {1, 8}  # stills and videos in one dataset


@pytest.mark.slow
def test_fit_streams_from_a_local_folder_with_mixed_batches(optimized, tmp_path) -> None:
    code, out = run_bounded([sys.executable, "-m", "framework.cli.main", "fit", "-c", str(STREAM_CONFIG),
                             f"--data.init_args.input_dir={optimized[1]}"], 240, tmp_path)
    assert code == 0, out[-3000:]
    assert list(read_loss_log(tmp_path / "runs" / "tiny_stream" / "losses.jsonl")) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ a local S3 server
@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a free port) -> its endpoint URL; dummy credentials in the environment."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=url).list_buckets()
                break
            except Exception:  # noqa: BLE001  (not listening yet)
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield url
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def uploaded(optimized, s3_server) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="clips")
    for f in optimized[1].iterdir():
        client.upload_file(str(f), "clips", f"train/{f.name}")
    return "s3://clips/train"


@pytest.mark.slow
def test_fit_streams_from_the_local_s3_server(uploaded, s3_server, tmp_path) -> None:
    code, out = run_bounded([sys.executable, "-m", "framework.cli.main", "fit", "-c", str(STREAM_CONFIG),
                             f"--data.init_args.input_dir={uploaded}",
                             f"--data.init_args.storage.endpoint_url={s3_server}",
                             f"--data.init_args.cache_dir={tmp_path / 'cache'}"], 240, tmp_path)
    assert code == 0, out[-3000:]
    assert list(read_loss_log(tmp_path / "runs" / "tiny_stream" / "losses.jsonl")) == [1, 2, 3, 4]
    assert any((tmp_path / "cache").rglob("*.bin"))  # chunks came over S3 into the cache


def test_stream_from_s3_equals_the_local_folder(optimized, uploaded, s3_server, tmp_path) -> None:
    local = open_stream(str(optimized[1]))
    remote = open_stream(uploaded, ObjectStorage(endpoint_url=s3_server), cache_dir=str(tmp_path))
    assert len(remote) == len(local) == 8
    for i in range(len(local)):
        assert remote[i]["id"] == local[i]["id"] and remote[i]["video"].equal(local[i]["video"])


# ---------------------------------------------------------------------------------------------------- bad input
def test_misspelled_bucket_is_a_clear_error(uploaded, s3_server, tmp_path) -> None:
    with pytest.raises(StreamDataError, match=r"s3://clipz/train: cannot open .*bucket name"):
        open_stream("s3://clipz/train", ObjectStorage(endpoint_url=s3_server), cache_dir=str(tmp_path))


def test_unreachable_endpoint_is_a_clear_error(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(StreamDataError, match=r"s3://clips/train: cannot open .*endpoint"):
        open_stream("s3://clips/train", ObjectStorage(endpoint_url=f"http://127.0.0.1:{port}"),
                    cache_dir=str(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(StreamDataError, match=str(tmp_path / "nowhere")):
        open_stream(str(tmp_path / "nowhere"))


def test_corrupt_chunk_is_a_clear_error(optimized, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(optimized[1], copy)
    for chunk in copy.glob("*.bin"):
        write_corrupt(chunk)
    stream = open_stream(str(copy))
    with pytest.raises(StreamDataError, match=rf"{copy}: cannot read item .*corrupt chunk"):
        stream[0]


def test_dataset_of_another_schema_is_a_clear_error(tmp_path) -> None:
    from litdata import optimize

    optimize(fn=_other_schema, inputs=[0, 1], output_dir=str(tmp_path / "other"), chunk_bytes="1MB", num_workers=1)
    stream = open_stream(str(tmp_path / "other"))
    with pytest.raises(StreamDataError, match=r"schema 'kinetoscope.clip/1' expected .*found \['index', 'name'\]"):
        stream[0]


def _other_schema(index: int) -> dict:
    return {"index": index, "name": f"row {index}"}
