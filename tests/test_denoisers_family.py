"""ST-DiT and MM-DiT on packed, variable-size input: equal to per-sample calls, attention groups that never leak,
size presets, bad sizes rejected by name, and a few training steps that lower the loss."""

from __future__ import annotations

import pytest
import torch

from framework.core.interfaces import Conditioning, DenoiserIO
from framework.layers.packing import PackedSequence
from tests.denoiser_fixtures import random_conditioning, random_denoiser
from plugins.denoisers.mmdit import MMDiT
from framework.layers.presets import PRESET_SIZES, Preset, TransformerSize, resolve_size
from plugins.denoisers.st_dit import AttentionAxis, GroupedLayout, STDiT
from plugins.samplers.rectified_flow import RectifiedFlow
from plugins.samplers.rectified_flow_heun import RectifiedFlowHeun

IO = DenoiserIO(token_dim=6, context_dim=10, pooled_dim=12)
DENOISERS = {"STDiT": STDiT, "MMDiT": MMDiT}


def build(name: str, randomise: bool = True, **kwargs):
    return random_denoiser(DENOISERS[name], IO, randomise, **{"width": 32, "depth": 3, "num_heads": 2, **kwargs})


def conditioning(lengths: list[int], seed: int = 0) -> Conditioning:
    return random_conditioning(IO, lengths, seed)


def select(cond: Conditioning, i: int) -> Conditioning:
    """Sample i alone, its caption trimmed to its real length (no padding at all)."""
    length = int(cond.context_mask[i].sum())
    return Conditioning(cond.context[i : i + 1, :length], cond.context_mask[i : i + 1, :length], cond.pooled[i : i + 1])


GRIDS = [(3, 2, 4), (1, 4, 4), (2, 3, 1)]  # mixed frames, heights, widths and token counts


@pytest.mark.parametrize("name", list(DENOISERS))
@torch.no_grad()
def test_packed_mixed_sizes_match_per_sample_calls(name) -> None:
    model = build(name)
    g = torch.Generator().manual_seed(1)
    grids = [torch.randn(*size, IO.token_dim, generator=g) for size in GRIDS]
    x = PackedSequence.from_grids(grids)
    t = torch.tensor([0.1, 0.5, 0.9])
    cond = conditioning([5, 2, 7])
    packed = model(x, t, cond)
    assert packed.tokens.shape == x.tokens.shape and packed.grid_sizes == x.grid_sizes
    for i, grid in enumerate(grids):
        alone = model(PackedSequence.from_grids([grid]), t[i : i + 1], select(cond, i)).tokens
        torch.testing.assert_close(x.split(packed.tokens)[i], alone, rtol=1e-4, atol=1e-4, msg=f"sample {i}")
    assert packed.tokens.abs().mean() > 0.01  # a randomised model really computes something


@pytest.mark.parametrize("name", list(DENOISERS))
@torch.no_grad()
def test_uniform_batch_matches_per_sample_calls(name) -> None:
    """Equal-size samples take the dense attention path; it must agree with single-sample calls too."""
    model = build(name)
    grids = [torch.randn(2, 2, 3, IO.token_dim) for _ in range(2)]
    x, t, cond = PackedSequence.from_grids(grids), torch.tensor([0.3, 0.7]), conditioning([3, 3])
    packed = model(x, t, cond)
    for i, grid in enumerate(grids):
        alone = model(PackedSequence.from_grids([grid]), t[i : i + 1], select(cond, i)).tokens
        torch.testing.assert_close(x.split(packed.tokens)[i], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(DENOISERS))
def test_a_fresh_model_predicts_zero(name) -> None:
    """adaLN-Zero and the zero-initialised head: the untrained model starts as the zero predictor."""
    model = build(name, randomise=False)
    x = PackedSequence.from_grids([torch.randn(2, 2, 2, IO.token_dim)])
    assert torch.equal(model(x, torch.tensor([0.5]), conditioning([4])).tokens, torch.zeros_like(x.tokens))


# ------------------------------------------------------------------------------------------------------ ST-DiT
@pytest.mark.parametrize("axis", list(AttentionAxis))
def test_grouped_layout_forms_one_group_per_frame_or_location(axis) -> None:
    x = PackedSequence.from_grids([torch.zeros(*size, 1) for size in GRIDS])
    layout = GroupedLayout.build(x, axis)
    pos = x.positions.long()
    keep = [0] if axis is AttentionAxis.SPATIAL else [1, 2]  # coordinates shared within a group
    expected_groups = sum(t if axis is AttentionAxis.SPATIAL else h * w for t, h, w in GRIDS)
    assert sum(len(b) for b in layout.buckets) == expected_groups
    everything = torch.cat([b.flatten() for b in layout.buckets])
    assert torch.equal(everything.sort().values, torch.arange(x.tokens.shape[0]))  # each token in one group
    for bucket in layout.buckets:
        for members in bucket:
            assert len(set(x.sample_index[members].tolist())) == 1
            assert (pos[members][:, keep] == pos[members[0]][keep]).all()


