"""Micro-conditions (fps, original size): zero-initialised so a model starts unchanged, learnable (a target that
depends only on fps is learnt), per sample in packed mixed-size batches, the same on both guidance branches, read
from every data path (synthetic, manifest, latent cache), asked for per prompt in ``predict`` with bad rows named,
and kept by checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework.data.datamodules import ManifestVideoDataModule, SyntheticVideoDataModule, collate_videos
from framework.data.buckets import BucketConfig
from framework.data.latent_cache import CachedLatentDataModule, write_latent_cache
from framework.data.prompts import Prompts, load_prompt_requests
from framework.generation.guidance import guided_model_fn
from framework.core.interfaces import Conditioning, DenoiserIO
from framework.core.micro_conditions import STILL_IMAGE_FPS, MicroCondition, MicroConditionEmbedder, MicroConditions
from framework.modules import VideoDiffusion
from framework.layers.packing import PackedSequence
from tests.denoiser_fixtures import random_conditioning, random_denoiser
from framework.data.video_io import read_video
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.denoisers.mmdit import MMDiT
from plugins.denoisers.st_dit import STDiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow
from tests.manifest_media import write_manifest, write_numbered_mp4, write_still

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart_micro.yaml"
IO = DenoiserIO(token_dim=6, context_dim=10, pooled_dim=12)
DENOISERS = {"DiT": DiT, "STDiT": STDiT, "MMDiT": MMDiT}
ALL = [MicroCondition.FPS, MicroCondition.ORIGINAL_HEIGHT, MicroCondition.ORIGINAL_WIDTH]
GRIDS = [(3, 2, 4), (1, 4, 4), (2, 3, 1)]  # token grids (t, h, w): mixed frames, heights, widths


def build(name: str, randomise: bool = True, **kwargs):
    return random_denoiser(DENOISERS[name], IO, randomise, width=32, depth=2, num_heads=2, **kwargs)


def conditioning(lengths: list[int], seed: int = 0) -> Conditioning:
    return random_conditioning(IO, lengths, seed)


def select(cond: Conditioning, i: int) -> Conditioning:
    """Sample i alone, its caption trimmed to its real length, with its own micro-conditions."""
    length = int(cond.context_mask[i].sum())
    return Conditioning(cond.context[i : i + 1, :length], cond.context_mask[i : i + 1, :length],
                        cond.pooled[i : i + 1], cond.micro_conditions.select(slice(i, i + 1)))


def inputs(seed: int = 1):
    """(per-sample token grids, packed x, t [3], caption conditioning) for the three mixed-size samples of GRIDS."""
    g = torch.Generator().manual_seed(seed)
    grids = [torch.randn(*size, IO.token_dim, generator=g) for size in GRIDS]  # each [t, h, w, D]
    return grids, PackedSequence.from_grids(grids), torch.tensor([0.2, 0.5, 0.8]), conditioning([4, 2, 5])


# ------------------------------------------------------------------------------------------- zero initialisation
@pytest.mark.parametrize("name", list(DENOISERS))
@torch.no_grad()
def test_zero_init_leaves_the_model_unchanged(name) -> None:
    """A model given micro-conditions computes exactly what it computed without them, whatever their values."""
    plain = build(name)
    micro = build(name, randomise=False, micro_conditions=ALL)
    values = MicroConditions.build([8.0, 24.0, 60.0], [(16, 16), (720, 1280), (64, 48)])
    assert torch.equal(micro.micro_embed(values), torch.zeros(3, 32))  # after bind's weight init, too
    missing, unexpected = micro.load_state_dict(plain.state_dict(), strict=False)  # an existing model's weights
    assert not unexpected and missing and all(key.startswith("micro_embed.") for key in missing)
    _, x, t, cond = inputs()
    expected = plain(x, t, cond).tokens
    assert expected.abs().mean() > 0.01  # the randomised model computes something
    other = MicroConditions.build([1.0, 2.0, 3.0], [(8, 8), (8, 8), (8, 8)])
    for v in (values, other):
        assert torch.equal(micro(x, t, cond.with_micro_conditions(v)).tokens, expected)


@pytest.mark.parametrize("name", list(DENOISERS))
def test_a_denoiser_with_micro_conditions_refuses_a_conditioning_without_them(name) -> None:
    model = build(name, micro_conditions=[MicroCondition.FPS])
    _, x, t, cond = inputs()
    with pytest.raises(ValueError, match="micro-conditions.*FPS.*carries none"):
        model(x, t, cond)


def test_bad_micro_condition_values_and_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="sample 1's fps"):
        MicroConditions.build([8.0, -1.0], [(16, 16), (16, 16)])
    with pytest.raises(ValueError, match="sample 0's original width"):
        MicroConditions.build([8.0], [(16, 0)])
    with pytest.raises(ValueError, match="lists one twice"):
        MicroConditionEmbedder([MicroCondition.FPS, MicroCondition.FPS], 8)
    with pytest.raises(ValueError, match="original_sizes"):
        MicroConditions.from_batch({"fps": [8.0], "captions": ["a"]})


# ----------------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", list(DENOISERS))
def test_training_on_an_fps_target_makes_the_output_depend_on_fps(name) -> None:
    """The target is +1 at 8 fps and -1 at 24 fps, whatever the input: only the fps embedding can tell them apart."""
    model = build(name, randomise=False, micro_conditions=[MicroCondition.FPS]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    fps = [8.0, 24.0, 8.0, 24.0]
    target_sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    sizes = [(2, 2, 2)] * 4
    for _ in range(40):
        x = PackedSequence.from_grids([torch.randn(*s, IO.token_dim, generator=g) for s in sizes])
        cond = conditioning([3] * 4, seed=int(torch.randint(0, 1000, (1,), generator=g)))
        cond = cond.with_micro_conditions(MicroConditions.build(fps, [(16, 16)] * 4))
        out = model(x, torch.rand(4, generator=g), cond)
        target = x.per_token(target_sign)[:, None].expand_as(out.tokens)  # [N, D]
        loss = (out.tokens - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        x = PackedSequence.from_grids([torch.randn(2, 2, 2, IO.token_dim, generator=g)] * 2)
        cond = conditioning([3, 3], seed=7).with_micro_conditions(MicroConditions.build([8.0, 24.0], [(16, 16)] * 2))
        at_8, at_24 = x.split(model(x, torch.tensor([0.5, 0.5]), cond).tokens)  # same input and caption, two rates
    assert at_8.mean() > 0.5 and at_24.mean() < -0.5, (at_8.mean(), at_24.mean())


# ---------------------------------------------------------------------------------------- packing and guidance
@pytest.mark.parametrize("name", list(DENOISERS))
@torch.no_grad()
def test_packed_mixed_sizes_match_per_sample_calls(name) -> None:
    model = build(name, micro_conditions=ALL)
    _, x, t, cond = inputs()
    cond = cond.with_micro_conditions(MicroConditions.build([8.0, 24.0, 30.0], [(16, 16), (720, 1280), (64, 48)]))
    packed = model(x, t, cond)
    for i, grid in enumerate(x.split(x.tokens)):
        alone = model(PackedSequence.from_grids([grid.reshape(*GRIDS[i], -1)]), t[i : i + 1], select(cond, i)).tokens
        torch.testing.assert_close(x.split(packed.tokens)[i], alone, rtol=1e-4, atol=1e-4, msg=f"sample {i}")
    # Another frame rate for sample 1 changes sample 1 only.
    faster = cond.with_micro_conditions(MicroConditions.build([8.0, 60.0, 30.0], [(16, 16), (720, 1280), (64, 48)]))
    changed = [not torch.equal(a, b) for a, b in zip(x.split(packed.tokens), x.split(model(x, t, faster).tokens))]
    assert changed == [False, True, False]


@torch.no_grad()
def test_guidance_runs_both_branches_with_the_same_micro_conditions() -> None:
    model = build("DiT", micro_conditions=ALL)
    _, x, t, cond = inputs()
    values = MicroConditions.build([8.0, 24.0, 30.0], [(16, 16), (720, 1280), (64, 48)])
    cond = cond.with_micro_conditions(values)
    null = conditioning([1, 1, 1], seed=5).with_micro_conditions(values)
    guided = guided_model_fn(model, cond, null, scale=3.0)(x, t).tokens  # one batched call of both branches
    conditional, unconditional = model(x, t, cond).tokens, model(x, t, null).tokens
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="some items carry micro-conditions"):
        Conditioning.cat([cond, conditioning([1, 1, 1])])


def tiny_model(**kwargs) -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2, micro_conditions=ALL),
        HashedTextConditioner(width=16, depth=1, num_heads=2, caption_dropout=0.0), RectifiedFlow(),
        sampling_steps=2, **kwargs,
    )


class Recorder:
    """Wraps a denoiser's forward to keep the micro-conditions of every call."""

    def __init__(self, denoiser) -> None:
        self.calls: list[MicroConditions] = []
        forward = denoiser.forward

        def recording(x, t, cond):
            self.calls.append(cond.micro_conditions)
            return forward(x, t, cond)

        denoiser.forward = recording


