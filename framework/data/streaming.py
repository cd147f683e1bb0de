"""Streaming training data on LitData: ``kinetoscope optimize`` writes a manifest's clips into LitData chunks, and
``StreamingVideoDataModule`` streams them from a local folder or an ``s3://`` URI.

``kinetoscope optimize -c CONFIG --output DIR [--workers N]`` takes the ``ManifestVideoDataModule`` of a training
config (its manifest, buckets and clip sampling), decodes every sample once at its bucket's size with LitData's
``optimize`` (``N`` worker processes) and writes one item per sample::

    {"schema": STREAM_SCHEMA, "frames": uint8 [T, H, W, 3], "meta": JSON text of {"id": str, "captions": [str],
     "fps": float (0 for a still), "height": int, "width": int (the file's size before resize and crop)}}

Frames are stored as the uint8 pixels the decoder produced (resize and crop happen in uint8), so a streamed sample
equals ``ManifestVideoDataset``'s sample bit for bit. The clip window is fixed at optimize time (one view per file,
``start: random`` drawn from ``(seed, index)``), as in the latent cache. Files that fail to decode are left out and
counted. Any LitData output (a local folder, ``s3://bucket/prefix``) works as ``--output``; ``--storage-endpoint``
points LitData and boto3 at an S3-compatible server.

``StreamingVideoDataModule`` reads the chunks with LitData's ``StreamingDataset`` (chunk-level shuffling per epoch,
each DDP rank and worker its own part of the chunks) and ``StreamingDataLoader``, whose ``state_dict`` Lightning saves
in checkpoints, so a resumed run continues the epoch. Batches are ``collate_manifest``'s: lists of clips of mixed
sizes (stills and videos mixed), for packed attention.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framework.data.datamodules import GenerationDataModule, ManifestVideoDataModule, collate_manifest
from framework.data.manifest import ManifestVideoDataset
from framework.data.prompts import Prompts
from framework.data.stream_format import STREAM_SCHEMA, StreamDataError


@dataclass
class ObjectStorage:
    """Where an ``s3://`` dataset lives: ``endpoint_url`` of an S3-compatible server (None: AWS), and its region.
    Credentials come from the usual AWS environment variables or files, never from a config. A request is tried
    ``max_attempts`` times, each connection waiting at most ``connect_timeout_s``: LitData's own client retries
    1000 times with backoff, which turns an unreachable or misspelled endpoint into what looks like a hang."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 4
    connect_timeout_s: float = 10.0

    def storage_options(self) -> dict[str, Any]:
        """LitData's ``storage_options`` (handed to its boto3 client, whose defaults they override)."""
        import botocore.config

        options: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region_name": self.region}
        options = {k: v for k, v in options.items() if v is not None}
        options["config"] = botocore.config.Config(retries={"max_attempts": self.max_attempts, "mode": "standard"},
                                                   connect_timeout=self.connect_timeout_s)
        return options


# ------------------------------------------------------------------------------------------------------- optimize
class _ClipItems:
    """LitData ``optimize``'s function: sample index -> zero or one item (a file that fails to decode yields none).
    Picklable, so LitData's worker processes get the built dataset instead of probing the files again."""

    def __init__(self, dataset: ManifestVideoDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __call__(self, index: int) -> Iterator[dict[str, Any]]:
        info = self.dataset.samples[index]
        try:
            video, fps = self.dataset.load(index, info.bucket, random.Random(f"{self.seed}:{index}"))
        except Exception as err:  # noqa: BLE001  (any decoder failure: the file is left out and counted)
            print(f"optimize: left out {info.row.path}: {err}", file=sys.stderr)
            return
        frames = ((video + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()  # [T, H, W, 3]
        # the strings travel as one JSON text: LitData picks a serializer by value, and takes a string ending in
        # ".mp4" (a sample id) for a video file to embed
        meta = {"id": info.row.name, "captions": list(info.row.captions), "fps": float(fps),
                "height": int(info.native_height), "width": int(info.native_width)}
        yield {"schema": STREAM_SCHEMA, "meta": json.dumps(meta), "frames": frames}


def optimize_manifest(data: ManifestVideoDataModule, output: str, workers: int = 1, chunk_bytes: str = "64MB",
                      storage: ObjectStorage | None = None) -> dict[str, int]:
    """Write ``data``'s samples as LitData chunks to ``output`` -> {"samples", "written", "left_out"}."""
    from litdata import optimize

    dataset = data.dataset
    optimize(fn=_ClipItems(dataset, data.seed), inputs=list(range(len(dataset))), output_dir=output,
             chunk_bytes=chunk_bytes, num_workers=max(1, workers), mode="overwrite",
             storage_options=(storage or ObjectStorage()).storage_options())
    written = len(open_stream(output, storage))
    return {"samples": len(dataset), "written": written,
            "left_out": len(dataset) - written + len(dataset.skipped.entries)}


def data_module_from_config(config: Path):
    """The data module (``data``) of a training config."""
    import lightning as L
    import yaml
    from jsonargparse import ArgumentParser

    from framework.core.registry import default_registry

    default_registry()  # so configs can name plugins by class name
    try:
        data_config = yaml.safe_load(config.read_text())["data"]
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"optimize: cannot read config {str(config)!r}: {err}") from err
    except (KeyError, TypeError) as err:
        raise ValueError(f"optimize: config {str(config)!r} has no data: section") from err
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=L.LightningDataModule)
    try:
        return parser.instantiate(parser.parse_object({"data": data_config})).data
    except argparse.ArgumentError as err:
        raise ValueError(f"optimize: config {str(config)!r}: {str(err).splitlines()[0]} ...\n{err}") from err


def optimize_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kinetoscope optimize",
        description="Decode a training config's manifest (ManifestVideoDataModule: manifest, buckets, clip) once into "
        "LitData chunks, with parallel workers; train from them with StreamingVideoDataModule.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="training config with a ManifestVideoDataModule")
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix to write (replaced)")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes")
    parser.add_argument("--chunk-bytes", default="64MB", help="LitData chunk size")
    parser.add_argument("--storage-endpoint", default=None, help="S3-compatible server for s3:// outputs")
    args = parser.parse_args(argv)
    try:
        data = data_module_from_config(args.config)
        if not isinstance(data, ManifestVideoDataModule):
            raise ValueError(f"optimize: config {args.config}: data must be a ManifestVideoDataModule, "
                             f"got {type(data).__name__}")
        counts = optimize_manifest(data, args.output, args.workers, args.chunk_bytes,
                                   ObjectStorage(endpoint_url=args.storage_endpoint))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not counts["written"]:
        print(f"error: optimize wrote no samples to {args.output}: every file failed to decode", file=sys.stderr)
        return 1
    print(json.dumps({"output": args.output, **counts}))
    return 0


