"""Inception-I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017) as in TF-Hub's Kinetics-400 module.

This is the network behind every published FVD number (``https://tfhub.dev/deepmind/i3d-kinetics-400/1``, the
graph from deepmind/kinetics-i3d ``i3d.py``), rewritten in PyTorch so that its output matches TensorFlow's:

* TF "SAME" padding, computed per input size: total padding ``max((ceil(n / s) − 1)·s + k − n, 0)`` with the
  smaller half before and the larger half after (asymmetric when odd), unlike PyTorch's symmetric ``padding=``.
  Max-pool padding is −inf (TF's SAME pooling ignores padded positions).
* Sonnet v1 BatchNorm with ``eps = 1e-3``, no scale (γ = 1), and moving statistics at inference.
* Logits: 2×7×7 VALID average pool, a biased 1×1×1 conv, spatial squeeze, then the mean over time (the
  ``RGB/inception_i3d/Mean:0`` tensor FVD uses as its 400-d feature).

Module names follow the TF-Hub variable names (``Mixed_4b/Branch_1/Conv3d_0b_3x3/conv_3d/w`` is
``Mixed_4b.Branch_1.Conv3d_0b_3x3.conv_3d.weight`` here) so that converted weights map one to one; see
``framework.metrics.i3d_weights`` for fetching the real weights. Input: ``[B, 3, T, H, W]`` in [-1, 1];
the published protocol uses T = 16 frames at 224×224.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InceptionI3D", "tf_same_padding"]

NUM_KINETICS_CLASSES = 400
BATCH_NORM_EPS = 1e-3  # Sonnet v1 / TF default, not PyTorch's 1e-5

# Mixed block -> output channels (branch0 1x1, branch1 1x1, branch1 3x3, branch2 1x1, branch2 3x3, branch3 1x1).
INCEPTION_CHANNELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def tf_same_padding(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[int]:
    """TF "SAME" padding for the trailing dims ``sizes`` as an ``F.pad`` list (last dim first, before/after pairs).

    TF puts the extra pixel of an odd total *after* the data, which is why this cannot be a symmetric
    ``padding=`` argument: with a 7×7×7 stride-2 conv on 224 pixels TF pads (2, 3), not (3, 3).
    """
    pad: list[int] = []
    for n, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pad += [total // 2, total - total // 2]
    return pad


class BatchNormNoScale(nn.Module):
    """Inference-time Sonnet v1 BatchNorm without γ: ``(x − moving_mean) / sqrt(moving_variance + 1e-3) + beta``.

    The I3D here is a fixed feature extractor, so the moving statistics are always used (also in ``train()``).
    """

    def __init__(self, channels: int, eps: float = BATCH_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("moving_mean", torch.zeros(channels))
        self.register_buffer("moving_variance", torch.ones(channels))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The affine map this layer applies: ``scale`` = 1/√(σ² + ε) and ``shift`` = β − μ·scale, each [C]."""
        scale = torch.rsqrt(self.moving_variance + self.eps)  # [C]
        return scale, self.beta - self.moving_mean * scale

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, T, H, W]
        scale, shift = self.scale_and_shift()  # [C] each
        return x * scale[:, None, None, None] + shift[:, None, None, None]  # [B, C, T, H, W]


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding, no bias) -> BatchNorm (no scale) -> ReLU; the logits unit has a bias and neither.

    The forward pass folds the inference-time BatchNorm into the convolution (``w·s``, ``β − μ·s`` with
    ``s = 1/√(σ² + ε)``) and passes symmetric SAME padding to the convolution itself: one conv with a bias and an
    in-place ReLU instead of pad copy, conv, scale, shift and ReLU (about 2× faster on CPU, equal within float32
    rounding). Only the stride-2 layers with odd totals still need an explicit asymmetric ``F.pad``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm_and_relu: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv_3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not batch_norm_and_relu)
        self.batch_norm = BatchNormNoScale(out_channels) if batch_norm_and_relu else None

    def folded_weights(self) -> tuple[Tensor, Tensor | None]:
        """The convolution's (weight [C_out, C_in, kT, kH, kW], bias [C_out]) with the BatchNorm folded in."""
        if self.batch_norm is None:
            return self.conv_3d.weight, self.conv_3d.bias
        scale, shift = self.batch_norm.scale_and_shift()  # [C_out] each
        return self.conv_3d.weight * scale[:, None, None, None, None], shift

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C_in, T, H, W]
        weight, bias = self.folded_weights()
        return conv_same(x, weight, bias, self.stride, relu=self.batch_norm is not None)  # [B, C_out, T/s, H/s, W/s]


