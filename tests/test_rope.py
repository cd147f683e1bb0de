"""3D RoPE: channel split, norm preservation, and attention scores that depend only on relative (t, h, w) offsets."""

from __future__ import annotations

import pytest
import torch

from framework.layers.rope import Rope3D, apply_rope, split_head_dim


@pytest.mark.parametrize("head_dim", [6, 8, 10, 12, 16, 32, 64, 72, 96, 128, 256])
def test_split_head_dim_even_parts_summing_to_head_dim(head_dim):
    parts = split_head_dim(head_dim)
    assert len(parts) == 3
    assert sum(parts) == head_dim
    assert all(p >= 2 and p % 2 == 0 for p in parts), parts


@pytest.mark.parametrize("head_dim", [0, 4, 7, 15])
def test_split_head_dim_rejects_odd_or_tiny(head_dim):
    with pytest.raises(ValueError, match=f"even head_dim >= 6, got {head_dim}"):
        split_head_dim(head_dim)


def random_positions(n, generator, scale=20.0):
    return (torch.rand(n, 3, generator=generator) * scale).floor()


def test_apply_rope_preserves_norms_shape_and_dtype():
    g = torch.Generator().manual_seed(0)
    rope = Rope3D(16)
    x = torch.randn(40, 3, 16, generator=g)
    cos, sin = rope.angles(random_positions(40, g))
    assert cos.shape == sin.shape == (40, 1, 8)
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-3)  # it does rotate
    assert apply_rope(x.to(torch.bfloat16), cos, sin).dtype == torch.bfloat16


def test_zero_position_is_identity():
    x = torch.randn(5, 2, 16)
    cos, sin = Rope3D(16).angles(torch.zeros(5, 3))
    assert torch.equal(apply_rope(x, cos, sin), x)


@pytest.mark.parametrize("shift", [(3.0, 0.0, 0.0), (0.0, -4.0, 0.0), (0.0, 0.0, 7.0), (5.0, -3.0, 11.0)])
def test_scores_depend_only_on_position_difference(shift):
    g = torch.Generator().manual_seed(1)
    rope = Rope3D(16)
    q, k = torch.randn(12, 2, 16, generator=g), torch.randn(12, 2, 16, generator=g)
    pos_q, pos_k = random_positions(12, g), random_positions(12, g)

    def scores(pq, pk):
        rq, rk = apply_rope(q, *rope.angles(pq)), apply_rope(k, *rope.angles(pk))
        return torch.einsum("ihd,jhd->hij", rq, rk)  # [H, Nq, Nk]

    base = scores(pos_q, pos_k)
    offset = torch.tensor(shift)
    torch.testing.assert_close(scores(pos_q + offset, pos_k + offset), base, rtol=0, atol=1e-5)
    # shifting only the keys changes the relative offsets, so the scores must change
    assert not torch.allclose(scores(pos_q, pos_k + offset), base, atol=1e-2)


def test_each_axis_rotates_its_own_channel_group():
    rope = Rope3D(16)
    x = torch.randn(1, 1, 16)
    origin = apply_rope(x, *rope.angles(torch.zeros(1, 3)))
    for axis, dim in enumerate(rope.axis_dims):
        pos = torch.zeros(1, 3)
        pos[0, axis] = 1.0
        moved = apply_rope(x, *rope.angles(pos))
        changed = (moved != origin).sum().item()
        assert changed == dim, f"moving along axis {axis} changed {changed} channels, expected {dim}"