def test_generate_gives_both_guidance_branches_the_prompt_values_and_fills_defaults() -> None:
    model = tiny_model(output_fps=10.0).eval()
    recorder = Recorder(model.denoiser)
    model.generate(["a", "b", "c"], [(4, 16, 16), (4, 16, 24), (1, 16, 16)], [0, 1, 2], guidance_scale=4.0,
                   fps=[12.0, None, None], original_sizes=[(480, 640), None, None])
    assert len(recorder.calls) == 2  # two steps, each one call of guided + unguided
    for values in recorder.calls:
        assert values.batch_size == 6  # [conditional (3), unconditional (3)]
        assert values.fps.tolist() == [12.0, 10.0, STILL_IMAGE_FPS] * 2  # given, output_fps, an image
        assert values.original_height.tolist() == [480.0, 16.0, 16.0] * 2  # given, then the requested size
        assert values.original_width.tolist() == [640.0, 24.0, 16.0] * 2


# ------------------------------------------------------------------------------------------------ data paths
def train_step_values(model: VideoDiffusion, batch: dict) -> MicroConditions:
    recorder = Recorder(model.denoiser)
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    return recorder.calls[0]


def test_synthetic_batches_carry_fps_and_size_into_the_denoiser() -> None:
    data = SyntheticVideoDataModule(num_samples=6, sizes=[(4, 16, 16), (4, 16, 24)], fps=12.0,
                                    batch_size=6, tokens_per_batch=100_000)  # packed: mixed sizes in one batch
    batch = next(iter(data.train_dataloader()))
    assert {tuple(v.shape[-2:]) for v in batch["videos"]} == {(16, 16), (16, 24)}
    assert batch["original_sizes"] == [tuple(v.shape[-2:]) for v in batch["videos"]]
    values = train_step_values(tiny_model(), batch)
    assert values.fps.tolist() == [12.0] * 6
    assert [(int(h), int(w)) for h, w in zip(values.original_height, values.original_width)] == \
        batch["original_sizes"]
    del batch["original_sizes"]
    with pytest.raises(ValueError, match="no 'original_sizes'"):
        tiny_model().training_step(batch, 0)