def _symmetric(pad: list[int]) -> tuple[int, ...] | None:
    """An ``F.pad`` list as a (T, H, W) ``padding=`` tuple when every before/after pair is equal, else None."""
    pairs = list(zip(pad[0::2], pad[1::2]))
    if any(before != after for before, after in pairs):
        return None
    return tuple(before for before, _ in reversed(pairs))


def conv_same(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int, int], relu: bool) -> Tensor:
    """``F.conv3d`` with TF SAME padding (built into the conv when symmetric), optionally followed by a ReLU."""
    pad = tf_same_padding(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride)
    padding = _symmetric(pad)
    if padding is None:
        x, padding = F.pad(x, pad), (0, 0, 0)  # [B, C_in, T', H', W']
    y = F.conv3d(x, weight, bias, stride, padding)  # [B, C_out, T/s, H/s, W/s]
    return F.relu_(y) if relu else y


class MaxPool3dSame(nn.Module):
    """Max pool with TF "SAME" padding (padded positions are −inf, so they never win)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, T, H, W]
        pad = tf_same_padding(tuple(x.shape[2:]), self.kernel, self.stride)
        padding = _symmetric(pad)  # max_pool3d's own padding is already -inf
        if padding is None:
            x, padding = F.pad(x, pad, value=float("-inf")), (0, 0, 0)
        return F.max_pool3d(x, self.kernel, self.stride, padding)  # [B, C, T/s, H/s, W/s]


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; 3x3 max-pool->1x1) concatenated on channels."""

    def __init__(self, in_channels: int, channels: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = channels
        self.out_channels = c0 + c1b + c2b + c3
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c0)})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c1a),
                                       "Conv3d_0b_3x3": Unit3D(c1a, c1b, (3, 3, 3))})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c2a),
                                       "Conv3d_0b_3x3": Unit3D(c2a, c2b, (3, 3, 3))})
        self.Branch_3 = nn.ModuleDict({"MaxPool3d_0a_3x3": MaxPool3dSame((3, 3, 3), (1, 1, 1)),
                                       "Conv3d_0b_1x1": Unit3D(in_channels, c3)})

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C_in, T, H, W]
        # The three 1x1 convolutions that read x run as one (their weights concatenated): one pass over the input.
        heads = [self.Branch_0["Conv3d_0a_1x1"], self.Branch_1["Conv3d_0a_1x1"], self.Branch_2["Conv3d_0a_1x1"]]
        folded = [head.folded_weights() for head in heads]
        weight = torch.cat([w for w, _ in folded])  # [c0 + c1a + c2a, C_in, 1, 1, 1]
        bias = torch.cat([b for _, b in folded])  # [c0 + c1a + c2a]
        y = conv_same(x, weight, bias, (1, 1, 1), relu=True)  # [B, c0 + c1a + c2a, T, H, W]
        branch_0, branch_1, branch_2 = y.split([w.shape[0] for w, _ in folded], dim=1)
        branch_1 = self.Branch_1["Conv3d_0b_3x3"](branch_1)  # [B, c1b, T, H, W]
        branch_2 = self.Branch_2["Conv3d_0b_3x3"](branch_2)  # [B, c2b, T, H, W]
        branch_3 = self.Branch_3["Conv3d_0b_1x1"](self.Branch_3["MaxPool3d_0a_3x3"](x))  # [B, c3, T, H, W]
        return torch.cat([branch_0, branch_1, branch_2, branch_3], dim=1)  # [B, C_out, T, H, W]


