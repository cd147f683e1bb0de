"""CausalVAE: causal shape arithmetic, images as 1-frame videos, causality, tiled/chunked == whole-clip, latent
statistics, weights files, and errors that name the dimension at fault. Tiny random-init models throughout."""

from __future__ import annotations

import pytest
import torch

from framework.core.registry import default_registry
from plugins.compressors.causal_vae import (
    CausalVAE, ShortcutBasis, Tiling, VAESize, dct_matrix, latent_to_video_frames, temporal_chunks,
)


def tiny_vae(**kwargs) -> CausalVAE:
    """A tiny CausalVAE whose output convolutions are random too (they start at zero, which would hide the
    network behind its parameter-free shortcut), so every layer contributes, as after training."""
    torch.manual_seed(0)
    options = dict(latent_channels=4, size=VAESize.TINY, base_channels=8, tiling=None)
    model = CausalVAE(**{**options, **kwargs}).eval()
    model.encoder.conv_out.conv.reset_parameters()
    model.decoder.conv_out.conv.reset_parameters()
    return model


@pytest.fixture(scope="module")
def vae() -> CausalVAE:
    return tiny_vae()


def smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1  # [1, 3, T, H, W]
    return torch.nn.functional.avg_pool3d(noise, (1, 3, 3), 1, (0, 1, 1))  # [1, 3, T, H, W]