# ------------------------------------------------------------------------------------------------------ streaming


def _clip_dataset_class():
    """``StreamingClipDataset``, imported only when streaming is used (litdata is the optional ``scale`` extra)."""
    from framework.data.streaming_dataset import StreamingClipDataset

    return StreamingClipDataset


def open_stream(input_dir: str, storage: ObjectStorage | None = None, shuffle: bool = False, seed: int = 0,
                cache_dir: str | None = None):
    """A LitData ``StreamingDataset`` of ``kinetoscope optimize`` items at ``input_dir``; unreachable storage or a
    folder without a LitData index raises ``StreamDataError`` naming it."""
    storage = storage or ObjectStorage()
    options = storage.storage_options()
    try:
        dataset = _clip_dataset_class()(input_dir, shuffle=shuffle, seed=seed, storage_options=options,
                                          cache_dir=cache_dir)
        dataset.plain_http = (storage.endpoint_url or "").startswith("http://")
        return dataset
    except Exception as err:  # botocore / LitData errors: say which URI and what to check
        raise StreamDataError(f"streamed dataset {input_dir}: cannot open ({type(err).__name__}: {err}); check the "
                              "path or bucket name, the storage endpoint and credentials, and that "
                              "`kinetoscope optimize` wrote it") from err


class StreamingVideoDataModule(GenerationDataModule):
    """Trains on clips that ``kinetoscope optimize`` wrote, streamed from ``input_dir`` (a folder or
    ``s3://bucket/prefix``; ``storage`` for S3-compatible servers) with LitData.

    Each epoch shuffles chunks and items within them (``shuffle``, ``seed``); under DDP every rank streams its own
    part. Batches hold ``batch_size`` clips of mixed sizes (``collate_manifest``), for packed attention. The loader's
    position (LitData's ``StreamingDataLoader`` state) is saved in checkpoints: ``--ckpt_path last`` continues it.
    """

    def __init__(
        self,
        input_dir: str,
        batch_size: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        storage: ObjectStorage | None = None,
        cache_dir: Path | None = None,  # where remote chunks are cached (default: LitData's)
        prompts: Prompts | None = None,
    ) -> None:
        super().__init__(prompts)
        if batch_size < 1:
            raise ValueError(f"StreamingVideoDataModule: batch_size must be >= 1, got {batch_size}")
        self.input_dir, self.batch_size, self.shuffle, self.seed = input_dir, batch_size, shuffle, seed
        self.num_workers, self.storage, self.cache_dir = num_workers, storage or ObjectStorage(), cache_dir
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = open_stream(self.input_dir, self.storage, self.shuffle, self.seed,
                                        str(self.cache_dir) if self.cache_dir is not None else None)
        return self._dataset

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.dataset  # noqa: B018  (open now: a wrong URI fails before training starts)

    def train_dataloader(self):
        from litdata import StreamingDataLoader

        # its own generator for the workers' base seed: LitData creates the epoch's iterator lazily, at the first
        # batch -- after RNGStateCallback has restored the global RNG on resume -- so a draw from the global RNG would
        # shift the diffusion noise of a resumed run (the streamed samples draw nothing random in the workers)
        return StreamingDataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                   collate_fn=collate_manifest, generator=torch.Generator().manual_seed(self.seed))