class InceptionI3D(nn.Module):
    """RGB Inception-I3D with the TF-Hub Kinetics-400 layout; ``forward`` returns time-averaged logits [B, 400].

    ``num_features`` (= ``num_classes``) is what ``FrechetVideoDistance`` reads to size its statistics. A freshly
    constructed model is randomly initialised (for tests); ``framework.metrics.i3d_weights.load_i3d`` loads the
    real weights. Inputs need at least 9 frames and 193×193 pixels for the 2×7×7 VALID logits pool to fit; above
    224×224 the pooled logits are also averaged over space (TF-Hub's module accepts only a 1×1 spatial output).
    """

    def __init__(self, num_classes: int = NUM_KINETICS_CLASSES) -> None:
        super().__init__()
        self.num_classes = self.num_features = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = 192
        blocks: dict[str, nn.Module] = {}
        for name, block_channels in INCEPTION_CHANNELS.items():
            if name == "Mixed_4b":
                blocks["MaxPool3d_4a_3x3"] = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                blocks["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            block = InceptionBlock(channels, block_channels)
            blocks[name] = block
            channels = block.out_channels
        for name, module in blocks.items():  # attributes, so parameter names read like the TF variables
            setattr(self, name, module)
        self.block_names = list(blocks)
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(channels, num_classes, batch_norm_and_relu=False)})
        self._init_random()

    def _init_random(self) -> None:
        """Random weights with realistic scale (He init, BN statistics at identity) so random-I3D tests are non-trivial."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def features(self, videos: Tensor) -> Tensor:
        """Mixed_5c activations [B, 1024, T/8, H/32, W/32] of ``videos`` [B, 3, T, H, W] in [-1, 1]."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"I3D expects videos [B, 3, T, H, W], got shape {list(videos.shape)}")
        if videos.device.type == "cpu":
            # oneDNN's 3-D convolutions are about 1.5x faster channels-last (NDHWC); every layer keeps the layout.
            # Only measured on CPU, so other devices keep the default layout.
            videos = videos.contiguous(memory_format=torch.channels_last_3d)
        x = self.Conv3d_1a_7x7(videos)  # [B, 64, T/2, H/2, W/2]
        x = self.MaxPool3d_2a_3x3(x)  # [B, 64, T/2, H/4, W/4]
        x = self.Conv3d_2b_1x1(x)  # [B, 64, T/2, H/4, W/4]
        x = self.Conv3d_2c_3x3(x)  # [B, 192, T/2, H/4, W/4]
        x = self.MaxPool3d_3a_3x3(x)  # [B, 192, T/2, H/8, W/8]
        for name in self.block_names:
            x = getattr(self, name)(x)  # ... -> [B, 1024, T/8, H/32, W/32]
        return x

    def forward(self, videos: Tensor) -> Tensor:
        """Kinetics-400 logits averaged over time: [B, 3, T, H, W] in [-1, 1] -> [B, 400]."""
        x = self.features(videos)  # [B, 1024, T/8, H/32, W/32]
        if x.shape[2] < 2 or x.shape[3] < 7 or x.shape[4] < 7:
            raise ValueError(
                f"I3D input {list(videos.shape[2:])} (T, H, W) is too small for the 2x7x7 logits pool; "
                "use at least 9 frames and 193x193 pixels (the FVD protocol uses 16x224x224)"
            )
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # [B, 1024, T', H', W'] (VALID)
        logits = self.Logits["Conv3d_0c_1x1"](x)  # [B, 400, T', H', W']
        logits = logits.mean(dim=(3, 4)) if logits.shape[3:] != (1, 1) else logits[:, :, :, 0, 0]  # [B, 400, T']
        return logits.mean(dim=2)  # [B, 400]
