"""Code that takes a different form under torch.compile for speed computes the same values and gradients as its eager
form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from framework.layers.activations import TanhGELU
from framework.layers.rope import Rope3D, apply_rope


def test_compiled_tanh_gelu_matches_the_tanh_formula_and_its_gradient() -> None:
    x = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64).float().requires_grad_()  # both tails and the middle
    compiled = torch.compile(TanhGELU(), dynamic=False)
    y = compiled(x)
    xd = x.detach().double()
    reference = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))  # float64 formula
    torch.testing.assert_close(y.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, F.gelu(x.detach(), approximate="tanh"), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(y.sum(), x)
    eager = x.detach().clone().requires_grad_()
    (grad_eager,) = torch.autograd.grad(TanhGELU()(eager).sum(), eager)  # eager: F.gelu's own backward
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=3e-6)


def test_compiled_rope_matches_the_eager_complex_form() -> None:
    g = torch.Generator().manual_seed(0)
    rope = Rope3D(16)
    x = torch.randn(50, 3, 16, generator=g, requires_grad=True)
    cos, sin = rope.angles((torch.rand(50, 3, generator=g) * 30).floor())
    out_grad = torch.randn(50, 3, 16, generator=g)
    y = apply_rope(x, cos, sin)
    (grad,) = torch.autograd.grad(y, x, out_grad)
    y_c = torch.compile(apply_rope, dynamic=False)(x, cos, sin)
    (grad_c,) = torch.autograd.grad(y_c, x, out_grad)
    torch.testing.assert_close(y_c, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_c, grad, rtol=1e-6, atol=1e-6)