def test_synthetic_frame_rates_keep_the_speed_in_pixels_per_second() -> None:
    """With frame_rates [4, 8] (speed 1 px/frame at 8 fps) a 4 fps sample moves 2 px/frame, an 8 fps one 1."""
    data = SyntheticVideoDataModule(num_samples=8, sizes=[(6, 20, 20), (4, 20, 20)], speed=1, fps=8.0,
                                    frame_rates=[4.0, 8.0], batch_size=8)
    batch = next(iter(data.train_dataloader()))  # one shape per batch, both rates in it
    assert sorted(batch["fps"]) == [4.0, 4.0, 8.0, 8.0]
    combos = [(data.dataset.shape_of(i), data.dataset[i]["fps"]) for i in range(8)]
    assert len(set(combos)) == 4  # every size meets every rate
    for i in range(8):
        spec, item = data.dataset.spec(i), data.dataset[i]
        assert spec.speed == {4.0: 2, 8.0: 1}[item["fps"]]
        (x0, y0), (x1, y1) = spec.position(0), spec.position(1)
        assert abs(x1 - x0) + abs(y1 - y0) == spec.speed
    with pytest.raises(ValueError, match="frame_rates entry 3.0"):
        SyntheticVideoDataModule(sizes=[(4, 20, 20)], fps=8.0, frame_rates=[3.0])


