"""count_flops counts attention on CPU, where PyTorch's FlopCounterMode alone counts none."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from framework.training.flop_count import count_flops


def test_cpu_attention_is_counted_with_pytorchs_formula() -> None:
    b, h, length, dim = 2, 4, 64, 16
    q = torch.randn(b, h, length, dim, requires_grad=True)
    step = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * (2 * b * h * length * length * dim)  # scores and weighted values, 2 FLOPs per multiply-add
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == forward
    assert count_flops(step) == forward * 7 // 2  # backward: 2.5x the forward (5 matmuls of the same size)
    with FlopCounterMode(display=False) as plain:
        step()
    assert plain.get_total_flops() < count_flops(step)  # the gap this module closes (0 with torch 2.13 on CPU)


def test_matmuls_are_counted_as_before() -> None:
    layer = torch.nn.Linear(32, 8)
    x = torch.randn(5, 32)
    assert count_flops(lambda: layer(x)) == 2 * 5 * 32 * 8