def test_positions_that_contradict_the_grid_sizes_are_rejected() -> None:
    x = PackedSequence.from_grids([torch.zeros(2, 2, 2, 1)])
    wrong = PackedSequence(x.tokens, x.cu_seqlens, x.positions * 0.5, x.grid_sizes)  # frames 0 and 1 collide
    with pytest.raises(ValueError, match="positions"):
        GroupedLayout.build(wrong, AttentionAxis.SPATIAL)


@torch.no_grad()
def test_spatial_block_does_not_look_across_frames() -> None:
    """One spatial block only: changing frame 1 must leave frame 0's prediction untouched (and change frame 1)."""
    model = build("STDiT", depth=1)
    grid = torch.randn(2, 3, 3, IO.token_dim)
    changed = grid.clone()
    changed[1] += 1.0
    t, cond = torch.tensor([0.4]), conditioning([3])
    a = model(PackedSequence.from_grids([grid]), t, cond).tokens.view(2, 9, -1)
    b = model(PackedSequence.from_grids([changed]), t, cond).tokens.view(2, 9, -1)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


@torch.no_grad()
def test_temporal_block_links_frames_at_one_location_only() -> None:
    """Spatial then temporal block: a change at (frame 1, row 0, col 0) reaches frame 0 through the temporal
    block at every location (the spatial block spread it over frame 1 first); with depth 1 it does not."""
    model = build("STDiT", depth=2)
    grid = torch.randn(2, 2, 2, IO.token_dim)
    changed = grid.clone()
    changed[1, 0, 0] += 1.0
    t, cond = torch.tensor([0.4]), conditioning([3])
    a = model(PackedSequence.from_grids([grid]), t, cond).tokens.view(2, 4, -1)
    b = model(PackedSequence.from_grids([changed]), t, cond).tokens.view(2, 4, -1)
    assert not torch.allclose(a[0], b[0])


def test_stdit_alternates_spatial_and_temporal_blocks() -> None:
    model = build("STDiT", depth=4, randomise=False)
    assert [b.axis for b in model.blocks] == [AttentionAxis.SPATIAL, AttentionAxis.TEMPORAL] * 2


