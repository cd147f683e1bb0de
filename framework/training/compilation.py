"""``torch.compile`` for denoisers over packed, variable-size batches, without a recompile per batch layout.

A packed batch carries its layout as Python values (``grid_sizes``, per-sample token counts), and the layout-aware
code (per-sample attention loops, broadcasting per-sample values to tokens, STDiT's groups, MM-DiT's joint order)
branches and loops on them. Traced by TorchDynamo, every new combination of clip sizes would be a new graph: measured
on a 2-block DiT (torch 2.13, CPU), each new layout added a graph and recompiled (~10 s each), without bound.

So the layout operations take their sizes from tensor shapes where they can and are excluded from tracing where
they cannot. For a pack whose samples all have the same length (the usual case with shape buckets), the pack is a
dense ``[B, L, ...]`` batch: ``PackedSequence.per_token`` and the dense attention paths read B and L from shapes, so
the whole denoiser forward is one graph with symbolic sizes (``dynamic=True``), reused for every such layout. For a
mixed-size pack, the per-sample loops (``PackedSequence.per_token``'s and the attention's, STDiT's and MM-DiT's
layout builders, ``PackedSequence.with_tokens``) run eagerly (``torch.compiler.disable``) and the dense per-token
math between them is compiled, again once for all layouts. Measured with ``torch._dynamo`` counters: new layouts
add no graphs (``tests/test_compile.py``: two mixed-size and two equal-size layouts), apart from a pack of one sample
(PyTorch specialises sizes 0 and 1), the first equal-size pack, and the first no-grad (sampling) call.

Speed, measured on CPU (torch 2.13, one thread, the 640-token, equal-size DiT of ``benchmarks/dit_vs_diffusers.py``,
interleaved in one process, thread CPU time): a compiled training step took 0.88x the eager time (74.9 vs 85.4 ms);
with the equal-size path also broken out of the graph (the first version of this module) it took 1.01-1.04x, i.e.
the per-region overhead ate the fusion gains. Mixed-size packs still take graph breaks at every attention call.

The module is compiled in place (``nn.Module.compile``), so parameter names, checkpoints and the EMA copy stay as
they are.

Inductor's ``freezing`` option (weights folded into no-grad graphs as constants, prepacked for the CPU GEMM) was
tried for sampling and dropped: in an interleaved A/B on the same DiT (dynamo reset between phases, one thread) a
frozen sampling step took 24.6-31.2 ms against 25.1-26.0 ms compiled, i.e. no gain within the machine's noise.
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
