"""Step caches: denoiser wrappers that skip transformer blocks at sampling steps where their work barely changes.

Consecutive sampling steps call the denoiser on nearly the same input, and the residual the blocks add to their
hidden states changes slowly (ParaAttention's first-block cache, TeaCache: Liu et al. 2024). Both caches here keep
the residual of the last fully computed call and, while a cheap signal says the input moved less than ``threshold``,
add that residual instead of running the blocks:

- ``FirstBlockCache`` always runs the first block; when its residual ``h1 - h0`` differs from the one of the last
  computed call by less than ``threshold`` (relative mean absolute difference) the other blocks are skipped and
  ``h1 + (h_N - h1)_cached`` goes on to the output layer.
- ``TimestepEmbeddingCache`` (TeaCache-like) compares the first block's inputs, the hidden states and the timestep
  embedding that modulates them, to the previous call's; it sums the relative changes over calls and skips every
  block (``h0 + (h_N - h0)_cached``) until the sum reaches ``threshold``.

``threshold: 0`` never skips and equals the wrapped denoiser exactly; the first ``warmup_steps`` denoiser calls of a
run (one per step for one-call samplers, two for Heun) are always computed, since early steps shape the layout. Each
run starts afresh: ``prepare``, which the guidance calls once per sampling run, clears the cache.

The wrapper holds no weights of its own and names the wrapped denoiser's parameters unchanged, so a checkpoint
trained without a cache is predicted with one by changing the config only::

    denoiser:
      class_path: plugins.denoisers.step_cache.FirstBlockCache
      init_args:
        denoiser: {class_path: plugins.denoisers.dit.DiT, init_args: {preset: S}}
        threshold: 0.08
        warmup_steps: 2

Any denoiser that exposes its blocks through ``Denoiser.block_stack`` can be wrapped (DiT, STDiT, MMDiT and the
diffusers Wan/LTX transformers do).
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from framework.core.interfaces import Conditioning, Denoiser, DenoiserIO
from framework.core.micro_conditions import MicroCondition
from framework.layers.packing import PackedSequence

Streams = tuple[Tensor, ...]  # a block's hidden-state outputs: (video,) or (video, text) for two-stream blocks


def _as_streams(out: Tensor | tuple) -> Streams:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def _as_output(streams: Streams, like: Tensor | tuple) -> Tensor | tuple:
    return streams[0] if isinstance(like, Tensor) else type(like)(streams)


def _input_streams(args: tuple, kwargs: dict, n: int) -> Streams:
    """The first ``n`` hidden-state inputs of a block call: positional tensors first, then diffusers' keywords."""
    positional = [a for a in args[:n] if isinstance(a, Tensor)]
    named = [kwargs[k] for k in ("hidden_states", "encoder_hidden_states") if isinstance(kwargs.get(k), Tensor)]
    streams = (positional + named)[:n]
    if len(streams) != n:
        raise TypeError(f"step cache: a block returns {n} hidden-state tensors but its call passes {len(streams)} "
                        "(expected them first, positionally or as hidden_states/encoder_hidden_states)")
    return tuple(streams)


def relative_change(new: Tensor, old: Tensor) -> float:
    """Mean absolute difference over mean absolute value of ``old`` (0 for identical tensors), in float32."""
    old32 = old.float()
    return float((new.float() - old32).abs().mean() / old32.abs().mean().clamp_min(1e-12))


@dataclass
class CacheState:
    """What one sampling run carries between denoiser calls."""

    calls: int = 0  # denoiser calls so far in this run
    skipped: int = 0  # calls that reused the cached residual
    residual: Streams | None = None  # what the skipped blocks added at the last computed call
    reference: list[Tensor] = field(default_factory=list)  # the signal the next call is compared to
    accumulated: float = 0.0  # TimestepEmbeddingCache: summed relative change since the last computed call


