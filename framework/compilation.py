"""``torch.compile`` for denoisers over packed, variable-size batches, without a recompile per batch layout.

A packed batch carries its layout as Python values (``grid_sizes``, per-sample token counts), and the layout-aware
code (per-sample attention loops, broadcasting per-sample values to tokens, STDiT's groups, MM-DiT's joint order)
branches and loops on them. Traced by TorchDynamo, every new combination of clip sizes would be a new graph: measured
on a 2-block DiT (torch 2.13, CPU), each new layout added a graph and recompiled (~10 s each), without bound.

So the layout operations are excluded from tracing (``torch.compiler.disable`` on ``PackedSequence.per_token``,
``PackedSequence.with_tokens``, ``packed_self_attention``, ``packed_cross_attention`` and the STDiT / MM-DiT layout
builders): they run eagerly, exactly as without compilation, and the dense per-token math between them (projections,
norms, modulation, RoPE, MLPs) is compiled once with a dynamic token count (``dynamic=True``). Any number of layouts
then share the same graphs; measured: a new graph only for a pack of one sample (PyTorch specialises sizes 0 and 1)
and for the first pack whose samples all have equal length (those take the dense attention path).

The price is the graph breaks at those calls. Measured on CPU (torch 2.13, one thread, the 640-token DiT of
``benchmarks/dit_vs_diffusers.py``, one fixed layout, interleaved in one process): a compiled training step took
1.01-1.04x the eager time with the breaks, while compiling the whole forward (no breaks) took 0.86-0.88x -- but that
recompiles for every new layout. At this size the per-region call overhead eats the fusion gains; on GPU, where
fusing elementwise chains saves memory traffic and launches, the balance is expected to differ (not measured).

The module is compiled in place (``nn.Module.compile``), so parameter names, checkpoints and the EMA copy stay as
they are.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""``torch.compile``'s ``mode``, passed through: "reduce-overhead" uses CUDA graphs (small GPU batches, where launch
overhead dominates); "max-autotune" benchmarks kernel choices while compiling (slow to compile, fastest to run).
A plain string rather than an enum so that a checkpoint's hyperparameters stay loadable with ``weights_only=True``."""


def compile_in_place(module: nn.Module, mode: CompileMode = "default") -> nn.Module:
    """Compile ``module``'s forward in place with a dynamic token count; returns the module (names unchanged)."""
    module.compile(dynamic=True, mode=mode)
    return module