# ------------------------------------------------------------------------------------------------------ MM-DiT
@torch.no_grad()
def test_mmdit_reads_the_caption_and_ignores_its_padding() -> None:
    model = build("MMDiT")
    x, t = PackedSequence.from_grids([torch.randn(1, 2, 3, IO.token_dim)]), torch.tensor([0.5])
    cond = conditioning([3], seed=4)
    padded = Conditioning(
        torch.cat([cond.context, torch.randn(1, 4, IO.context_dim)], dim=1),  # garbage in the padding
        torch.cat([cond.context_mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1),
        cond.pooled,
    )
    base = model(x, t, cond).tokens
    torch.testing.assert_close(model(x, t, padded).tokens, base)
    other = Conditioning(torch.randn_like(cond.context), cond.context_mask, cond.pooled)
    assert not torch.allclose(model(x, t, other).tokens, base, atol=1e-3)  # the caption tokens matter


def test_mmdit_last_block_keeps_only_caption_keys_and_values() -> None:
    model = build("MMDiT", randomise=False)
    assert model.blocks[-1].caption.attention_only
    assert all(not b.caption.attention_only for b in model.blocks[:-1])
    assert not hasattr(model.blocks[-1].caption, "mlp")


# ------------------------------------------------------------------------------------------------------ presets
def test_presets_are_dits_sizes() -> None:
    assert PRESET_SIZES == {
        Preset.S: TransformerSize(384, 12, 6), Preset.B: TransformerSize(768, 12, 12),
        Preset.L: TransformerSize(1024, 24, 16), Preset.XL: TransformerSize(1152, 28, 16),
    }
    assert resolve_size("X", "B") == TransformerSize(768, 12, 12)
    assert resolve_size("X") == TransformerSize(384, 12, 6)  # S without a preset
    assert resolve_size("X", Preset.L, depth=2) == TransformerSize(1024, 2, 16)  # fields override the preset


@pytest.mark.parametrize("name", list(DENOISERS))
def test_denoiser_takes_its_size_from_the_preset(name) -> None:
    model = DENOISERS[name](preset="S", depth=1)
    assert (model.width, model.depth, model.num_heads) == (384, 1, 6)
    assert len(model.blocks) == 1


@pytest.mark.parametrize("name", list(DENOISERS))
@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({"preset": "XXL"}, ["preset", "XXL", "'S'", "'XL'"]),
        ({"width": 30, "num_heads": 4}, ["width 30", "num_heads 4"]),
        ({"width": 32, "num_heads": 8}, ["width", "num_heads", "head size"]),  # head size 4 < 6 for 3D RoPE
        ({"depth": 0}, ["depth"]),
    ],
)
def test_bad_sizes_fail_at_construction_naming_the_fields(name, kwargs, fields) -> None:
    with pytest.raises(ValueError) as info:
        DENOISERS[name](**{"width": 32, "depth": 2, "num_heads": 2, **kwargs})
    message = str(info.value)
    assert name in message
    for field in fields:
        assert field in message


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", list(DENOISERS))
def test_a_few_training_steps_lower_the_loss(name) -> None:
    model = build(name, randomise=False).train()
    sampler = RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    clean = PackedSequence.from_grids([0.5 + 0.1 * torch.randn(*size, IO.token_dim, generator=g) for size in GRIDS])
    cond = conditioning([5, 2, 7])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = sampler.training_loss(lambda x, t: model(x, t, cond), clean, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("name", list(DENOISERS))
def test_gradient_checkpointing_gives_the_same_gradients(name) -> None:
    x = PackedSequence.from_grids([torch.randn(*size, IO.token_dim) for size in GRIDS[:2]])
    t, cond = torch.tensor([0.2, 0.6]), conditioning([3, 4])
    grads = []
    for checkpointing in (False, True):
        model = build(name, gradient_checkpointing=checkpointing).train()
        model(x, t, cond).tokens.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    ("name", "sampler"),
    [("STDiT", "DDIM"), ("MMDiT", "DPMSolverPlusPlus"), ("MMDiT", "DDPM"), ("STDiT", "RectifiedFlowHeun")],
)
def test_video_diffusion_generates_requested_sizes_with_each_family(name, sampler) -> None:
    """VideoDiffusion wires the new denoisers and samplers like the built-in ones: mixed-size generation with
    guidance returns one video per caption at its size."""
    from framework.modules import VideoDiffusion
    from plugins.compressors.pixel import PixelCompressor
    from plugins.conditioners.hashed_text import HashedTextConditioner
    from plugins.patchers.spacetime import SpacetimePatcher
    from plugins.samplers.ddim import DDIM
    from plugins.samplers.ddpm import DDPM
    from plugins.samplers.dpm_solver import DPMSolverPlusPlus

    samplers = {"DDIM": DDIM, "DPMSolverPlusPlus": DPMSolverPlusPlus, "DDPM": DDPM,
                "RectifiedFlowHeun": RectifiedFlowHeun}
    torch.manual_seed(0)
    module = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(patch_t=1, patch_h=4, patch_w=4),
        DENOISERS[name](width=32, depth=2, num_heads=2), HashedTextConditioner(width=16, depth=1, num_heads=2),
        samplers[sampler](), sampling_steps=3,
    )
    videos = module.generate(["a red square", "a blue circle"], [(2, 8, 12), (3, 12, 8)], seeds=[0, 1])
    assert [tuple(v.shape) for v in videos] == [(3, 2, 8, 12), (3, 3, 12, 8)]
    assert all(torch.isfinite(v).all() for v in videos)


@pytest.mark.parametrize(("name", "extra"), [("STDiT", {"frames": 3}), ("MMDiT", {})])
@torch.no_grad()
def test_flops_per_token_matches_counted_flops(name, extra) -> None:
    """The analytic estimate (blocks only) is within 10% of the counted forward FLOPs (measured: 2.6% for ST-DiT,
    5.7% for MM-DiT at width 128, whose caption stream and embedders the estimate leaves out)."""
    from framework.training.flop_count import count_flops

    model = build(name, width=64, depth=4, num_heads=4)
    x = PackedSequence.from_grids([torch.randn(3, 6, 6, IO.token_dim) for _ in range(2)])
    cond = conditioning([8, 8])
    counted = count_flops(lambda: model(x, torch.rand(2), cond))
    estimated = model.flops_per_token(108, 8, **extra) * x.tokens.shape[0]
    assert 0.9 < estimated / counted <= 1.0, (estimated, counted)