def test_manifest_samples_carry_the_native_size_and_clip_rate(tmp_path) -> None:
    """A 48x48 clip and a 40x40 still, both resized into 16x16 buckets: the original size is the file's."""
    write_numbered_mp4(tmp_path / "clip.mp4", 12, 48, 48, fps=12)
    write_still(tmp_path / "still.png", 40, 40)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "clip.mp4", "caption": "a clip"},
                                                     {"path": "still.png", "caption": "a still"}])
    buckets = BucketConfig(resolutions=[16], aspect_ratios=[1.0], frame_counts=[1, 4], size_multiple=4)
    data = ManifestVideoDataModule(manifest, buckets=buckets, tokens_per_batch=4096)
    items = {s["id"]: s for s in (data.dataset[i] for i in range(len(data.dataset)))}
    assert items["clip.mp4"]["original_size"] == (48, 48) and items["clip.mp4"]["video"].shape[-2:] == (16, 16)
    assert items["clip.mp4"]["fps"] == pytest.approx(12.0)
    assert items["still.png"]["original_size"] == (40, 40) and items["still.png"]["fps"] == STILL_IMAGE_FPS
    batch = collate_videos([items["clip.mp4"]])
    assert batch["original_sizes"] == [(48, 48)]


def test_latent_cache_keeps_fps_and_original_size_for_training(tmp_path) -> None:
    data = SyntheticVideoDataModule(num_samples=4, sizes=[(4, 16, 24)], fps=6.0)
    write_latent_cache(PixelCompressor(), data.dataset, tmp_path / "cache", progress=False)
    batch = next(iter(CachedLatentDataModule(str(tmp_path / "cache"), batch_size=4).train_dataloader()))
    assert batch["fps"] == [6.0] * 4 and batch["original_sizes"] == [(16, 24)] * 4
    values = train_step_values(tiny_model(), batch)
    assert values.fps.tolist() == [6.0] * 4 and values.original_width.tolist() == [24.0] * 4
    # A cache written before original sizes were recorded serves the decoded size.
    index = tmp_path / "cache" / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    index.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "original_size"}) + "\n" for r in rows))
    old = next(iter(CachedLatentDataModule(str(tmp_path / "cache"), batch_size=4).train_dataloader()))
    assert old["original_sizes"] == [(16, 24)] * 4


