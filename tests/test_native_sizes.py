"""One checkpoint, many sizes: a model trained on mixed landscape / portrait / square buckets samples 16:9, 9:16 and
1:1 videos of exactly the requested sizes; the RoPE scaling rule (framework/layers/rope.py) behaves as documented."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from framework.data.buckets import BucketConfig, TokenGeometry
from framework.data.datamodules import ManifestVideoDataModule
from framework.layers.packing import grid_positions
from framework.layers.rope import Rope3D, interpolation_scale
from manifest_media import mixed_media, tiny_model, write_manifest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    rows, _ = mixed_media(folder / "media")
    data = ManifestVideoDataModule(
        write_manifest(folder / "media" / "manifest.csv", rows), tokens_per_batch=512,
        buckets=BucketConfig(resolutions=[24, 32], aspect_ratios=[16 / 9, 1.0, 9 / 16], frame_counts=[1, 4],
                             size_multiple=4, aspect_tolerance=0.25),
        geometry=TokenGeometry(patch_h=4, patch_w=4),
    )
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder)
    trainer.fit(tiny_model(), datamodule=data)
    path = folder / "native.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("frames, height, width", [(4, 36, 64), (4, 64, 36), (4, 48, 48), (1, 72, 128)],
                         ids=["16:9", "9:16", "1:1", "16:9-image-unseen-size"])
def test_one_checkpoint_samples_every_aspect_ratio_at_the_requested_size(checkpoint, frames, height, width):
    model = tiny_model()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    videos = model.generate(["a clip called wide.mp4", "still number 1"], [(frames, height, width)] * 2, [0, 1],
                            steps=2, guidance_scale=2.0)
    for video in videos:
        assert tuple(video.shape) == (3, frames, height, width)
        assert torch.isfinite(video).all() and video.min() >= -1 and video.max() <= 1
    assert not torch.equal(videos[0], videos[1])  # different captions and seeds give different videos


def test_positions_are_grid_indices_with_the_same_spacing_at_every_aspect_ratio():
    wide, tall = grid_positions((1, 9, 16)), grid_positions((1, 16, 9))
    for pos, (h, w) in ((wide, (9, 16)), (tall, (16, 9))):
        grid = pos.view(h, w, 3)  # [h, w, (t, h, w)]
        assert (grid[:, 1:, 2] - grid[:, :-1, 2] == 1).all()  # one unit per patch along the width
        assert (grid[1:, :, 1] - grid[:-1, :, 1] == 1).all()  # and along the height, whatever the aspect ratio
    assert wide[:, 1].max() == tall[:, 2].max() == 8 and wide[:, 2].max() == tall[:, 1].max() == 15


def test_position_interpolation_maps_a_larger_grid_into_the_trained_range():
    trained, requested = (4, 16, 16), (4, 27, 48)
    scale = interpolation_scale(trained, requested)
    assert scale == (1.0, 15 / 26, 15 / 47)
    plain, scaled = Rope3D(16), Rope3D(16, position_scale=scale)
    positions = grid_positions(requested)  # [N, 3]
    cos, sin = scaled.angles(positions)
    ref_cos, ref_sin = plain.angles(positions * torch.tensor(scale))
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    largest = (positions * torch.tensor(scale, dtype=torch.float64)).amax(0)  # back inside the trained extent
    torch.testing.assert_close(largest, torch.tensor([3.0, 15.0, 15.0], dtype=torch.float64))
    torch.testing.assert_close(Rope3D(16).angles(positions)[0], Rope3D(16, position_scale=(1, 1, 1)).angles(positions)[0])