class BlockStackCache(Denoiser):
    """Base of the step caches: runs the wrapped denoiser with its blocks intercepted (not a plugin by itself).

    Subclasses say at which block the skipped span starts (``first_skipped``) and decide, from that block's call,
    whether to skip (``decide``)."""

    first_skipped: int

    def __init__(self, denoiser: Denoiser, threshold: float = 0.0, warmup_steps: int = 1) -> None:
        """``threshold`` >= 0 (0: never skip); ``warmup_steps`` >= 1 denoiser calls computed at the start of a run."""
        super().__init__()
        if threshold < 0:
            raise ValueError(f"{type(self).__name__}: threshold must be >= 0, got {threshold}")
        if warmup_steps < 1:
            raise ValueError(f"{type(self).__name__}: warmup_steps must be >= 1 (the first call fills the cache), "
                             f"got {warmup_steps}")
        self.threshold, self.warmup_steps = threshold, warmup_steps
        self.state = CacheState()
        # The wrapper shares the wrapped denoiser's parameters, buffers and submodules instead of holding it as a
        # child: parameter and checkpoint names stay the wrapped denoiser's (no extra ``denoiser.`` level), so a
        # checkpoint and its EMA average load with or without a cache, and ``.to()`` moves the shared tensors.
        object.__setattr__(self, "denoiser", denoiser)
        self._parameters, self._buffers, self._modules = denoiser._parameters, denoiser._buffers, denoiser._modules
        self._non_persistent_buffers_set = denoiser._non_persistent_buffers_set

    def train(self, mode: bool = True) -> BlockStackCache:
        self.denoiser.train(mode)  # the wrapped module's own flag (its forward may read it) and its children's
        self.training = mode
        return self

    @property
    def micro_conditions(self) -> tuple[MicroCondition, ...]:  # type: ignore[override]
        return self.denoiser.micro_conditions

    def bind(self, io: DenoiserIO) -> None:
        self.denoiser.bind(io)

    def block_stack(self) -> nn.ModuleList:
        return self.denoiser.block_stack()

    def prepare(self, cond: Conditioning) -> Conditioning:
        self.state = CacheState()  # a new sampling run: nothing computed yet
        return self.denoiser.prepare(cond)

    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        if self.training or self.threshold == 0.0:  # training, or the exact model: nothing to intercept
            return self.denoiser(x, timestep, cond)
        self.state.calls += 1
        with self._intercepted(self.denoiser.block_stack()):
            return self.denoiser(x, timestep, cond)

    @property
    def skip_ratio(self) -> float:
        """Share of this run's denoiser calls that skipped blocks."""
        return self.state.skipped / max(self.state.calls, 1)

    @abstractmethod
    def decide(self, block_in: Streams, block_args: tuple, block_kwargs: dict, block_out: Streams | None) -> bool:
        """Whether this call reuses the cached residual; ``block_out`` is the first block's output for a cache that
        runs it (None otherwise). Updates the reference signal when the call is computed."""

    def may_skip(self) -> bool:
        return self.state.calls > self.warmup_steps and self.state.residual is not None

    @contextmanager
    def _intercepted(self, blocks: nn.ModuleList):
        """Replace the blocks' ``forward`` for one denoiser call: the span from ``first_skipped`` on either runs and
        records its residual, or returns the span's input plus the cached residual without running."""
        state, first, last = self.state, self.first_skipped, len(blocks) - 1
        if last < first:
            raise ValueError(f"{type(self).__name__}: the denoiser has {len(blocks)} blocks, nothing to skip")
        call: dict = {}  # this call's span input and decision

        def wrap(i: int, block: nn.Module):
            original = block.forward

            def forward(*args, **kwargs):
                if i < first:  # the first block of FirstBlockCache: always run
                    out = original(*args, **kwargs)
                    streams = _as_streams(out)
                    call["skip"] = self.decide(_input_streams(args, kwargs, len(streams)), args, kwargs, streams)
                    call["span_in"] = streams
                    return out
                if i == first:
                    if "skip" not in call:  # the span starts at block 0: decide from its inputs
                        n = len(state.residual) if state.residual is not None else 1
                        call["skip"] = self.decide(_input_streams(args, kwargs, n), args, kwargs, None)
                    if "span_in" not in call or i == 0:
                        n = len(state.residual) if state.residual is not None else 1
                        call["span_in"] = _input_streams(args, kwargs, n)
                if call["skip"]:
                    if "result" not in call:
                        call["result"] = tuple(s + r for s, r in zip(call["span_in"], state.residual))
                        state.skipped += int(i == first)
                    return call["result"][0] if len(call["result"]) == 1 else call["result"]
                out = original(*args, **kwargs)
                if i == first:  # the span input's stream count is the block's output count
                    streams = _as_streams(out)
                    call["span_in"] = _input_streams(args, kwargs, len(streams))
                if i == last:
                    state.residual = tuple(o - s for o, s in zip(_as_streams(out), call["span_in"]))
                return out

            return forward

        for i, block in enumerate(blocks):
            block.forward = wrap(i, block)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward  # back to the class's forward


class FirstBlockCache(BlockStackCache):
    """First-block cache (ParaAttention): the first block always runs; its residual's relative change since the last
    computed call decides whether the other blocks are skipped."""

    first_skipped = 1

    def decide(self, block_in: Streams, block_args: tuple, block_kwargs: dict, block_out: Streams | None) -> bool:
        first_residual = block_out[0] - block_in[0]  # [N, W]
        state = self.state
        if self.may_skip() and relative_change(first_residual, state.reference[0]) < self.threshold:
            return True
        state.reference = [first_residual]  # compared to the last computed call, so drift cannot accumulate unseen
        return False


class TimestepEmbeddingCache(BlockStackCache):
    """TeaCache-like: the first block's inputs (hidden states and the timestep embedding that modulates them)
    are compared to the previous call's; their summed relative change since the last computed call decides whether
    all blocks are skipped."""

    first_skipped = 0

    def decide(self, block_in: Streams, block_args: tuple, block_kwargs: dict, block_out: Streams | None) -> bool:
        signal = [a for a in (*block_args, *block_kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
        state = self.state
        change = (sum(relative_change(new, old) for new, old in zip(signal, state.reference))
                  if len(state.reference) == len(signal) else float("inf"))
        state.reference = signal
        if self.may_skip() and state.accumulated + change < self.threshold:
            state.accumulated += change
            return True
        state.accumulated = 0.0
        return False