# ------------------------------------------------------------------------------------------------- prompts
def test_prompt_fields_are_read_and_bad_values_name_the_row_and_field(tmp_path) -> None:
    file = tmp_path / "prompts.jsonl"
    rows = [{"caption": "ok", "fps": 24}, {"caption": "zero", "fps": 0}, {"caption": "text", "fps": "fast"},
            {"caption": "size", "original_height": 720, "original_width": 1280}, {"caption": "bad size",
                                                                               "original_width": 12.5}]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    requests = load_prompt_requests(Prompts(captions=["from config"], file=file, fps=12.0))
    assert [r.caption for r in requests] == [r["caption"] for r in rows]  # the file replaces the config's captions
    assert requests[0].error is None and requests[3].error is None
    assert (requests[0].fps, requests[3].fps) == (24.0, 12.0)  # row value, config default
    assert requests[3].original_size == (720, 1280) and requests[0].original_size == (16, 16)
    for i, needles in {1: ("prompts.jsonl:2", "'fps'", "0"), 2: ("prompts.jsonl:3", "'fps'", "'fast'"),
                       4: ("prompts.jsonl:5", "'original_width'", "12.5")}.items():
        assert all(n in requests[i].error for n in needles), requests[i].error
    with pytest.raises(ValueError, match=r"prompts.fps: must be a number > 0, got -1"):
        Prompts(fps=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three training steps of configs/quickstart_micro.yaml -> (run dir, the fitted CLI)."""
    from framework.cli.lightning_cli import cli_main

    run_dir = tmp_path_factory.mktemp("micro")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setattr(sys, "argv", ["kinetoscope"])
        cli = cli_main(["fit", "-c", str(CONFIG), "--trainer.max_steps=3", "--data.init_args.batch_size=4",
                        "--data.init_args.num_samples=16", "--model.init_args.warmup_steps=0",
                        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    assert cli.model.denoiser.micro_conditions == tuple(ALL)
    return run_dir, cli


def test_checkpoint_round_trip_keeps_the_embedder(trained) -> None:
    from framework.core.registry import default_registry

    run_dir, cli = trained
    default_registry()
    loaded = VideoDiffusion.load_from_checkpoint(run_dir / "runs/quickstart_micro/checkpoints/last.ckpt",
                                                 weights_only=True)
    assert loaded.denoiser.micro_conditions == tuple(ALL)
    trained_state = {k: v for k, v in cli.model.state_dict().items() if "micro_embed" in k}
    assert len(trained_state) == 12  # 3 MLPs of 2 linear layers (weight, bias); the EMA is the callback's
    output_layer = cli.model.denoiser.micro_embed.mlps[0][-1].weight
    assert output_layer.abs().max() > 0  # trained away from its zero init, so equality below means something
    for key, value in trained_state.items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key


def test_predict_with_fps_in_a_prompts_file_writes_output_and_names_bad_rows(trained, monkeypatch) -> None:
    from framework.cli.lightning_cli import cli_main

    run_dir, _ = trained
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    (run_dir / "prompts.jsonl").write_text(
        json.dumps({"caption": "a red square moving right on a black background", "fps": 4}) + "\n"
        + json.dumps({"caption": "bad", "fps": -2}) + "\n"
        + json.dumps({"caption": "a blue circle", "original_height": 64, "original_width": 96}) + "\n"
    )
    with pytest.raises(RuntimeError, match=r"(?s)1 prompt row.*prompts.jsonl:2: field 'fps'"):
        cli_main(["predict", "-c", str(CONFIG), "--ckpt_path", "last", "--data.init_args.prompts.file=prompts.jsonl",
                  "--data.init_args.prompts.captions=[]", "--data.init_args.prompts.frames=8",
                  "--model.init_args.sampling_steps=2", "--trainer.logger=false",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    out_dir = run_dir / "runs/quickstart_micro/samples"
    rows = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "error" in rows[1] and "'fps'" in rows[1]["error"]
    assert (rows[0]["fps"], rows[2]["fps"]) == (4, 8.0)  # the row's rate, else the config's prompts.fps
    video, fps = read_video(out_dir / next(f for f in rows[0]["files"] if f.endswith(".mp4")))
    assert video.shape[1] == 8 and fps == pytest.approx(4.0)  # the file plays at the asked rate
    assert (out_dir / rows[2]["files"][0]).is_file()
