"""``StreamingClipDataset``: LitData items written by ``kinetoscope optimize`` back into ``ManifestVideoDataset``'s
samples (``framework/data/streaming.py`` describes the format). A module of its own, importing litdata at the top, so
that worker processes started by spawn or forkserver can unpickle the class."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset

from framework.data.manifest import _to_video
from framework.data.stream_format import STREAM_SCHEMA, StreamDataError, _chunks_through_boto3


class StreamingClipDataset(StreamingDataset):
    """LitData items back into ``ManifestVideoDataset``'s samples; the caption of a multi-caption row is drawn
    from ``(seed, epoch, id)``, so it needs no state to survive a resume."""

    plain_http = False  # an http:// endpoint (a local S3 server): chunks through boto3

    def __getitem__(self, index: Any) -> dict[str, Any]:
        if self.plain_http:
            _chunks_through_boto3()
        try:
            item = super().__getitem__(index)
        except Exception as err:  # a chunk that does not decode: name the dataset, not LitData's internals
            raise StreamDataError(f"streamed dataset {self.input_dir.url or self.input_dir.path}: cannot read "
                                  f"item {index}: {type(err).__name__}: {err} (corrupt chunk?)") from err
        if not isinstance(item, dict) or item.get("schema") != STREAM_SCHEMA:
            found = item.get("schema", sorted(item)) if isinstance(item, dict) else type(item).__name__
            raise StreamDataError(
                f"streamed dataset {self.input_dir.url or self.input_dir.path}: items of schema "
                f"{STREAM_SCHEMA!r} expected (written by `kinetoscope optimize`), found {found!r}")
        meta = json.loads(item["meta"])
        rng = random.Random(f"{self.seed}:{self.current_epoch}:{meta['id']}")
        frames = item["frames"]
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        return {"video": _to_video(frames), "caption": rng.choice(meta["captions"]), "id": meta["id"],
                "fps": meta["fps"], "original_size": (meta["height"], meta["width"]), "skipped": []}

