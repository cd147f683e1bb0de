"""Causal 3D VAE: compresses video 4x in time and 8x in space (both configurable) into a KL-regularised latent.

Design, after the causal video VAEs of MAGVIT-v2 (Yu et al., "Language Model Beats Diffusion", 2023), CogVideoX
(Yang et al., 2024) and Wan 2.1 (Wan team, 2025):

* **Causal in time.** Every 3D convolution pads only the past (by repeating the first frame), so output frame ``t``
  depends on input frames ``<= t``. With strided causal convolutions ``1 + 4k`` frames map to ``1 + k`` latent
  frames: the first frame is encoded on its own, as an image, so a single image (T = 1) is a valid input and images
  and videos share one latent space.
* **Local normalisation.** Norms act per position over channels (RMS over C, as Wan's VAE), never across frames or
  pixels, so chunked and tiled processing sees exactly what whole-clip processing sees, except at tile borders.
* **KL latent.** The encoder predicts a diagonal Gaussian (mean, log-variance); ``framework.layers.variational`` owns the
  posterior, the KL term and the per-channel latent statistics that normalise the latent for diffusion.
* **Memory-bounded inference** (:class:`Tiling`). Time is processed in chunks carried by a *causal cache*: each
  causal convolution keeps the tail of its previous chunk's input (Wan's "feature cache"), so chunked results equal
  the whole clip up to float rounding. Space is cut into overlapping tiles blended with linear ramps over the
  overlap (as diffusers' tiled VAEs do); this is approximate near tile borders (bounded in tests/test_causal_vae.py).

Bad input policy: no silent padding or cropping. A frame count that is not ``1 + k * temporal_factor`` or a height /
width that is not a multiple of ``spatial_factor`` raises ValueError naming the dimension and the rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework.layers.variational import DiagonalGaussian, VariationalCompressor


_ONEDNN = torch.backends.mkldnn.is_available()


# ------------------------------------------------------------------------------------------------ building blocks
class StreamCache:
    """State carried between temporal chunks: the tail of each causal convolution's padded input, and which
    temporal upsamplers have already emitted the (single) first frame."""

    def __init__(self) -> None:
        self.tails: dict[nn.Module, Tensor] = {}
        self.started: set[nn.Module] = set()

    def first_call(self, module: nn.Module) -> bool:
        first = module not in self.started
        self.started.add(module)
        return first


class CausalConv3d(nn.Module):
    """3D convolution that pads ``kernel_t - 1`` frames only on the past (repeating the first frame).

    With a ``StreamCache`` the padding of every chunk after the first is the previous chunk's tail instead, so a
    clip processed chunk by chunk gives the same output as the whole clip. The kept tail starts where the next
    convolution window starts, which keeps strided (downsampling) convolutions aligned across chunks too.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel_size
        self.kernel_t, self.stride_t = kt, stride[0]
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=(0, kh // 2, kw // 2))

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        past = cache.tails.get(self) if cache is not None else None
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.kernel_t - 1, -1, -1)  # [B, C, kt-1, H, W] first frame repeated
        x = torch.cat([past, x], dim=2)  # [B, C, kt-1+T, H, W]
        if cache is not None:
            windows = (x.shape[2] - self.kernel_t) // self.stride_t + 1
            cache.tails[self] = x[:, :, windows * self.stride_t :].clone()  # [B, C, <kt, H, W]
        conv = self.conv
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and _ONEDNN:
            # For batch-1 inputs with N*C*T*H <= 20480 (short temporal chunks) PyTorch falls back to an im2col
            # convolution that is ~3x slower and holds 27x the input; call oneDNN directly (inference only).
            return torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation,
                                            conv.groups)  # [B, C', T', H', W']
        return conv(x)  # [B, C', T', H', W']


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) position: local, so causal and tile-friendly (Wan's VAE norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        inverse_rms = torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-6)  # [B, 1, T, H, W]
        return x * inverse_rms * self.gain.view(1, -1, 1, 1, 1)  # [B, C, T, H, W]


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(in_channels), CausalConv3d(in_channels, out_channels)
        self.norm2, self.conv2 = ChannelRMSNorm(out_channels), CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cache: StreamCache | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # [B, C', T, H, W]
        h = self.conv2(F.silu(self.norm2(h)), cache)  # [B, C', T, H, W]
        return self.skip(x) + h  # [B, C', T, H, W]


class Upsample(nn.Module):
    """2x nearest upsampling in space, and optionally causal 2x in time: a causal convolution predicts two frames
    per frame (initialised to repeat it), and the very first output frame is dropped, so ``1 + k`` -> ``1 + 2k``."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.conv = CausalConv3d(channels, channels)
        if self.time_conv is not None:
            weight = torch.zeros(2 * channels, channels, 3, 1, 1)
            eye = torch.eye(channels)
            weight[:channels, :, -1, 0, 0], weight[channels:, :, -1, 0, 0] = eye, eye  # both frames = current
            with torch.no_grad():
                self.time_conv.conv.weight.copy_(weight)
                self.time_conv.conv.bias.zero_()

    def forward(self, x: Tensor, cache: StreamCache | None) -> Tensor:
        if self.time_conv is not None:
            b, c, t, h, w = x.shape
            pairs = self.time_conv(x, cache).view(b, 2, c, t, h, w)  # [B, 2, C, T, H, W]
            x = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # [B, C, 2T, H, W], frame t -> 2t, 2t+1
            if cache is None or cache.first_call(self):
                x = x[:, :, 1:]  # [B, C, 2T-1, H, W]: the first frame is an image, it maps to one frame
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # [B, C, T', 2H, 2W]
        return self.conv(x, cache)  # [B, C, T', 2H, 2W]


class ShortcutBasis(Enum):
    """The linear map between a latent cell's pixels and its latent channels that the untrained VAE is.

    ``DCT``: the cell's ``3 x temporal_factor x spatial_factor^2`` values in an orthonormal opponent colour space
    (luma, red-blue, green-magenta) and a 3D DCT-II (as JPEG's 8 x 8 DCT, here also over the cell's frames); the
    latent keeps the ``c`` lowest-frequency coefficients: the three colour means first, then luma coefficients by
    ascending total frequency ``kt + ky + kx`` (ties: time, then rows, then columns), then chroma ones. The
    decoder's shortcut is the transpose, so the untrained VAE is the orthogonal projection onto those basis
    functions: all ``c`` channels carry information (on the held-out clips of ``benchmarks/vae_reconstruction.py``
    8 coefficients reconstruct to ~25 dB PSNR, against ~21 dB for the block average).
    ``BLOCK_AVERAGE``: each cell's mean colour, copied cyclically into the ``c`` channels (3 distinct values)."""

    DCT = "dct"
    BLOCK_AVERAGE = "block_average"


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II ``[n frequencies, n samples]``."""
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)  # [n, n]
    m[0] /= math.sqrt(2)
    return m


OPPONENT_COLOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]], dtype=torch.float64)


def shortcut_maps(basis: ShortcutBasis, latent_channels: int, temporal_factor: int, spatial_factor: int
                  ) -> tuple[Tensor, Tensor]:
    """``(down, up)``, each ``[c, 3, tf, sf, sf]``: latent channel ``i`` of a cell is ``<down[i], cell>`` and the
    cell decodes to ``sum_i z_i up[i]``."""
    c, tf, sf = latent_channels, temporal_factor, spatial_factor
    cell = tf * sf * sf
    if basis is ShortcutBasis.BLOCK_AVERAGE:
        colour_of_channel = F.one_hot(torch.arange(c) % 3, 3).double()  # [c, 3]
        down = colour_of_channel / cell  # [c, 3]: the cell's mean colour
        up = colour_of_channel / colour_of_channel.sum(0)  # [c, 3]: the mean of the channels holding a colour
        return (down[:, :, None, None, None].expand(c, 3, tf, sf, sf).float().contiguous(),
                up[:, :, None, None, None].expand(c, 3, tf, sf, sf).float().contiguous())
    if c > 3 * cell:
        raise ValueError(f"CausalVAE: latent_channels {c} > the {3 * cell} values of a latent cell (DCT shortcut)")
    colours = OPPONENT_COLOURS / OPPONENT_COLOURS.norm(dim=1, keepdim=True)  # [3 opponent, 3 RGB], orthonormal
    frequencies = [(colour, kt, ky, kx) for colour in range(3) for kt in range(tf) for ky in range(sf)
                   for kx in range(sf)]
    frequencies.sort(key=lambda f: (f[1:] != (0, 0, 0), f[0] != 0, sum(f[1:]), f))  # DCs, luma, then chroma
    dt, ds = dct_matrix(tf), dct_matrix(sf)  # [tf, tf], [sf, sf]
    basis_vectors = torch.stack([
        torch.einsum("a,t,y,x->atyx", colours[colour], dt[kt], ds[ky], ds[kx])
        for colour, kt, ky, kx in frequencies[:c]
    ])  # [c, 3, tf, sf, sf], orthonormal
    # Scaled so channel 0 is the cell's mean luma (R+G+B)/sqrt(3): latents keep the block average's scale.
    return (basis_vectors / math.sqrt(cell)).float(), (basis_vectors * math.sqrt(cell)).float()


class SpaceTimeShortcut(nn.Module):
    """Linear residual path between video and latent (DC-AE's "residual autoencoding", Chen et al., "Deep
    Compression Autoencoder for Efficient High-Resolution Diffusion Models", 2024, here causal in time).

    Each latent cell (frame 0 alone, then groups of ``temporal_factor`` frames, each ``spatial_factor``^2 pixels)
    maps linearly to its ``c`` channels (:meth:`down`, the encoder's) and back (:meth:`up`, the decoder's) by the
    maps of a :class:`ShortcutBasis`; the first cell is frame 0 repeated ``temporal_factor`` times, so a single
    image is a valid input. Both directions are local to a latent cell, so chunks and tiles stay exact; with the
    encoder's and decoder's output convolutions starting at zero, the untrained VAE is this linear autoencoder, and
    training learns the residual (which converges far faster on CPU). The map is fixed, derived from the
    configuration, so it is not part of the weights (training it directly with the network's learning rate only
    unsettles the basis: DCT coefficients are already close to the data's principal components).
    """

    def __init__(self, cell_map: Tensor) -> None:
        super().__init__()
        _, _, self.temporal_factor, self.spatial_factor, _ = cell_map.shape  # [c, 3, tf, sf, sf]
        self.register_buffer("cell_map", cell_map, persistent=False)

    def down(self, video: Tensor, first_chunk: bool) -> Tensor:
        tf, sf = self.temporal_factor, self.spatial_factor
        if first_chunk:
            video = torch.cat([video[:, :, :1].expand(-1, -1, tf - 1, -1, -1), video], dim=2)  # [B, 3, tf*t, H, W]
        b, _, frames, height, width = video.shape
        cells = video.reshape(b, 3, frames // tf, tf, height // sf, sf, width // sf, sf)  # [B, 3, t, tf, h, sf, w, sf]
        return torch.einsum("bktuhywx,ckuyx->bcthw", cells, self.cell_map)  # [B, c, t, h, w]

    def up(self, z: Tensor, first_chunk: bool) -> Tensor:
        tf, sf = self.temporal_factor, self.spatial_factor
        b, _, t, h, w = z.shape
        cells = torch.einsum("bcthw,ckuyx->bktuhywx", z, self.cell_map)  # [B, 3, t, tf, h, sf, w, sf]
        frames = cells.reshape(b, 3, t * tf, h * sf, w * sf)  # [B, 3, t*tf, H, W]
        return frames[:, :, tf - 1 :] if first_chunk else frames  # [B, 3, T, H, W]: frame 0 is one frame


class CausalEncoder(nn.Module):
    """conv -> [ResBlocks, strided causal conv] per level -> 2 ResBlocks -> norm, SiLU, conv to 2c moments
    (+ the linear shortcut on the mean)."""

    def __init__(
        self, channels: list[int], res_blocks: int, temporal_down: list[bool], latent_channels: int,
        shortcut: SpaceTimeShortcut,
    ) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.conv_in = CausalConv3d(3, channels[0])
        self.stages, self.downs = nn.ModuleList(), nn.ModuleList()
        c = channels[0]
        for level, width in enumerate(channels):
            self.stages.append(nn.ModuleList(ResBlock(c if i == 0 else width, width) for i in range(res_blocks)))
            c = width
            if level < len(channels) - 1:
                self.downs.append(CausalConv3d(c, c, (3, 3, 3), stride=(2 if temporal_down[level] else 1, 2, 2)))
        self.mid = nn.ModuleList([ResBlock(c, c), ResBlock(c, c)])
        self.norm_out, self.conv_out = ChannelRMSNorm(c), CausalConv3d(c, 2 * latent_channels)

    def forward(self, video: Tensor, cache: StreamCache | None = None) -> Tensor:
        first_chunk = cache is None or cache.first_call(self)
        x = self.conv_in(video, cache)  # [B, C0, T, H, W]
        for level, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, cache)  # [B, Ci, Ti, Hi, Wi]
            if level < len(self.downs):
                x = self.downs[level](x, cache)  # [B, Ci, Ti or 1+(Ti-1)/2, Hi/2, Wi/2]
        for block in self.mid:
            x = block(x, cache)  # [B, C, t, h, w]
        mean, logvar = self.conv_out(F.silu(self.norm_out(x)), cache).chunk(2, dim=1)  # each [B, c, t, h, w]
        return torch.cat([mean + self.shortcut.down(video, first_chunk), logvar], dim=1)  # [B, 2c, t, h, w]


class CausalDecoder(nn.Module):
    """Mirror of the encoder: conv -> 2 ResBlocks -> [ResBlocks, Upsample] per level -> norm, SiLU, conv to RGB
    (+ the linear shortcut). The shortcut's reconstruction also enters the last, full-resolution stage through a
    convolution (``shortcut_in``), so that stage refines an image it can see (removing the shortcut's block edges,
    sharpening) instead of having to rebuild it from the upsampled latent features."""

    def __init__(
        self, channels: list[int], res_blocks: int, temporal_up: list[bool], latent_channels: int,
        shortcut: SpaceTimeShortcut,
    ) -> None:
        super().__init__()
        self.shortcut = shortcut
        widths = channels[::-1]
        c = widths[0]
        self.conv_in = CausalConv3d(latent_channels, c)
        self.mid = nn.ModuleList([ResBlock(c, c), ResBlock(c, c)])
        self.stages, self.ups = nn.ModuleList(), nn.ModuleList()
        for level, width in enumerate(widths):
            self.stages.append(nn.ModuleList(ResBlock(c if i == 0 else width, width) for i in range(res_blocks + 1)))
            c = width
            if level < len(widths) - 1:
                self.ups.append(Upsample(c, temporal_up[level]))
        self.shortcut_in = CausalConv3d(3, widths[max(0, len(widths) - 2)])  # the last stage's input width
        self.norm_out, self.conv_out = ChannelRMSNorm(c), CausalConv3d(c, 3)

    def forward(self, z: Tensor, cache: StreamCache | None = None) -> Tensor:
        first_chunk = cache is None or cache.first_call(self)
        coarse = self.shortcut.up(z, first_chunk)  # [B, 3, T, H, W]
        x = self.conv_in(z, cache)  # [B, C, t, h, w]
        for block in self.mid:
            x = block(x, cache)  # [B, C, t, h, w]
        for level, stage in enumerate(self.stages):
            if level == len(self.stages) - 1:
                x = x + self.shortcut_in(coarse, cache)  # [B, C1, T, H, W]
            for block in stage:
                x = block(x, cache)  # [B, Ci, Ti, Hi, Wi]
            if level < len(self.ups):
                x = self.ups[level](x, cache)  # [B, Ci, Ti or 2Ti-1, 2Hi, 2Wi]
        return self.conv_out(F.silu(self.norm_out(x)), cache) + coarse  # [B, 3, T, H, W]


# ------------------------------------------------------------------------------------------------------ tiling
@dataclass
class Tiling:
    """Memory-bounded encode/decode. Sizes are in *latent* units so encoder and decoder tiles line up.

    Time: the first latent frame (the image frame) is its own chunk, then ``chunk_latent_frames`` latent frames
    (``chunk_latent_frames * temporal_factor`` video frames) per chunk, carried by causal caches (exact).
    Space: ``tile_latent`` x ``tile_latent`` tiles overlapping by ``overlap_latent``, blended with linear ramps.
    Each tile is computed with up to ``context_latent`` extra latent pixels of its neighbours on every side, which
    are cropped off again: with context >= the network's receptive field a tile is exact, with less its border
    errors fall inside the blended overlap.
    """

    tile_latent: int = 32
    overlap_latent: int = 8
    context_latent: int = 8
    chunk_latent_frames: int = 2

    def __post_init__(self) -> None:
        if self.tile_latent < 1 or self.chunk_latent_frames < 1:
            raise ValueError(f"Tiling: tile_latent and chunk_latent_frames must be >= 1, got {self}")
        if self.context_latent < 0:
            raise ValueError(f"Tiling: context_latent must be >= 0, got {self}")
        if not 0 <= self.overlap_latent < self.tile_latent:
            raise ValueError(f"Tiling: overlap_latent must be in [0, tile_latent), got {self}")


@dataclass(frozen=True)
class LatentTile:
    """A tile's core (the part it contributes) and its context window ``(top, bottom, left, right)``, in latents."""

    y: int
    x: int
    height: int
    width: int
    window: tuple[int, int, int, int]

    def rows(self, scale: int) -> slice:
        return slice(self.y * scale, (self.y + self.height) * scale)

    def cols(self, scale: int) -> slice:
        return slice(self.x * scale, (self.x + self.width) * scale)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering ``[0, size)``, neighbours overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def blend_ramp(length: int, ramp: int, at_start: bool, at_end: bool) -> Tensor:
    """Weights ``[length]``: 1 inside, rising linearly over ``ramp`` samples at an edge shared with a neighbour."""
    weight = torch.ones(length)
    steps = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)  # (0, 1), never 0
    if at_start and ramp:
        weight[:ramp] = steps
    if at_end and ramp:
        weight[length - ramp :] = torch.minimum(weight[length - ramp :], steps.flip(0))
    return weight


def temporal_chunks(latent_frames: int, chunk: int) -> list[tuple[int, int]]:
    """Latent frame ranges: ``[0, 1)`` (the image frame), then ``chunk`` frames at a time."""
    bounds = [(0, 1)]
    for start in range(1, latent_frames, chunk):
        bounds.append((start, min(start + chunk, latent_frames)))
    return bounds


def latent_to_video_frames(start: int, end: int, temporal_factor: int) -> tuple[int, int]:
    """Video frame range of latent frames ``[start, end)`` under causal compression (latent 0 <-> video frame 0)."""
    # latent frame 0 covers video frame 0; latent frame i >= 1 covers video frames [1 + (i-1)*tf, 1 + i*tf)
    return (0 if start == 0 else 1 + (start - 1) * temporal_factor), 1 + (end - 1) * temporal_factor


# --------------------------------------------------------------------------------------------------- the plugin
class VAESize(Enum):
    """Size presets (base channels, ResBlocks per level). Channels per level are base x (1, 2, 4, 4, ...)."""

    TINY = (16, 1)
    SMALL = (32, 1)
    BASE = (64, 2)


class CausalVAE(VariationalCompressor):
    """Causal 3D KL-VAE: ``1 + 4k`` frames -> ``1 + k`` latent frames, 8x smaller in space (both configurable)."""

    causal = True

    def __init__(
        self,
        latent_channels: int = 8,
        size: VAESize = VAESize.SMALL,
        temporal_factor: int = 4,
        spatial_factor: int = 8,
        base_channels: int | None = None,
        res_blocks: int | None = None,
        tiling: Tiling | None = Tiling(),
        checkpoint: str | None = None,
        shortcut: ShortcutBasis = ShortcutBasis.DCT,
    ) -> None:
        """``base_channels`` / ``res_blocks`` override the ``size`` preset; ``tiling`` None encodes and decodes
        whole clips at once; ``checkpoint`` loads weights and latent statistics from a ``.safetensors`` file written
        by :meth:`save_weights` (e.g. by ``CompressorTraining(export_path=...)``) or a Lightning ``.ckpt``;
        ``shortcut`` picks the fixed linear map between a latent cell and its channels that the untrained VAE is
        (:class:`ShortcutBasis`: ``DCT`` keeps each cell's ``latent_channels`` lowest DCT coefficients)."""
        super().__init__(latent_channels)
        for name, factor in (("temporal_factor", temporal_factor), ("spatial_factor", spatial_factor)):
            if factor < 1 or factor & (factor - 1):
                raise ValueError(f"CausalVAE: {name} must be a power of two >= 1, got {factor}")
        if temporal_factor > spatial_factor:
            raise ValueError(
                f"CausalVAE: temporal_factor {temporal_factor} > spatial_factor {spatial_factor}; each temporal "
                "downsampling shares a level with a spatial one"
            )
        preset_channels, preset_blocks = size.value
        base = base_channels if base_channels is not None else preset_channels
        blocks = res_blocks if res_blocks is not None else preset_blocks
        if base < 1 or blocks < 1:
            raise ValueError(f"CausalVAE: base_channels and res_blocks must be >= 1, got {base}, {blocks}")
        self.temporal_factor, self.spatial_factor = temporal_factor, spatial_factor
        self.tiling = tiling
        downs, temporal_downs = int(math.log2(spatial_factor)), int(math.log2(temporal_factor))
        channels = [base * min(2**level, 4) for level in range(downs + 1)]
        temporal_down = [level >= downs - temporal_downs for level in range(downs)]  # time at the deepest levels
        down, up = shortcut_maps(shortcut, latent_channels, temporal_factor, spatial_factor)  # [c, 3, tf, sf, sf]
        self.encoder = CausalEncoder(channels, blocks, temporal_down, latent_channels,
                                     SpaceTimeShortcut(down))
        self.decoder = CausalDecoder(channels, blocks, temporal_down[::-1], latent_channels,
                                     SpaceTimeShortcut(up))
        for conv in (self.encoder.conv_out.conv, self.decoder.conv_out.conv):
            nn.init.zeros_(conv.weight)  # start as the shortcut's linear autoencoder; see SpaceTimeShortcut
            nn.init.zeros_(conv.bias)
        # Posterior std starts at e^-3 ~ 0.05 instead of 1: unit noise would swamp the shortcut latent (std ~0.3)
        nn.init.constant_(self.encoder.conv_out.conv.bias[latent_channels:], -6.0)
        if checkpoint is not None:
            self.load_weights(checkpoint)

    # --------------------------------------------------------------------------------------- whole-clip paths
    def posterior(self, video: Tensor) -> DiagonalGaussian:
        """The encoder's Gaussian, its log-variance capped at 0 (the prior's): a posterior wider than N(0, I) never
        helps, and under Adam the KL term's tiny gradient still moves the log-variance head by ~lr per step, until a
        rare input samples enormous noise (a one-step loss spike of ~1e4 in the 900 s benchmark before the cap)."""
        self.check_video(video)
        posterior = DiagonalGaussian.from_moments(self.encoder(video))  # over [B, c, t, h, w]
        return DiagonalGaussian(posterior.mean, posterior.logvar.clamp(max=0.0))

    def decode_latent(self, z: Tensor) -> Tensor:
        self.check_latent(z)
        return self.decoder(z)  # [B, 3, T, H, W]

    def encode_raw(self, video: Tensor) -> Tensor:
        return self.posterior(video).mean if self.tiling is None else self.encode_tiled(video, self.tiling)

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.decode_latent(z) if self.tiling is None else self.decode_tiled(z, self.tiling)

    # -------------------------------------------------------------------------------------------- tiled paths
    def _tiles(self, h: int, w: int, tiling: Tiling) -> list[LatentTile]:
        """Tiles covering an ``h x w`` latent, each with its context window clipped to the latent."""
        size, overlap, context = tiling.tile_latent, tiling.overlap_latent, tiling.context_latent
        tiles = []
        for y in tile_starts(h, size, overlap):
            for x in tile_starts(w, size, overlap):
                th, tw = min(size, h), min(size, w)
                top, left = max(0, y - context), max(0, x - context)
                bottom, right = min(h, y + th + context), min(w, x + tw + context)
                tiles.append(LatentTile(y, x, th, tw, (top, bottom, left, right)))
        return tiles

    @staticmethod
    def _tile_weight(tile: LatentTile, h: int, w: int, scale: int, tiling: Tiling) -> Tensor:
        """Blend weight of a tile's core, upsampled by ``scale`` (1 for latents, spatial_factor for pixels), placed
        in the full ``[1, 1, 1, h*scale, w*scale]`` canvas (zero outside the tile)."""
        ramp = tiling.overlap_latent * scale
        wy = blend_ramp(tile.height * scale, ramp, tile.y > 0, tile.y + tile.height < h)  # [th*scale]
        wx = blend_ramp(tile.width * scale, ramp, tile.x > 0, tile.x + tile.width < w)  # [tw*scale]
        canvas = torch.zeros(1, 1, 1, h * scale, w * scale)
        canvas[..., tile.y * scale : (tile.y + tile.height) * scale, tile.x * scale : (tile.x + tile.width) * scale] = (
            wy[:, None] * wx[None, :]
        )
        return canvas  # [1, 1, 1, H, W]

    @torch.no_grad()
    def encode_tiled(self, video: Tensor, tiling: Tiling) -> Tensor:
        """Posterior mean ``[B, c, t, h, w]`` of ``video`` [B, 3, T, H, W] computed chunk by chunk, tile by tile."""
        self.check_video(video)
        sf = self.spatial_factor
        t, h, w = self.latent_shape(*video.shape[2:])
        tiles = self._tiles(h, w, tiling)
        caches = [StreamCache() for _ in tiles]
        weights = [self._tile_weight(tile, h, w, 1, tiling).to(video) for tile in tiles]  # each [1, 1, 1, h, w]
        total = torch.stack(weights).sum(0)  # [1, 1, 1, h, w]
        out = video.new_zeros(video.shape[0], self.latent_channels, t, h, w)  # [B, c, t, h, w]
        for l0, l1 in temporal_chunks(t, tiling.chunk_latent_frames):
            v0, v1 = latent_to_video_frames(l0, l1, self.temporal_factor)
            for tile, cache, weight in zip(tiles, caches, weights):
                top, bottom, left, right = tile.window
                piece = video[:, :, v0:v1, top * sf : bottom * sf, left * sf : right * sf]  # [B, 3, Tc, Hw, Ww]
                mean = self.encoder(piece, cache).chunk(2, dim=1)[0]  # [B, c, l1-l0, hw, ww]
                y, x = tile.y - top, tile.x - left
                core = mean[:, :, :, y : y + tile.height, x : x + tile.width]  # [B, c, l1-l0, th, tw]
                region = (slice(None), slice(None), slice(l0, l1), tile.rows(1), tile.cols(1))
                out[region] += core * weight[:, :, :, tile.rows(1), tile.cols(1)]  # [B, c, l1-l0, th, tw]
        return out / total  # [B, c, t, h, w]

    @torch.no_grad()
    def decode_stream(self, z: Tensor, tiling: Tiling) -> Iterator[Tensor]:
        """Decode raw latent ``z`` [B, c, t, h, w] chunk by chunk: yields ``[B, 3, frames, H, W]`` pieces in order
        (1 frame, then ``chunk_latent_frames * temporal_factor`` frames each), so a caller writing frames to disk
        never holds the whole video."""
        self.check_latent(z)
        sf = self.spatial_factor
        b, _, t, h, w = z.shape
        tiles = self._tiles(h, w, tiling)
        caches = [StreamCache() for _ in tiles]
        weights = [self._tile_weight(tile, h, w, sf, tiling).to(z) for tile in tiles]  # each [1, 1, 1, H, W]
        total = torch.stack(weights).sum(0)  # [1, 1, 1, H, W]
        for l0, l1 in temporal_chunks(t, tiling.chunk_latent_frames):
            v0, v1 = latent_to_video_frames(l0, l1, self.temporal_factor)
            piece = z.new_zeros(b, 3, v1 - v0, h * sf, w * sf)  # [B, 3, Tc, H, W]
            for tile, cache, weight in zip(tiles, caches, weights):
                top, bottom, left, right = tile.window
                frames = self.decoder(z[:, :, l0:l1, top:bottom, left:right], cache)  # [B, 3, Tc, Hw*sf, Ww*sf]
                y, x = (tile.y - top) * sf, (tile.x - left) * sf
                core = frames[:, :, :, y : y + tile.height * sf, x : x + tile.width * sf]  # [B, 3, Tc, th*sf, tw*sf]
                piece[:, :, :, tile.rows(sf), tile.cols(sf)] += core * weight[:, :, :, tile.rows(sf), tile.cols(sf)]
            yield piece / total  # [B, 3, Tc, H, W]

    @torch.no_grad()
    def decode_tiled(self, z: Tensor, tiling: Tiling) -> Tensor:
        """Whole video ``[B, 3, T, H, W]`` from :meth:`decode_stream`, written into one preallocated tensor."""
        self.check_latent(z)
        b, _, t, h, w = z.shape
        out = z.new_empty(b, 3, 1 + (t - 1) * self.temporal_factor, h * self.spatial_factor, w * self.spatial_factor)
        start = 0
        for piece in self.decode_stream(z, tiling):
            out[:, :, start : start + piece.shape[2]] = piece  # [B, 3, Tc, H, W]
            start += piece.shape[2]
        return out  # [B, 3, T, H, W]
