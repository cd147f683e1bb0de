"""Counted (not estimated) FLOPs of a function, including attention on every device.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and the CUDA attention kernels, but (measured with
torch 2.13) not the CPU flash-attention kernel that ``scaled_dot_product_attention`` dispatches to on CPU: a
forward + backward SDPA call counts 0 FLOPs there. ``count_flops`` registers that kernel with the same formulas
PyTorch uses for the CUDA kernels, so throughput, MFU and scaling-study numbers include attention everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # shapes [B, H, L, Dh]


def _backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernels (present in recent torch builds only)."""
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        mapping[forward] = _forward_flops
    if backward is not None:
        mapping[backward] = _backward_flops
    return mapping


def counting_mode() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs (2 per multiply-add) of the aten ops ``fn()`` runs, attention included."""
    with counting_mode() as counter:
        fn()
    return counter.get_total_flops()
