"""Latent cache: ``kinetoscope cache-latents`` writes shards + index that read back bit-exactly, resumes after an
interruption without re-encoding, survives a torn index line, refuses another compressor, and the cached data
module batches latents by shape for training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from framework.cli.main import main
from framework.data.datamodules import SyntheticVideoDataModule
from framework.data.latent_cache import (
    CachedLatentDataModule,
    LatentCacheDataset,
    iter_cached_latents,
    write_latent_cache,
)
from plugins.compressors.causal_vae import CausalVAE, VAESize

SIZES = [[5, 16, 16], [1, 16, 24]]


def tiny_vae() -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(latent_channels=4, size=VAESize.TINY, base_channels=4, tiling=None).eval()


def data(num_samples: int = 6) -> SyntheticVideoDataModule:
    return SyntheticVideoDataModule(num_samples=num_samples, sizes=SIZES, object_size=3, batch_size=2)


@pytest.fixture
def config(tmp_path) -> Path:
    """A training config whose compressor is a tiny CausalVAE with saved weights."""
    weights = tiny_vae().save_weights(tmp_path / "vae.safetensors")
    text = {
        "model": {"class_path": "framework.modules.VideoDiffusion", "init_args": {"compressor": {
            "class_path": "CausalVAE",
            "init_args": {"latent_channels": 4, "size": "TINY", "base_channels": 4, "tiling": None,
                          "checkpoint": str(weights)},
        }}},
        "data": {"class_path": "framework.data.datamodules.SyntheticVideoDataModule",
                 "init_args": {"num_samples": 6, "sizes": SIZES, "object_size": 3, "batch_size": 2}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def test_cli_cache_round_trip_is_bit_exact(config, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    output = tmp_path / "cache"
    assert main(["cache-latents", "-c", str(config), "--output", str(output), "--shard-size", "4"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["cached"] == counts["encoded"] == 6
    assert sorted(p.name for p in output.glob("shard_*.safetensors")) == ["shard_00000.safetensors",
                                                                           "shard_00001.safetensors"]
    vae = CausalVAE(latent_channels=4, size=VAESize.TINY, base_channels=4, tiling=None,
                    checkpoint=str(tmp_path / "vae.safetensors")).eval()
    dataset = data().dataset
    cached = list(iter_cached_latents(output))
    assert [s.index for s, _ in cached] == list(range(6))
    for sample, latent in cached:
        item = dataset[sample.index]
        assert (sample.id, sample.caption) == (item["id"], item["caption"])
        with torch.no_grad():
            assert torch.equal(latent, vae.encode(item["video"][None])[0])  # bit-exact
    assert tuple(cached[0][1].shape) == (4, 2, 2, 2) and tuple(cached[1][1].shape) == (4, 1, 2, 3)


def test_resume_encodes_only_what_is_missing(tmp_path) -> None:
    vae, dataset = tiny_vae(), data().dataset
    first = write_latent_cache(vae, dataset, tmp_path, shard_size=2, max_samples=3, progress=False)
    assert (first["encoded"], first["skipped"]) == (3, 0)
    before = {s.index: latent for s, latent in iter_cached_latents(tmp_path)}
    second = write_latent_cache(vae, dataset, tmp_path, shard_size=2, progress=False)
    assert (second["encoded"], second["skipped"], second["cached"]) == (3, 3, 6)
    after = {s.index: latent for s, latent in iter_cached_latents(tmp_path)}
    assert sorted(after) == list(range(6))
    assert all(torch.equal(before[i], after[i]) for i in before)
    assert write_latent_cache(vae, dataset, tmp_path, progress=False)["encoded"] == 0


def test_a_torn_index_line_is_counted_and_its_sample_re_encoded(tmp_path) -> None:
    vae, dataset = tiny_vae(), data().dataset
    write_latent_cache(vae, dataset, tmp_path, shard_size=6, progress=False)
    index = tmp_path / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # crash mid-line
    assert len(LatentCacheDataset(tmp_path)) == 5
    counts = write_latent_cache(vae, dataset, tmp_path, shard_size=6, progress=False)
    assert (counts["corrupt_index_lines"], counts["encoded"]) == (1, 1)
    assert len(LatentCacheDataset(tmp_path)) == 6


def test_resuming_with_another_compressor_is_refused(tmp_path) -> None:
    write_latent_cache(tiny_vae(), data().dataset, tmp_path, max_samples=1, progress=False)
    other = tiny_vae()
    with torch.no_grad():
        other.latent_std.mul_(2)  # same architecture, different statistics -> different latents
    with pytest.raises(ValueError, match="another compressor"):
        write_latent_cache(other, data().dataset, tmp_path, progress=False)


def test_cached_datamodule_batches_latents_of_one_shape(tmp_path) -> None:
    write_latent_cache(tiny_vae(), data().dataset, tmp_path, progress=False)
    module = CachedLatentDataModule(str(tmp_path), batch_size=2)
    batches = list(module.train_dataloader())
    assert sum(len(b["latents"]) for b in batches) == 6
    for batch in batches:
        assert len({tuple(x.shape) for x in batch["latents"]}) == 1
        assert len(batch["captions"]) == len(batch["ids"]) == len(batch["latents"])


def test_a_missing_cache_names_the_directory_and_the_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="cache-latents"):
        CachedLatentDataModule(str(tmp_path / "nowhere")).dataset


def test_cli_reports_a_config_without_a_compressor(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: {}\n")
    assert main(["cache-latents", "-c", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "model.init_args.compressor" in capsys.readouterr().err


def test_video_diffusion_trains_from_the_cache(tmp_path) -> None:
    import lightning as L

    from framework.modules import VideoDiffusion
    from plugins.conditioners.hashed_text import HashedTextConditioner
    from plugins.denoisers.dit import DiT
    from plugins.patchers.spacetime import SpacetimePatcher
    from plugins.samplers.rectified_flow import RectifiedFlow

    vae = tiny_vae()
    write_latent_cache(vae, data().dataset, tmp_path, progress=False)
    model = VideoDiffusion(vae, SpacetimePatcher(1, 1, 1), DiT(width=32, depth=1, num_heads=2),
                           HashedTextConditioner(width=32, depth=1, num_heads=2), RectifiedFlow())
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=CachedLatentDataModule(str(tmp_path), batch_size=2))
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_training_with_another_compressor_than_the_cache_fails_naming_both(tmp_path) -> None:
    import lightning as L

    write_latent_cache(tiny_vae(), data().dataset, tmp_path / "cache", max_samples=2, progress=False)

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.compressor = CausalVAE(latent_channels=4, size=VAESize.TINY, base_channels=4, tiling=None)

        def training_step(self, batch, batch_idx):
            raise AssertionError("setup must fail before any training step")

        def configure_optimizers(self):
            return torch.optim.SGD(self.compressor.parameters(), lr=0.1)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="written by another compressor.*CausalVAE.*CausalVAE"):
        trainer.fit(Model(), datamodule=CachedLatentDataModule(str(tmp_path / "cache")))
