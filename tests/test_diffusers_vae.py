"""FramewiseDiffusersVAE loads a local diffusers AutoencoderKL directory (a tiny random one saved to tmp_path) and
applies it frame by frame, with the directory's latent scaling. Skipped when diffusers is not installed."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="optional extra: pip install 'kinetoscope[diffusers]'")

from plugins.compressors.diffusers_vae import FramewiseDiffusersVAE  # noqa: E402


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        scaling_factor=0.5, shift_factor=0.1,
    )
    path = tmp_path_factory.mktemp("tiny_autoencoder_kl")
    model.save_pretrained(path)
    return path, model.eval()


def test_loads_and_encodes_frame_by_frame_like_the_original(vae_dir) -> None:
    path, reference = vae_dir
    vae = FramewiseDiffusersVAE(str(path), frames_per_batch=2)
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (2, 1, 4)
    video = torch.rand(2, 3, 3, 16, 24) * 2 - 1  # [B, 3, T, H, W]
    with torch.no_grad():
        latent = vae.encode(video)  # [2, 4, 3, 8, 12]
        assert tuple(latent.shape) == (2, 4, 3, 8, 12)
        frame = reference.encode(video[1, :, 2][None]).latent_dist.mean  # [1, 4, 8, 12]
        assert torch.allclose(latent[1, :, 2], ((frame - 0.1) * 0.5)[0], atol=1e-5)
        decoded = vae.decode(latent)
        assert tuple(decoded.shape) == (2, 3, 3, 16, 24)
        expected = reference.decode(frame).sample.clamp(-1, 1)  # [1, 3, 16, 24]
        assert torch.allclose(decoded[1, :, 2], expected[0], atol=1e-5)


def test_an_image_is_a_one_frame_video(vae_dir) -> None:
    vae = FramewiseDiffusersVAE(str(vae_dir[0]))
    with torch.no_grad():
        assert tuple(vae.decode(vae.encode(torch.zeros(1, 3, 1, 8, 8))).shape) == (1, 3, 1, 8, 8)


def test_posterior_is_trainable_and_statistics_can_be_measured(vae_dir) -> None:
    vae = FramewiseDiffusersVAE(str(vae_dir[0]), use_config_scaling=False)
    assert torch.equal(vae.latent_std, torch.ones(4))
    video = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    posterior = vae.posterior(video)
    (vae.decode_latent(posterior.sample()) - video).abs().mean().backward()
    assert any(p.grad is not None for p in vae.parameters())
    vae.fit_latent_statistics([video])
    assert not torch.equal(vae.latent_std, torch.ones(4))


def test_missing_or_wrong_directory_fails_naming_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FramewiseDiffusersVAE(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        FramewiseDiffusersVAE(str(tmp_path))


def test_size_not_divisible_by_the_spatial_factor_is_rejected(vae_dir) -> None:
    vae = FramewiseDiffusersVAE(str(vae_dir[0]))
    with pytest.raises(ValueError, match="width 9 must be a positive multiple of 2"):
        vae.encode(torch.zeros(1, 3, 1, 8, 9))
