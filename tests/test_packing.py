"""SpacetimePatcher and PackedSequence: exact round trips, layout metadata, per-sample helpers, validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from framework.layers.packing import PackedSequence, grid_positions
from plugins.patchers.spacetime import SpacetimePatcher

MIXED_SHAPES = [(3, 8, 16, 16), (3, 4, 16, 24), (3, 1, 8, 8)]


def make_latents(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


CASES = [
    ((1, 4, 4), MIXED_SHAPES),
    ((2, 2, 2), [(3, 8, 16, 16), (3, 4, 16, 24), (3, 2, 8, 6)]),
    ((1, 1, 1), [(2, 1, 2, 3), (2, 3, 1, 1)]),
]


@pytest.mark.parametrize("patch, shapes", CASES)
def test_round_trip_is_exact(patch, shapes):
    patcher = SpacetimePatcher(*patch)
    latents = make_latents(shapes)
    packed = patcher.patchify(latents)
    assert packed.tokens.shape[1] == patcher.token_dim(shapes[0][0]) == shapes[0][0] * patch[0] * patch[1] * patch[2]
    restored = patcher.unpatchify(packed)
    assert len(restored) == len(latents)
    for original, back in zip(latents, restored):
        assert back.shape == original.shape
        assert torch.equal(back, original)


@pytest.mark.parametrize("patch, shapes", CASES)
def test_layout_metadata(patch, shapes):
    patcher = SpacetimePatcher(*patch)
    latents = make_latents(shapes, seed=1)
    packed = patcher.patchify(latents)

    grids = [tuple(s // p for s, p in zip(shape[1:], patch)) for shape in shapes]
    assert packed.grid_sizes == tuple(grids)
    lengths = [t * h * w for t, h, w in grids]
    assert packed.seqlens == tuple(lengths)
    assert packed.num_samples == len(shapes)
    assert packed.cu_seqlens.dtype == torch.long
    assert packed.cu_seqlens.tolist() == [0] + list(itertools.accumulate(lengths))
    assert packed.tokens.shape[0] == sum(lengths)

    # positions: the (t, h, w) grid index of each token, row-major within each sample, restarting per sample
    expected_positions = [
        [float(a), float(b), float(c)] for gt, gh, gw in grids for a in range(gt) for b in range(gh) for c in range(gw)
    ]
    assert packed.positions.shape == (sum(lengths), 3)
    assert packed.positions.tolist() == expected_positions

    # each token holds exactly the values of the latent cube at its position (as a multiset: the channel order
    # inside a token is the patcher's business)
    pt, ph, pw = patch
    for i, (latent, tokens) in enumerate(zip(latents, packed.split())):
        start = packed.cu_seqlens[i].item()
        for j in range(0, tokens.shape[0], max(1, tokens.shape[0] // 7)):  # a spread of tokens per sample
            a, b, c = (int(x) for x in packed.positions[start + j].tolist())
            cube = latent[:, a * pt:(a + 1) * pt, b * ph:(b + 1) * ph, c * pw:(c + 1) * pw]
            assert torch.equal(tokens[j].sort().values, cube.reshape(-1).sort().values), (i, j)


def test_grid_positions_row_major():
    pos = grid_positions((2, 3, 4))
    assert pos.shape == (24, 3) and pos.dtype == torch.float32
    for index, (t, h, w) in enumerate(itertools.product(range(2), range(3), range(4))):
        assert pos[index].tolist() == [t, h, w]


@pytest.mark.parametrize(
    "shape, patch, dimension, size, patch_value",
    [
        ((3, 4, 10, 16), (1, 4, 4), "height", 10, 4),
        ((3, 4, 16, 18), (1, 4, 4), "width", 18, 4),
        ((3, 5, 16, 16), (2, 2, 2), "frames", 5, 2),
        ((3, 1, 8, 8), (2, 2, 2), "frames", 1, 2),
    ],
)
def test_indivisible_latent_names_dimension_and_patch(shape, patch, dimension, size, patch_value):
    patcher = SpacetimePatcher(*patch)
    good = torch.zeros(3, 4, 16, 16)
    with pytest.raises(ValueError) as excinfo:
        patcher.patchify([good, torch.zeros(*shape)])
    message = str(excinfo.value)
    assert f"{dimension} {size}" in message
    assert f"patch size {patch_value}" in message
    assert str(patch) in message


def test_patcher_rejects_nonpositive_patch():
    with pytest.raises(ValueError, match="patch_h must be >= 1"):
        SpacetimePatcher(1, 0, 2)


# ----------------------------------------------------------------------------------------- per-sample helpers
def mixed_pack(seed=0, dim=5):
    g = torch.Generator().manual_seed(seed)
    return PackedSequence.from_grids(
        [torch.randn(1, 2, 3, dim, generator=g), torch.randn(2, 2, 2, dim, generator=g), torch.randn(1, 1, 1, dim, generator=g)]
    )


def uniform_pack(seed=0, dim=5):
    g = torch.Generator().manual_seed(seed)
    return PackedSequence.from_grids([torch.randn(1, 2, 3, dim, generator=g), torch.randn(3, 1, 2, dim, generator=g)])


@pytest.mark.parametrize("make", [mixed_pack, uniform_pack], ids=["mixed", "uniform"])
def test_sample_index_per_token_and_mean_match_naive_loops(make):
    packed = make()
    naive_index = [i for i, n in enumerate(packed.seqlens) for _ in range(n)]
    assert packed.sample_index.tolist() == naive_index
    assert packed.sample_index.shape == (packed.tokens.shape[0],)

    values = torch.randn(packed.num_samples, 4, 2)  # [B, ...] with trailing dims
    spread = packed.per_token(values)
    assert spread.shape == (packed.tokens.shape[0], 4, 2)
    for token, sample in enumerate(naive_index):
        assert torch.equal(spread[token], values[sample])

    per_token_values = torch.randn(packed.tokens.shape[0], dtype=torch.float64)
    means = packed.per_sample_mean(per_token_values)
    assert means.shape == (packed.num_samples,)
    naive = [per_token_values[[t for t, s in enumerate(naive_index) if s == i]].mean() for i in range(packed.num_samples)]
    torch.testing.assert_close(means, torch.stack(naive), rtol=0, atol=1e-12)


def test_is_uniform():
    assert uniform_pack().is_uniform
    assert not mixed_pack().is_uniform
    assert mixed_pack().max_seqlen == 8


def test_split_and_with_tokens():
    packed = mixed_pack()
    parts = packed.split()
    assert [p.shape[0] for p in parts] == list(packed.seqlens)
    assert torch.equal(torch.cat(parts), packed.tokens)
    other = torch.randn(packed.tokens.shape[0], 9)
    new = packed.with_tokens(other)
    assert new.tokens is other and new.grid_sizes == packed.grid_sizes
    assert torch.equal(new.positions, packed.positions) and torch.equal(new.cu_seqlens, packed.cu_seqlens)
    assert [p.shape for p in new.split()] == [(n, 9) for n in packed.seqlens]
    with pytest.raises(ValueError, match="expected 15 tokens, got 14"):
        packed.with_tokens(torch.randn(14, 5))


def test_concat_matches_packing_everything_at_once():
    patcher = SpacetimePatcher(1, 4, 4)
    latents = make_latents(MIXED_SHAPES, seed=3)
    first, second = patcher.patchify(latents[:2]), patcher.patchify(latents[2:])
    joined = PackedSequence.concat([first, second])
    whole = patcher.patchify(latents)
    assert joined.grid_sizes == whole.grid_sizes
    assert torch.equal(joined.tokens, whole.tokens)
    assert torch.equal(joined.cu_seqlens, whole.cu_seqlens)
    assert torch.equal(joined.positions, whole.positions)
    assert joined.sample_index.tolist() == whole.sample_index.tolist()
    for a, b in zip(patcher.unpatchify(joined), latents):
        assert torch.equal(a, b)
    # concatenating a pack with itself (the guided + unguided halves of a CFG step)
    doubled = PackedSequence.concat([first, first])
    assert doubled.num_samples == 4
    assert doubled.cu_seqlens.tolist() == [0, *itertools.accumulate(first.seqlens * 2)]


# ------------------------------------------------------------------------------------------------- validation
def test_validation_rejects_inconsistent_inputs():
    good = mixed_pack()
    n = good.tokens.shape[0]
    with pytest.raises(ValueError, match=r"tokens must be \[N, D\]"):
        PackedSequence(good.tokens[None], good.cu_seqlens, good.positions, good.grid_sizes)
    with pytest.raises(ValueError, match="one entry per sample plus one"):
        PackedSequence(good.tokens, good.cu_seqlens[:-1], good.positions, good.grid_sizes)
    with pytest.raises(ValueError, match="one entry per sample plus one"):
        PackedSequence(good.tokens, good.cu_seqlens[None], good.positions, good.grid_sizes)
    with pytest.raises(ValueError, match=rf"imply {n} tokens, but tokens has {n - 1}"):
        PackedSequence(good.tokens[:-1], good.cu_seqlens, good.positions, good.grid_sizes)
    with pytest.raises(ValueError, match=r"positions has shape \(14, 3\)"):
        PackedSequence(good.tokens, good.cu_seqlens, good.positions[:-1], good.grid_sizes)
    with pytest.raises(ValueError, match=r"positions has shape \(15, 2\)"):
        PackedSequence(good.tokens, good.cu_seqlens, good.positions[:, :2], good.grid_sizes)
    wrong_sizes = ((1, 2, 3), (2, 2, 2), (1, 1, 2))
    with pytest.raises(ValueError, match="imply 16 tokens"):
        PackedSequence(good.tokens, good.cu_seqlens, good.positions, wrong_sizes)


def test_from_grids_rejects_bad_grids():
    with pytest.raises(ValueError, match="empty"):
        PackedSequence.from_grids([])
    with pytest.raises(ValueError, match="one D"):
        PackedSequence.from_grids([torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 5)])
    with pytest.raises(ValueError, match=r"\[t, h, w, D\]"):
        PackedSequence.from_grids([torch.zeros(2, 2, 4)])
