"""adaLN-Zero building blocks shared by the transformer denoisers (DiT, STDiT, MM-DiT).

Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023): each block's LayerNorms are modulated by a
per-sample shift, scale and gate computed from a conditioning vector (here timestep + pooled caption, plus
micro-conditions when configured), and the projections producing them are zero-initialised, so every block starts
as the identity and the untrained model predicts zero.

``AdaLNZeroDenoiser`` is the part every such denoiser repeated: the size preset, the timestep / pooled-caption /
micro-condition embedders that make the conditioning vector, the input, caption and output projections built in
``bind``, the weight initialisation and the modulated output layer. A model supplies its blocks
(``build_blocks``), how its caption tokens are embedded (``context_embedding``), which block layers start at zero
(``initialize_blocks``) and its ``forward``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO
from framework.core.micro_conditions import MicroCondition, MicroConditionEmbedder, sinusoidal_features
from framework.layers.attention import AttentionBackend
from framework.layers.packing import PackedSequence
from framework.layers.presets import Preset, TransformerSize, resolve_size
from framework.layers.rope import Rope3D

TIMESTEP_FEATURES = 256  # sinusoidal features of the timestep, as in DiT


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``t`` [B] in [0, 1] (scaled by 1000 as in DDPM-era models) -> [B, dim]."""
    return sinusoidal_features(1000.0 * t.float(), dim, max_period)  # [B, dim]


def modulation(width: int, chunks: int) -> nn.Sequential:
    """The adaLN projection of the conditioning vector [B, W] into ``chunks`` shift/scale/gate vectors [B, chunks*W]
    (zeroed by ``zero_linear`` in the denoiser's initialisation)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width))


def zero_linear(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class AdaLNZeroDenoiser(Denoiser):
    """Base of adaLN-Zero transformer denoisers over packed tokens (not a plugin by itself)."""

    def __init__(
        self,
        preset: Preset | None = None,
        width: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        attention: AttentionBackend = AttentionBackend.AUTO,
        gradient_checkpointing: bool = False,
        micro_conditions: list[MicroCondition] | None = None,
    ) -> None:
        """``preset`` (S, B, L, XL: DiT's sizes) sets width, depth and heads; any of them given explicitly overrides
        it, and with neither the size is S (384 wide, 12 deep, 6 heads). ``micro_conditions`` (e.g. ``[FPS,
        ORIGINAL_HEIGHT, ORIGINAL_WIDTH]``) conditions every block on those per-sample scalars
        (``framework/core/micro_conditions.py``)."""
        super().__init__()
        size = resolve_size(type(self).__name__, preset, width, depth, num_heads)
        self.width, self.depth, self.num_heads = size.width, size.depth, size.num_heads
        self.gradient_checkpointing = gradient_checkpointing
        self.rope = Rope3D(size.head_dim)
        self.time_embed = nn.Sequential(nn.Linear(TIMESTEP_FEATURES, self.width), nn.SiLU(),
                                        nn.Linear(self.width, self.width))
        self.blocks = nn.ModuleList(self.build_blocks(size, mlp_ratio, attention))
        self.final_norm = nn.LayerNorm(self.width, elementwise_affine=False, eps=1e-6)
        self.final_ada = modulation(self.width, 2)
        self.micro_conditions = tuple(micro_conditions or ())
        self.micro_embed = MicroConditionEmbedder(self.micro_conditions, self.width) if self.micro_conditions else None
        self.io: DenoiserIO | None = None

    def block_stack(self) -> nn.ModuleList:
        return self.blocks

    @abstractmethod
    def build_blocks(self, size: TransformerSize, mlp_ratio: float, attention: AttentionBackend) -> Iterable[nn.Module]:
        """The model's ``size.depth`` transformer blocks."""

    @abstractmethod
    def context_embedding(self, io: DenoiserIO) -> nn.Module:
        """Maps caption token features [..., context_dim] to the model width."""

    @abstractmethod
    def initialize_blocks(self) -> None:
        """Zero the blocks' adaLN projections (and whatever else a block starts without)."""

    def bind(self, io: DenoiserIO) -> None:
        self.io = io
        self.embed = nn.Linear(io.token_dim, self.width)
        self.context_embed = self.context_embedding(io)
        self.pooled_embed = nn.Sequential(nn.Linear(io.pooled_dim, self.width), nn.SiLU(),
                                          nn.Linear(self.width, self.width))
        self.head = nn.Linear(self.width, io.token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for linear layers; zero for every adaLN projection and the output head, as in DiT, so each block
        starts as the identity and the untrained model predicts zero, which keeps early training stable."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        self.initialize_blocks()
        # The pooled caption enters the same vector as the timestep. LayerNorm-ed text features are ~30x larger
        # than the timestep embedding at init and would act as large per-sample noise on every block's
        # modulation; starting this path at zero lets it grow only as far as the caption helps.
        for layer in (self.pooled_embed[-1], self.final_ada[-1], self.head):
            zero_linear(layer)
        if self.micro_embed is not None:  # zero output: micro-conditions start without effect
            self.micro_embed.initialize_weights()

    def check_bound(self) -> None:
        if self.io is None:
            name = type(self).__name__
            raise RuntimeError(f"{name}.bind(DenoiserIO) must be called before forward (VideoDiffusion does this)")

    def pooled_embedding(self, cond: Conditioning) -> Tensor:
        """The pooled caption's share of the adaLN input [B, W]."""
        return self.pooled_embed(cond.pooled)

    def conditioning_vector(self, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The per-sample vector every adaLN modulation reads: timestep + pooled caption (+ micro-conditions)."""
        c = self.time_embed(timestep_embedding(timestep, TIMESTEP_FEATURES)) + self.pooled_embedding(cond)  # [B, W]
        if self.micro_embed is not None:
            c = c + self.micro_embed(cond.micro_conditions)  # [B, W]
        return c

    def output(self, x: PackedSequence, h: Tensor, c: Tensor) -> PackedSequence:
        """The modulated final LayerNorm and output head: hidden tokens ``h`` [N, W] -> predictions [N, token_dim]
        in ``x``'s layout."""
        shift, scale = x.per_token(self.final_ada(c)).chunk(2, dim=-1)  # each [N, W]
        return x.with_tokens(self.head(modulate(self.final_norm(h), shift, scale)))  # [N, token_dim]

    def run_block(self, block: nn.Module, *args) -> Tensor | tuple[Tensor, ...]:
        """``block(*args)``, through activation checkpointing when training with ``gradient_checkpointing``."""
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
