"""Latent cache: encode a dataset once with a frozen compressor, then train the denoiser from the stored latents.

``kinetoscope cache-latents -c CONFIG --output DIR`` reads the compressor (``model.init_args.compressor``) and the
data module (``data``) from a training config, encodes every sample of the data module's ``dataset`` and writes::

    DIR/cache.json                 what made the cache: compressor config + weights fingerprint, sample count
    DIR/shard_00000.safetensors    latents [c, t, h, w] (float32), one tensor per sample, keyed by sample index
    DIR/index.jsonl                one line per cached sample: index, id, caption, fps, original size, shard,
                                   latent shape

Resumable: a shard file is written atomically and its index lines are appended only afterwards, so after an
interruption the samples in the index are complete and the rest are encoded again (a shard file the index never
mentions is overwritten). A torn or corrupt index line is skipped and counted; its sample is encoded again.
Resuming with another compressor (different config or weights) fails instead of mixing latents.

Samples are encoded one at a time, so a cached latent is bit-identical to ``compressor.encode(video[None])[0]``.
Random data augmentation (e.g. random clip windows) is frozen at cache time: one view per sample index.

``CachedLatentDataModule`` serves the cache: batches ``{"latents": [c, t, h, w] list, "captions", "ids", "fps",
"original_sizes"}`` (the last two are the micro-conditions), grouped by latent shape, and ``predict`` from prompts like
every data module. A cache written before original sizes were recorded serves the decoded size instead (latent
size times the compressor's spatial factor: the clip as if it had not been resized).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from framework.data.buckets import ShapeBucketBatchSampler
from framework.data.datamodules import GenerationDataModule
from framework.data.prompts import Prompts
from framework.core.interfaces import Compressor

CACHE_FORMAT = 1
METADATA_FILE, INDEX_FILE = "cache.json", "index.jsonl"


def compressor_fingerprint(compressor: Compressor) -> str:
    """SHA-256 over the class and every state-dict tensor: equal fingerprints mean equal latents."""
    digest = hashlib.sha256(f"{type(compressor).__module__}.{type(compressor).__qualname__}".encode())
    for name, value in sorted(compressor.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode() + str(value.dtype).encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class CachedSample:
    index: int
    id: str
    caption: str
    fps: float
    shard: str
    latent_shape: tuple[int, int, int, int]
    original_size: tuple[int, int] | None = None  # (height, width) before resize and crop; None in older caches


@dataclass
class CacheIndex:
    """The parsed ``index.jsonl``: complete samples by dataset index, plus how many lines were unreadable."""

    samples: dict[int, CachedSample]
    corrupt_lines: int

    @staticmethod
    def read(directory: Path) -> CacheIndex:
        samples, corrupt = {}, 0
        path = directory / INDEX_FILE
        if not path.is_file():
            return CacheIndex({}, 0)
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                original = row.get("original_size")
                sample = CachedSample(int(row["index"]), str(row["id"]), str(row["caption"]), float(row["fps"]),
                                      str(row["shard"]), tuple(int(s) for s in row["latent_shape"]),
                                      None if original is None else (int(original[0]), int(original[1])))
            except (ValueError, KeyError, TypeError):
                corrupt += 1
                continue
            if (directory / sample.shard).is_file():
                samples[sample.index] = sample
            else:
                corrupt += 1
        return CacheIndex(samples, corrupt)


class LatentCacheDataset(Dataset):
    """Map-style dataset over a latent cache directory: item ``i`` -> {"latent", "caption", "id", "fps",
    "original_size"}."""

    def __init__(self, directory: str | os.PathLike[str], max_open_shards: int = 4) -> None:
        self.directory = Path(directory)
        if not (self.directory / METADATA_FILE).is_file():
            raise FileNotFoundError(
                f"{str(self.directory)!r} is not a latent cache (no {METADATA_FILE}); create one with "
                "`kinetoscope cache-latents -c CONFIG --output DIR`"
            )
        self.metadata = json.loads((self.directory / METADATA_FILE).read_text())
        index = CacheIndex.read(self.directory)
        if not index.samples:
            raise ValueError(f"latent cache {str(self.directory)!r} holds no complete samples")
        self.corrupt_lines = index.corrupt_lines
        self.samples = [index.samples[i] for i in sorted(index.samples)]
        self.max_open_shards = max_open_shards
        self._shards: dict[str, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def latent_shape(self, i: int) -> tuple[int, int, int, int]:
        return self.samples[i].latent_shape

    def _shard(self, name: str) -> dict[str, Tensor]:
        if name not in self._shards:
            if len(self._shards) >= self.max_open_shards:
                self._shards.pop(next(iter(self._shards)))  # drop the oldest loaded shard
            self._shards[name] = load_file(str(self.directory / name))
        return self._shards[name]

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        latent = self._shard(sample.shard)[str(sample.index)]  # [c, t, h, w]
        original = sample.original_size
        if original is None:  # an older cache: the decoded size
            factor = int(self.metadata.get("spatial_factor", 1))
            original = (latent.shape[-2] * factor, latent.shape[-1] * factor)
        return {"latent": latent, "caption": sample.caption, "id": sample.id, "fps": sample.fps,
                "original_size": original}


def collate_latents(samples: list[dict]) -> dict:
    """-> {"latents": list of [c, t, h, w], "captions": list[str], "ids": list[str], "fps": list[float],
    "original_sizes": list of (height, width)}."""
    return {
        "latents": [s["latent"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "ids": [s["id"] for s in samples],
        "fps": [float(s["fps"]) for s in samples],
        "original_sizes": [tuple(s["original_size"]) for s in samples],
    }


class CachedLatentDataModule(GenerationDataModule):
    """Trains from a latent cache written by ``kinetoscope cache-latents`` (batches of equal latent shape).

    The model's compressor must be the one that wrote the cache (it still decodes generated samples); ``setup``
    checks its fingerprint against the cache and fails naming both when they differ.
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
        check_compressor: bool = True,
        prompts: Prompts | None = None,
    ) -> None:
        super().__init__(prompts)
        if batch_size < 1:
            raise ValueError(f"CachedLatentDataModule: batch_size must be >= 1, got {batch_size}")
        self.cache_dir, self.batch_size, self.seed, self.num_workers = Path(cache_dir), batch_size, seed, num_workers
        self.check_compressor = check_compressor
        self._dataset: LatentCacheDataset | None = None

    @property
    def dataset(self) -> LatentCacheDataset:
        if self._dataset is None:
            self._dataset = LatentCacheDataset(self.cache_dir)
        return self._dataset

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.trainer is None:
            return
        compressor = getattr(self.trainer.lightning_module, "compressor", None)
        if self.check_compressor and isinstance(compressor, Compressor):
            expected = self.dataset.metadata["compressor_fingerprint"]
            if compressor_fingerprint(compressor) != expected:
                raise ValueError(
                    f"latent cache {str(self.cache_dir)!r} was written by another compressor "
                    f"({self.dataset.metadata['compressor']}) than the model's {type(compressor).__name__} "
                    "(config or weights differ); re-run cache-latents or set check_compressor: false"
                )

    def train_dataloader(self) -> DataLoader:
        shapes = [self.dataset.latent_shape(i) for i in range(len(self.dataset))]
        return DataLoader(
            self.dataset,
            batch_sampler=ShapeBucketBatchSampler(shapes, self.batch_size, seed=self.seed),
            collate_fn=collate_latents,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


# ----------------------------------------------------------------------------------------------------- writing
def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_latent_cache(
    compressor: Compressor,
    dataset: Dataset,
    output: str | os.PathLike[str],
    compressor_config: object = None,
    shard_size: int = 256,
    max_samples: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Encode ``dataset`` items ({"video", "caption", "id", "fps", optional "original_size"}) into ``output``;
    resumes an existing cache (an item without "original_size" records its own size).

    Returns counts: ``cached`` (now in the cache), ``encoded`` (this call), ``skipped`` (already cached) and
    ``corrupt_index_lines`` (unreadable index lines found, their samples re-encoded)."""
    if shard_size < 1:
        raise ValueError(f"cache-latents: shard_size must be >= 1, got {shard_size}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    fingerprint = compressor_fingerprint(compressor)
    metadata = {
        "format": CACHE_FORMAT,
        "compressor": f"{type(compressor).__module__}.{type(compressor).__qualname__}",
        "compressor_config": compressor_config,
        "compressor_fingerprint": fingerprint,
        "latent_channels": compressor.latent_channels,
        "temporal_factor": compressor.temporal_factor,
        "spatial_factor": compressor.spatial_factor,
        "dtype": "float32",
    }
    metadata_path = output / METADATA_FILE
    if metadata_path.is_file():
        previous = json.loads(metadata_path.read_text())
        if previous.get("compressor_fingerprint") != fingerprint:
            raise ValueError(
                f"cache-latents: {str(output)!r} holds latents of another compressor ({previous.get('compressor')}, "
                "different config or weights); use a new --output directory"
            )
    metadata_path.write_text(json.dumps({**metadata, "samples": total}, indent=2) + "\n")

    index = CacheIndex.read(output)
    todo = [i for i in range(total) if i not in index.samples]
    shard_number = 1 + max((int(s.shard[6:11]) for s in index.samples.values()), default=-1)
    compressor.eval()
    device = next((p.device for p in compressor.parameters()), torch.device("cpu"))
    encoded = 0
    bar = tqdm(total=total, initial=total - len(todo), desc="cache-latents", unit="clip", disable=not progress)
    for start in range(0, len(todo), shard_size):
        tensors, rows = {}, []
        name = shard_name(shard_number)
        for i in todo[start : start + shard_size]:
            item = dataset[i]
            with torch.no_grad():
                latent = compressor.encode(item["video"][None].to(device))[0].float().cpu()  # [c, t, h, w]
            tensors[str(i)] = latent.contiguous()
            original = item.get("original_size") or item["video"].shape[-2:]
            rows.append({"index": i, "id": str(item["id"]), "caption": item["caption"], "fps": float(item["fps"]),
                         "original_size": [int(original[0]), int(original[1])], "shard": name,
                         "latent_shape": list(latent.shape)})
            bar.update(1)
        _atomic_save(tensors, output / name)
        index_path = output / INDEX_FILE
        torn = index_path.is_file() and index_path.stat().st_size and not index_path.read_bytes().endswith(b"\n")
        with open(index_path, "a", encoding="utf-8") as f:
            f.write("\n" * bool(torn) + "".join(json.dumps(row) + "\n" for row in rows))  # end a torn line first
        encoded += len(rows)
        shard_number += 1
    bar.close()
    return {"cached": total - len(todo) + encoded, "encoded": encoded, "skipped": total - len(todo),
            "corrupt_index_lines": index.corrupt_lines}


def build_from_config(config: Path) -> tuple[Compressor, L.LightningDataModule, object]:
    """The compressor (``model.init_args.compressor``) and data module (``data``) of a training config."""
    from jsonargparse import ArgumentParser

    from framework.core.registry import default_registry

    default_registry()  # so configs can name plugins by class name
    try:
        raw = yaml.safe_load(config.read_text())
        compressor_config = raw["model"]["init_args"]["compressor"]
        data_config = raw["data"]
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cache-latents: cannot read config {str(config)!r}: {err}") from err
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"cache-latents: config {str(config)!r} needs model.init_args.compressor and data (missing {err})"
        ) from err
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--compressor", type=Compressor)
    parser.add_argument("--data", type=L.LightningDataModule)
    built = parser.instantiate(parser.parse_object({"compressor": compressor_config, "data": data_config}))
    return built.compressor, built.data, compressor_config


def cache_latents_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kinetoscope cache-latents",
        description="Encode a training config's dataset once with its compressor into safetensors shards "
        "(resumable); train from them with CachedLatentDataModule.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="training config (compressor + data)")
    parser.add_argument("--output", type=Path, required=True, help="cache directory (created; resumed if present)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per safetensors shard")
    parser.add_argument("--max-samples", type=int, default=None, help="cache only the first N samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        compressor, data, compressor_config = build_from_config(args.config)
        dataset = getattr(data, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError(f"cache-latents: data module {type(data).__name__} has no map-style `dataset`")
        counts = write_latent_cache(compressor, dataset, args.output, compressor_config, args.shard_size,
                                    args.max_samples, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(args.output), **counts}))
    return 0


def iter_cached_latents(directory: str | os.PathLike[str]) -> Iterator[tuple[CachedSample, Tensor]]:
    """Every cached sample with its latent, in dataset-index order (for inspection and tests)."""
    dataset = LatentCacheDataset(directory)
    for i, sample in enumerate(dataset.samples):
        yield sample, dataset[i]["latent"]