# ---------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_causal_shapes_for_one_plus_4k_frames(vae, frames) -> None:
    video = smooth_video(frames, 16, 24)
    with torch.no_grad():
        latent = vae.encode(video)
        decoded = vae.decode(latent)
    assert tuple(latent.shape) == (1, 4, 1 + (frames - 1) // 4, 2, 3)
    assert vae.latent_shape(frames, 16, 24) == tuple(latent.shape[2:])
    assert decoded.shape == video.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_an_image_round_trips_as_a_one_frame_video(vae) -> None:
    image = smooth_video(1, 32, 16)  # [1, 3, 1, H, W]
    with torch.no_grad():
        latent = vae.encode(image)
        assert tuple(latent.shape) == (1, 4, 1, 4, 2)
        assert tuple(vae.decode(latent).shape) == (1, 3, 1, 32, 16)


def test_other_factors_are_configurable() -> None:
    model = tiny_vae(temporal_factor=2, spatial_factor=4, latent_channels=6)
    with torch.no_grad():
        latent = model.encode(smooth_video(7, 12, 8))
    assert tuple(latent.shape) == (1, 6, 4, 3, 2)
    assert tuple(model.decode(latent).shape) == (1, 3, 7, 12, 8)


def test_presets_grow_in_size() -> None:
    counts = [sum(p.numel() for p in CausalVAE(size=s, tiling=None).parameters()) for s in VAESize]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_encoder_is_causal(vae) -> None:
    """Changing frames 5.. must not change the latent frames that cover frames 0..4."""
    video = smooth_video(13, 16, 16)
    changed = video.clone()
    changed[:, :, 5:] = -video[:, :, 5:]
    with torch.no_grad():
        a, b = vae.encode(video), vae.encode(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_the_first_frame_encodes_like_an_image(vae) -> None:
    video = smooth_video(9, 16, 16)
    with torch.no_grad():
        whole, alone = vae.encode(video)[:, :, :1], vae.encode(video[:, :, :1])
    # Same arithmetic, but the convolutions over 9 frames block their float32 sums (27 x channels terms) differently
    # from those over 1 frame: a few ulp per layer through the encoder, 4.5e-7 measured on latents up to 0.39 (15 ulp).
    # 1e-5 (20x that) leaves room for other CPUs' kernels and stays far below the latents' scale.
    torch.testing.assert_close(whole, alone, rtol=0, atol=1e-5)


def test_untrained_vae_is_the_block_average_autoencoder() -> None:
    """Zero-initialised output convolutions: the fresh VAE reproduces each latent cell's mean colour."""
    torch.manual_seed(0)
    fresh = CausalVAE(latent_channels=6, size=VAESize.TINY, base_channels=8, tiling=None,
                      shortcut=ShortcutBasis.BLOCK_AVERAGE).eval()
    video = smooth_video(5, 16, 16)
    with torch.no_grad():
        decoded = fresh.decode_latent(fresh.posterior(video).mean)  # [1, 3, 5, 16, 16]
    first_cell = video[:, :, :1, :8, :8].mean((2, 3, 4))  # frame 0, top-left 8 x 8 pixels
    later_cell = video[:, :, 1:5, 8:, 8:].mean((2, 3, 4))  # frames 1-4, bottom-right 8 x 8 pixels
    assert torch.allclose(decoded[:, :, 0, :8, :8], first_cell[:, :, None, None].expand(-1, -1, 8, 8), atol=1e-5)
    assert torch.allclose(decoded[:, :, 1:, 8:, 8:], later_cell[:, :, None, None, None].expand(-1, -1, 4, 8, 8),
                          atol=1e-5)


def test_untrained_dct_vae_is_the_projection_onto_its_lowest_dct_coefficients() -> None:
    """The default shortcut: a video made of the kept basis functions (cell means in the three opponent colours,
    then the lowest luma frequencies) round-trips exactly; an unkept frequency is removed; the latent's first
    channel is the cell's mean luma; and an image is its first frame."""
    torch.manual_seed(0)
    fresh = CausalVAE(latent_channels=6, size=VAESize.TINY, base_channels=8, tiling=None).eval()
    ramp = dct_matrix(8)[1].float()  # [8] the lowest horizontal luma frequency, kept (channel 3 or 4)
    cells = torch.rand(3, 2, 2, 2) * 2 - 1  # [3, t, h, w] per-cell colours
    video = cells[:, :, None, :, None, :, None].expand(3, 2, 4, 2, 8, 2, 8).reshape(3, 8, 16, 16)[:, 3:]
    video = video[None] + 0.3 * ramp.repeat(2)  # [1, 3, 5, 16, 16]: cell colours + a kept luma ramp
    with torch.no_grad():
        z = fresh.posterior(video).mean  # [1, 6, 2, 2, 2]
        decoded = fresh.decode_latent(z)  # [1, 3, 5, 16, 16]
        assert torch.allclose(decoded, video, atol=1e-5)
        assert torch.allclose(z[:, 0, 1], video[:, :, 1:5].mean(1).unflatten(2, (2, 8)).unflatten(4, (2, 8))
                              .mean((1, 3, 5)) * 3**0.5, atol=1e-5)  # mean luma (R+G+B)/sqrt(3) of each cell
        highest = dct_matrix(8)[7].float().repeat(2)  # [16] the highest horizontal frequency, not kept
        assert fresh.decode_latent(fresh.posterior(highest.expand(1, 3, 5, 16, 16)).mean).abs().max() < 1e-5
        image = video[:, :, :1]  # [1, 3, 1, 16, 16]
        assert torch.allclose(fresh.decode_latent(fresh.posterior(image).mean), image, atol=1e-5)


def test_dct_shortcut_rejects_more_channels_than_a_cell_has_values() -> None:
    with pytest.raises(ValueError, match="latent_channels 13 > the 12 values"):
        CausalVAE(latent_channels=13, temporal_factor=1, spatial_factor=2, size=VAESize.TINY)


def test_posterior_variance_never_exceeds_the_priors() -> None:
    """Log-variance is capped at 0 however the encoder's head drifts."""
    model = CausalVAE(latent_channels=4, size=VAESize.TINY, base_channels=8, tiling=None)
    with torch.no_grad():
        model.encoder.conv_out.conv.bias[4:] = torch.tensor([5.0, -2.0, 0.5, -7.0])
        logvar = model.posterior(smooth_video(5, 16, 16)).logvar  # [1, 4, 2, 2, 2]
    assert torch.equal(logvar.amax((0, 2, 3, 4)), torch.tensor([0.0, -2.0, 0.0, -7.0]))


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("frames", [2, 4, 8, 10])
def test_frame_count_not_one_plus_4k_is_rejected_naming_it(vae, frames) -> None:
    with pytest.raises(ValueError, match=rf"frames {frames} must be 1 \+ k\*4"):
        vae.encode(smooth_video(frames, 16, 16))


@pytest.mark.parametrize(("height", "width", "name"), [(12, 16, "height 12"), (16, 20, "width 20")])
def test_size_not_divisible_by_8_is_rejected_naming_the_dimension(vae, height, width, name) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive multiple of 8"):
        vae.encode(smooth_video(1, height, width))


def test_wrong_channel_count_is_rejected(vae) -> None:
    with pytest.raises(ValueError, match=r"expects \[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expects \[B, 4, t, h, w\]"):
        vae.decode(torch.zeros(1, 3, 1, 2, 2))


def test_bad_construction_arguments_fail_clearly() -> None:
    with pytest.raises(ValueError, match="temporal_factor must be a power of two"):
        CausalVAE(temporal_factor=3)
    with pytest.raises(ValueError, match="temporal_factor 16 > spatial_factor 8"):
        CausalVAE(temporal_factor=16)
    with pytest.raises(ValueError, match="overlap_latent"):
        Tiling(tile_latent=4, overlap_latent=4)


# ------------------------------------------------------------------------------------------ tiling, chunking
def test_temporal_chunk_bounds_cover_the_clip() -> None:
    assert temporal_chunks(6, 2) == [(0, 1), (1, 3), (3, 5), (5, 6)]
    assert [latent_to_video_frames(a, b, 4) for a, b in temporal_chunks(6, 2)] == [(0, 1), (1, 9), (9, 17), (17, 21)]


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_temporally_chunked_encode_and_decode_equal_the_whole_clip(vae, chunk) -> None:
    """Causal caches make chunking exact up to float rounding (tolerance 1e-5 absolute)."""
    video = smooth_video(17, 16, 16)
    no_spatial_tiles = Tiling(tile_latent=64, overlap_latent=0, context_latent=0, chunk_latent_frames=chunk)
    with torch.no_grad():
        whole = vae.posterior(video).mean  # [1, 4, 5, 2, 2]
        chunked = vae.encode_tiled(video, no_spatial_tiles)
        assert torch.allclose(chunked, whole, atol=1e-5)
        decoded = vae.decode_latent(whole)
        pieces = list(vae.decode_stream(whole, no_spatial_tiles))
        assert [p.shape[2] for p in pieces][0] == 1 and sum(p.shape[2] for p in pieces) == 17
        assert torch.allclose(vae.decode_tiled(whole, no_spatial_tiles), decoded, atol=1e-5)


def test_spatial_tiles_equal_the_whole_clip_when_context_covers_the_receptive_field(vae) -> None:
    """A wide clip cut into 8-latent tiles: with 16 latents of context (more than this model's receptive field) the
    blended result matches the whole clip to 1e-5; with less context the border error grows (the blend hides it
    only partially in a random-init model), which is why ``context_latent`` exists."""
    video = smooth_video(5, 16, 8 * 48)  # latent 2 x 48
    with torch.no_grad():
        whole = vae.posterior(video).mean
        decoded = vae.decode_latent(whole)
        errors = []
        for context in (0, 4, 16):
            tiling = Tiling(tile_latent=8, overlap_latent=2, context_latent=context, chunk_latent_frames=1)
            encode_error = (vae.encode_tiled(video, tiling) - whole).abs().max().item()
            decode_error = (vae.decode_tiled(whole, tiling) - decoded).abs().max().item()
            errors.append((encode_error, decode_error))
    assert errors[2][0] < 1e-5 and errors[2][1] < 1e-5
    assert errors[0][0] > errors[1][0] > errors[2][0]
    assert errors[0][1] > errors[1][1] > errors[2][1]


def test_encode_and_decode_use_the_configured_tiling() -> None:
    tiled = tiny_vae(tiling=Tiling(tile_latent=2, overlap_latent=1, context_latent=16, chunk_latent_frames=1))
    untiled = tiny_vae()
    video = smooth_video(5, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tiled.encode(video), untiled.encode(video), atol=1e-5)
        latent = untiled.encode(video)
        assert torch.allclose(tiled.decode(latent), untiled.decode(latent), atol=1e-5)


# --------------------------------------------------------------------------------- statistics, weights, registry
def test_latent_statistics_are_measured_and_normalise_the_latent(tmp_path) -> None:
    model = tiny_vae()
    videos = [smooth_video(5, 16, 16, seed)[0] for seed in range(4)] + [smooth_video(1, 16, 24, 9)[0]]
    batches = [{"videos": videos[:2]}, {"videos": videos[2:]}]
    mean, std = model.fit_latent_statistics(batches)
    with torch.no_grad():
        latents = torch.cat([model.encode(v[None]).flatten(2) for v in videos], dim=2)  # [1, c, N]
    assert torch.allclose(latents.mean(2)[0], torch.zeros(4), atol=1e-4)
    assert torch.allclose(latents.std(2, unbiased=False)[0], torch.ones(4), atol=1e-4)
    assert "latent_mean" in model.state_dict() and torch.equal(model.state_dict()["latent_std"], std)
    path = model.save_weights(tmp_path / "vae.safetensors")
    loaded = tiny_vae(checkpoint=str(path))
    assert torch.equal(loaded.latent_mean, mean)
    with torch.no_grad():
        assert torch.equal(loaded.encode(videos[0][None]), model.encode(videos[0][None]))


def test_a_checkpoint_for_another_configuration_fails_naming_the_file(tmp_path) -> None:
    path = tiny_vae().save_weights(tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="vae.safetensors.*does not match"):
        tiny_vae(latent_channels=8, checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tiny_vae(checkpoint=str(tmp_path / "missing.safetensors"))


def test_registered_as_a_compressor_plugin() -> None:
    names = {info.cls.__name__: info.kind for info in default_registry().list("compressor")}
    assert names.get("CausalVAE") == "compressor"
