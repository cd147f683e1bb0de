"""Frame conditioning and generation tasks: given frames come out exactly as given (pixel space), interpolation keeps
both ends, SDEdit at strength 0 returns the input and at 1 ignores it, mask strategies follow their probabilities,
and bad prompt rows are reported by row and field while the other rows still run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from framework.data.prompts import GenerationTask, Prompts, load_prompt_requests
from framework.generation.frame_conditioning import (
    FrameCondition,
    FrameMaskProbabilities,
    FrameMaskStrategy,
    sample_training_masks,
    strategy_mask,
    token_mask,
    ungiven_frames,
)
from framework.modules import VideoDiffusion
from framework.layers.packing import PackedSequence
from framework.data.video_io import read_video, write_video
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow

FRAMES, SIZE = 6, 16


def tiny_model(**kwargs) -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
        HashedTextConditioner(width=16, depth=1, num_heads=2, caption_dropout=0.0), RectifiedFlow(shift=3.0),
        sampling_steps=3, frame_conditioning=FrameMaskProbabilities(), **kwargs,
    ).eval()


def moving_square(frames: int, colour: tuple[float, float, float], step: int = 2) -> torch.Tensor:
    video = -torch.ones(3, frames, SIZE, SIZE)  # [3, T, H, W]
    for f in range(frames):
        x = (f * step) % (SIZE - 4)
        video[:, f, 6:10, x:x + 4] = torch.tensor(colour)[:, None, None]
    return video


@pytest.fixture
def media(tmp_path) -> Path:
    write_video(tmp_path / "red.mp4", moving_square(8, (1.0, -1.0, -1.0)), fps=8)
    write_video(tmp_path / "blue.mp4", moving_square(8, (-1.0, -1.0, 1.0), step=1), fps=8)
    write_video(tmp_path / "short.mp4", moving_square(2, (1.0, 1.0, -1.0)), fps=8)
    frame = moving_square(1, (-1.0, 1.0, -1.0))[:, 0]  # [3, H, W]
    Image.fromarray(((frame + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "frame.png")
    return tmp_path


def run_rows(model: VideoDiffusion, folder: Path, rows: list[dict]):
    file = folder / "prompts.jsonl"
    file.write_text("".join(json.dumps({"frames": FRAMES, "height": SIZE, "width": SIZE, **r}) + "\n" for r in rows))
    requests = load_prompt_requests(Prompts(file=file))
    return [item for r in requests for item in model.predict_step([r], 0)]


# ------------------------------------------------------------------------------------------------ masks
def test_strategy_masks_cover_the_right_frames_and_never_all():
    frames = 5
    assert strategy_mask(FrameMaskStrategy.NONE, frames, 2).sum() == 0
    assert strategy_mask(FrameMaskStrategy.FIRST_FRAME, frames, 2).tolist() == [True, False, False, False, False]
    for _ in range(50):
        first_k = strategy_mask(FrameMaskStrategy.FIRST_K, frames, 3)
        k = int(first_k.sum())
        assert 1 <= k <= 3 and first_k[:k].all() and not first_k[k:].any()
        last_k = strategy_mask(FrameMaskStrategy.LAST_K, frames, 3)
        k = int(last_k.sum())
        assert 1 <= k <= 3 and last_k[frames - k:].all() and not last_k[: frames - k].any()
        both = strategy_mask(FrameMaskStrategy.FIRST_AND_LAST, frames, 2)
        assert both[0] and both[-1] and not both.all()
        span = strategy_mask(FrameMaskStrategy.RANDOM_SPAN, frames, 2).nonzero().flatten()
        assert 1 <= len(span) <= 2 and (span.diff() == 1).all()
    for strategy in FrameMaskStrategy:  # two frames: something is always left to learn; one frame: nothing given
        assert not strategy_mask(strategy, 2, 4).all()
        assert not strategy_mask(strategy, 1, 4).any()


def test_mask_strategy_probabilities_are_honoured():
    probabilities = FrameMaskProbabilities(none=0.5, first_frame=0.5, first_k=0, last_k=0, first_and_last=0,
                                           random_span=0)
    masks = sample_training_masks(probabilities, [4] * 4000, torch.Generator().manual_seed(0))
    given = torch.stack(masks).sum(1)  # [4000] 0 (none) or 1 (first frame)
    assert set(given.tolist()) == {0, 1}
    assert abs(given.float().mean().item() - 0.5) < 0.03  # binomial std 0.008
    with pytest.raises(ValueError, match="weights"):
        FrameMaskProbabilities(none=-1.0)


def test_token_mask_follows_the_patcher_and_loss_mask_leaves_given_tokens_out():
    patcher = SpacetimePatcher(2, 4, 4)
    mask = torch.tensor([True, True, True, False])  # latent frames; tokens span 2 frames
    given = token_mask(patcher, [(3, 4, 8, 8)], [mask])  # grid 2 x 2 x 2
    assert given.tolist() == [True] * 4 + [False] * 4  # the second temporal patch is only half given: not given
    layout = PackedSequence.from_grids([torch.zeros(2, 2, 2, 1), torch.zeros(1, 2, 2, 1)])
    values = torch.arange(12.0)
    loss_mask = torch.tensor([False] * 4 + [True] * 4 + [True, True, False, False])
    assert layout.per_sample_mean(values, loss_mask).tolist() == [5.5, 8.5]
    # Through the sampler: changing the prediction on masked-out tokens leaves the loss unchanged.
    flow, clean = RectifiedFlow(), PackedSequence.from_grids([torch.randn(2, 2, 2, 3)])
    keep = torch.tensor([False] * 4 + [True] * 4)
    pred = torch.randn(8, 3)
    other = pred.clone()
    other[:4] += 10
    a = flow.training_loss(lambda x, t: x.with_tokens(pred), clean, torch.Generator().manual_seed(1), loss_mask=keep)
    b = flow.training_loss(lambda x, t: x.with_tokens(other), clean, torch.Generator().manual_seed(1), loss_mask=keep)
    assert torch.equal(a, b)


def test_ungiven_frames_counts_given_frames_lost_to_partly_given_tokens(caplog):
    """A context that does not fill whole temporal tokens is not kept: counted, and generation warns about it."""
    shapes = [(3, 8, 8, 8), (3, 8, 8, 8), (3, 8, 8, 8)]
    masks = [torch.arange(8) < k for k in (3, 4, 5)]  # first 3, 4, 5 latent frames given
    assert ungiven_frames(SpacetimePatcher(4, 4, 4), shapes, masks) == [3, 0, 1]
    assert ungiven_frames(SpacetimePatcher(2, 4, 4), shapes, masks) == [1, 0, 1]
    assert ungiven_frames(SpacetimePatcher(1, 4, 4), shapes, masks) == [0, 0, 0]
    model = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(2, 4, 4), DiT(width=32, depth=1, num_heads=2),
        HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(), sampling_steps=2,
        frame_conditioning=FrameMaskProbabilities(),
    ).eval()
    video = torch.zeros(3, 4, 16, 16)  # [3, T, H, W]
    with caplog.at_level("WARNING"):
        out = model.generate(["x"], [(4, 16, 16)], [0], frame_conditions=[FrameCondition(video, torch.arange(4) < 3)])
    # 2-frame tokens: frames 0-1 are kept, frame 2 is not.
    assert "generated, not kept" in caplog.text and "{'sample 0': 1}" in caplog.text
    assert torch.equal(out[0][:, :2], video[:, :2]) and not torch.equal(out[0][:, 2], video[:, 2])


def test_frames_given_as_channels_reach_partly_given_tokens_and_are_kept(caplog):
    """``channels``: given frames enter as projected input channels, so a context inside a token still conditions
    the model (training moves the zero-initialised projection) and comes out exactly as given, with no warning."""
    from framework.data.datamodules import SyntheticVideoDataModule

    torch.manual_seed(0)
    model = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(4, 4, 4), DiT(width=32, depth=1, num_heads=2),
        HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(), sampling_steps=2,
        frame_conditioning=FrameMaskProbabilities(none=0.0, first_frame=1.0, channels=True),
    )
    assert model.frame_embedding.channels.in_features == 4 * 4 * 4 * 4  # (3 colour + 1 mask) x the patch
    batch = next(iter(SyntheticVideoDataModule(num_samples=4, sizes=[(4, 16, 16)], batch_size=4).train_dataloader()))
    optimizer = torch.optim.Adam(model.trained_modules().parameters(), lr=1e-3)
    for _ in range(3):  # the zero-initialised output head passes no gradient to the input on the first step
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.frame_embedding.channels.weight.abs().sum() > 0
    model.eval()
    video = batch["videos"][0]  # [3, 4, 16, 16]: one temporal token, of which 3 frames are given
    condition = FrameCondition(video, torch.arange(4) < 3)
    with caplog.at_level("WARNING"):
        given_out = model.generate(["x"], [(4, 16, 16)], [0], frame_conditions=[condition])[0]
    plain_out = model.generate(["x"], [(4, 16, 16)], [0])[0]
    assert "not kept" not in caplog.text
    assert torch.equal(given_out[:, :3], video[:, :3])
    assert not torch.allclose(given_out[:, 3], plain_out[:, 3])  # the generated frame depends on the given ones


def test_training_step_with_frame_conditioning_trains_the_marker():
    from framework.data.datamodules import SyntheticVideoDataModule

    model = tiny_model().train()
    model.frame_conditioning = FrameMaskProbabilities(none=0.0)  # every sample gets given frames
    assert "frame_embedding" in model.trained_modules()
    batch = next(iter(SyntheticVideoDataModule(num_samples=8, sizes=[(4, 16, 16)], batch_size=8).train_dataloader()))
    marker_before = model.frame_embedding.marker.detach().clone()
    optimizer = torch.optim.Adam(model.trained_modules().parameters(), lr=1e-3)
    for _ in range(3):  # the zero-initialised output head passes no gradient to the input on the first step
        loss = model.training_step(batch, 0)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.frame_embedding.marker.detach(), marker_before)


# ------------------------------------------------------------------------------------------- generation
def test_given_frames_are_reproduced_exactly_in_pixel_space(media):
    model = tiny_model()
    red, _ = read_video(media / "red.mp4")  # [3, 8, 16, 16] as the model reads it
    blue, _ = read_video(media / "blue.mp4")
    image, _ = read_video(media / "frame.png")
    items = run_rows(model, media, [
        {"caption": "a red square", "task": "image_to_video", "image": "frame.png"},
        {"caption": "a red square", "task": "extend_forward", "video": "red.mp4", "context_frames": 3},
        {"caption": "a red square", "task": "extend_backward", "video": "red.mp4", "context_frames": 2},
        {"caption": "connect", "task": "interpolate", "video": "red.mp4", "video_end": "blue.mp4", "context_frames": 2},
        {"caption": "a red square", "task": "text_to_video"},
    ])
    assert [i.error for i in items] == [None] * 5
    i2v, forward, backward, interp, t2v = (i.video for i in items)
    assert i2v.shape == (3, FRAMES, SIZE, SIZE)
    assert torch.equal(i2v[:, :1], image)
    assert torch.equal(forward[:, :3], red[:, -3:])  # continues the end of the video
    assert torch.equal(backward[:, -2:], red[:, :2])  # leads into the start of the video
    assert torch.equal(interp[:, :2], red[:, -2:]) and torch.equal(interp[:, -2:], blue[:, :2])
    # The frames in between are generated (not copies of the context) and differ from unconditioned generation.
    assert not torch.equal(forward[:, 3:], t2v[:, 3:])


def test_sdedit_strength_zero_returns_the_input_and_one_ignores_it(media):
    model = tiny_model()
    red, _ = read_video(media / "red.mp4")
    items = run_rows(model, media, [
        {"caption": "a red square", "task": "sdedit", "video": "red.mp4", "strength": 0.0, "seed": 5},
        {"caption": "a red square", "task": "sdedit", "video": "red.mp4", "strength": 1.0, "seed": 5},
        {"caption": "a red square", "task": "sdedit", "video": "blue.mp4", "strength": 1.0, "seed": 5},
        {"caption": "a red square", "seed": 5},
        {"caption": "a red square", "task": "sdedit", "video": "red.mp4", "strength": 0.5, "seed": 5},
    ])
    zero, one_red, one_blue, t2v, half = (i.video for i in items)
    assert torch.equal(zero, red[:, :FRAMES])
    assert torch.equal(one_red, one_blue) and torch.equal(one_red, t2v)
    # In between: closer to the input than generation from scratch is.
    assert (half - red[:, :FRAMES]).abs().mean() < (t2v - red[:, :FRAMES]).abs().mean()


def test_bad_rows_are_named_by_row_and_field_and_the_others_run(media):
    model = tiny_model()
    items = run_rows(model, media, [
        {"caption": "ok"},
        {"caption": "no image", "task": "image_to_video", "image": "missing.png"},
        {"caption": "short", "task": "extend_forward", "video": "short.mp4", "context_frames": 4},
        {"caption": "typo", "task": "image_to_vidoe", "image": "frame.png"},
        {"caption": "too strong", "task": "sdedit", "video": "red.mp4", "strength": 1.5},
        {"caption": "ok too", "task": "image_to_video", "image": "frame.png"},
    ])
    errors = [i.error for i in items]
    assert errors[0] is None and errors[5] is None
    assert items[0].video is not None and items[5].video is not None
    expected = {1: ("prompts.jsonl:2", "'image'", "missing.png"), 2: ("prompts.jsonl:3", "'video'", "2 frames"),
                3: ("prompts.jsonl:4", "'task'", "image_to_vidoe"), 4: ("prompts.jsonl:5", "'strength'", "1.5")}
    for row, needles in expected.items():
        for needle in needles:
            assert needle in errors[row], (row, errors[row])
    with pytest.raises(RuntimeError, match="4 prompt row"):
        model.on_predict_end()
    assert load_prompt_requests(Prompts(file=media / "prompts.jsonl"))[5].task is GenerationTask.IMAGE_TO_VIDEO


def test_predict_cli_writes_good_rows_records_bad_ones_and_fails(media, monkeypatch):
    """``kinetoscope predict`` with a prompts file: outputs of good rows are kept, each bad row is in the index
    with its error, and the command fails at the end naming the bad rows."""
    import sys

    from framework.cli.lightning_cli import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart_frames.yaml"
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    monkeypatch.chdir(media)
    (media / "prompts.jsonl").write_text(
        json.dumps({"caption": "a red square", "task": "extend_forward", "video": "red.mp4", "context_frames": 2}) + "\n"
        + json.dumps({"caption": "bad", "task": "sdedit", "video": "red.mp4", "strength": -0.1}) + "\n"
    )
    out_dir = media / "out"
    with pytest.raises(RuntimeError, match=r"prompts.jsonl:2.*'strength'"):
        cli_main(["predict", "-c", str(config), "--data.init_args.prompts.file=prompts.jsonl",
                  "--data.init_args.prompts.captions=[]",
                  "--data.init_args.prompts.frames=8", "--model.init_args.sampling_steps=2", "--trainer.logger=false",
                  f"--trainer.callbacks.output_dir={out_dir}", "--trainer.enable_progress_bar=false",
                  "--trainer.enable_model_summary=false"])
    rows = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "error" not in rows[0] and "'strength'" in rows[1]["error"]
    video, _ = read_video(out_dir / next(f for f in rows[0]["files"] if f.endswith(".mp4")))
    assert video.shape[1] == 8  # the config's 8-frame tubes; the 2 given frames inside the first reach it as channels


@pytest.mark.parametrize("denoiser_name", ["STDiT", "MMDiT"])
def test_every_denoiser_family_takes_frame_conditions(denoiser_name):
    """The marker and replacement act on tokens, so ST-DiT and MM-DiT need no change: train a step, then generate
    with a given first frame that comes out exactly."""
    from framework.data.datamodules import SyntheticVideoDataModule
    from framework.generation.frame_conditioning import FrameCondition
    from plugins.denoisers.mmdit import MMDiT
    from plugins.denoisers.st_dit import STDiT

    torch.manual_seed(0)
    denoiser = {"STDiT": STDiT, "MMDiT": MMDiT}[denoiser_name](width=32, depth=2, num_heads=2)
    model = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(1, 4, 4), denoiser,
        HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(),
        frame_conditioning=FrameMaskProbabilities(none=0.0),
    )
    batch = next(iter(SyntheticVideoDataModule(num_samples=4, sizes=[(4, 16, 16)], batch_size=4).train_dataloader()))
    model.training_step(batch, 0).backward()
    video = moving_square(4, (1.0, -1.0, -1.0))  # [3, 4, 16, 16]
    mask = torch.tensor([True, False, False, False])
    (out,) = model.eval().generate(["a red square"], [(4, SIZE, SIZE)], [0], steps=2,
                                    frame_conditions=[FrameCondition(video, mask)])
    assert torch.equal(out[:, :1], video[:, :1]) and not torch.equal(out[:, 1:], video[:, 1:])
