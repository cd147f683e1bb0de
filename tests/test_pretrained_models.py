"""Open-weight diffusers video models as plugins, with diffusers itself as the oracle.

Tiny random Wan 2.1 and LTX-Video pipelines (and a CogVideoX VAE) are built with ``from_config``-sized weights and
``save_pretrained`` into temporary folders (tests/pretrained_fixtures.py); nothing is downloaded. fp32 on CPU: our
plugins call the same modules on the same inputs, so differences are reduction-order rounding (observed ~1e-6 on
[-1, 1] videos after several steps); the issue's bound 1e-4 is used for whole videos, 1e-5 for single modules.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from pretrained_fixtures import save_tiny_cogvideox_vae, save_tiny_ltx, save_tiny_wan  # noqa: E402

from framework.cli.main import main  # noqa: E402
from framework.layers.packing import PackedSequence  # noqa: E402
from plugins.compressors.diffusers_video_vae import DiffusersVideoVAE  # noqa: E402
from plugins.conditioners.t5_text import T5TextConditioner  # noqa: E402
from plugins.denoisers.diffusers_transformer import DiffusersVideoTransformer  # noqa: E402
from plugins.patchers.spacetime import SpacetimePatcher  # noqa: E402
from plugins.samplers.diffusers_scheduler import DiffusersFlowScheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WAN_CONFIG, LTX_CONFIG = REPO / "examples" / "wan_predict.yaml", REPO / "examples" / "ltx_predict.yaml"
WAN_FOLDER, LTX_FOLDER = "models/Wan2.1-T2V-1.3B-Diffusers", "models/LTX-Video"  # the examples' default paths
VIDEO_TOL, MODULE_TOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "Wan")


@pytest.fixture(scope="module")
def ltx(tmp_path_factory) -> Path:
    return save_tiny_ltx(tmp_path_factory.mktemp("ltx") / "LTX")


def seed_noise(channels: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """The initial noise ``kinetoscope predict`` draws for a prompt with this seed (VideoDiffusion.generate)."""
    return torch.randn(channels, *shape, generator=torch.Generator().manual_seed(seed))


def run_predict(config: Path, folder: Path, link: str, workdir: Path, monkeypatch, *overrides: str) -> list[dict]:
    """``kinetoscope predict -c config`` in ``workdir`` with ``folder`` at the config's default path; index rows."""
    (workdir / link).parent.mkdir(parents=True, exist_ok=True)
    (workdir / link).symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    main(["predict", "-c", str(config), "--trainer.enable_progress_bar=false", *overrides])
    index = next(workdir.glob("runs/*/samples/index.jsonl"))
    return [json.loads(line) for line in index.read_text().splitlines()]


def written_video(workdir: Path, row: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    [name] = [f for f in row["files"] if f.endswith(".safetensors")]
    return load_file(str(next(workdir.glob(f"runs/*/samples/{name}"))))["video"]  # [3, T, H, W] in [-1, 1]


# ------------------------------------------------------------------------------------- predict parity (CLI)
@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_wan_predict_equals_wan_pipeline(wan, scheduler, tmp_path, monkeypatch) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    folder = tmp_path / "Wan"
    shutil.copytree(wan, folder)
    sched = (FlowMatchEulerDiscreteScheduler(shift=3.0) if scheduler == "euler" else
             UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    shutil.rmtree(folder / "scheduler")
    sched.save_pretrained(folder / "scheduler")
    caption, negative, (frames, height, width), steps, scale = "a red square moving left", "blurry static", \
        (5, 16, 32), 4, 5.0
    rows = run_predict(WAN_CONFIG, folder, WAN_FOLDER, tmp_path / "work", monkeypatch,
                       f"--model.init_args.sampling_steps={steps}", f"--model.init_args.guidance_scale={scale}",
                       f"--data.init_args.prompts.captions=[{caption}]",
                       f"--data.init_args.prompts.negative_prompt={negative}",
                       f"--data.init_args.prompts.frames={frames}", f"--data.init_args.prompts.height={height}",
                       f"--data.init_args.prompts.width={width}", "--data.init_args.prompts.seed=7")
    ours = written_video(tmp_path / "work", rows[0])

    pipe = WanPipeline.from_pretrained(folder, scheduler=sched)  # model_index.json still names the Euler scheduler
    noise = seed_noise(4, (2, 2, 4), seed=7)  # Wan VAE: 5 frames -> 2, 16 x 32 -> 2 x 4
    theirs = pipe(caption, negative_prompt=negative, height=height, width=width, num_frames=frames,
                  num_inference_steps=steps, guidance_scale=scale, latents=noise[None], output_type="pt").frames[0]
    theirs = theirs.permute(1, 0, 2, 3) * 2 - 1  # [T, 3, H, W] in [0, 1] -> [3, T, H, W] in [-1, 1]
    assert ours.shape == theirs.shape == (3, frames, height, width)
    torch.testing.assert_close(ours, theirs, atol=VIDEO_TOL, rtol=0)
    assert ours.std() > 0.01  # a real video, not a constant


def test_ltx_predict_equals_ltx_pipeline(ltx, tmp_path, monkeypatch) -> None:
    from diffusers import LTXPipeline

    caption, (frames, height, width), steps, scale = "a blue circle moving up", (9, 32, 64), 3, 3.0
    rows = run_predict(LTX_CONFIG, ltx, LTX_FOLDER, tmp_path, monkeypatch,
                       f"--model.init_args.sampling_steps={steps}", f"--model.init_args.guidance_scale={scale}",
                       "--model.init_args.denoiser.init_args.ltx_vae_temporal_factor=4",  # the tiny VAE's factors
                       "--model.init_args.denoiser.init_args.ltx_vae_spatial_factor=4",
                       f"--data.init_args.prompts.captions=[{caption}]", "--data.init_args.prompts.negative_prompt=",
                       f"--data.init_args.prompts.frames={frames}", f"--data.init_args.prompts.height={height}",
                       f"--data.init_args.prompts.width={width}", "--data.init_args.prompts.seed=3")
    ours = written_video(tmp_path, rows[0])

    pipe = LTXPipeline.from_pretrained(ltx)
    noise = seed_noise(8, (3, 8, 16), seed=3)  # tiny LTX VAE: 4x time, 4x space
    theirs = pipe(caption, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                  guidance_scale=scale, latents=noise.flatten(1).T[None], output_type="pt").frames[0]
    theirs = theirs.permute(1, 0, 2, 3) * 2 - 1
    assert ours.shape == theirs.shape == (3, frames, height, width)
    torch.testing.assert_close(ours, theirs, atol=VIDEO_TOL, rtol=0)


def test_wan_image_to_video_and_sdedit_through_predict(wan, tmp_path, monkeypatch) -> None:
    """Wan (a text-to-video model) takes the frame-conditioning tasks by replacement: image-to-video keeps the
    image's latent frame exactly, so the causal VAE decodes the output's first frame as the image's reconstruction;
    SDEdit starts from the given video noised to the strength's step."""
    from PIL import Image

    from framework.data.video_io import write_video

    work = tmp_path / "work"
    work.mkdir()
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(16, 32, 3, generator=g) * 255).round() / 255  # exactly representable in the PNG
    Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(work / "first.png")
    write_video(work / "clip.mp4", torch.rand(3, 5, 16, 32, generator=g) * 2 - 1, fps=8)
    rows = [{"caption": "a red square", "task": "image_to_video", "image": "first.png"},
            {"caption": "a red square", "task": "sdedit", "video": "clip.mp4", "strength": 0.5}]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = run_predict(WAN_CONFIG, wan, WAN_FOLDER, work, monkeypatch, "--model.init_args.sampling_steps=2",
                        "--data.init_args.prompts.captions=[]", "--data.init_args.prompts.file=prompts.jsonl",
                        "--data.init_args.prompts.frames=5",
                        "--data.init_args.prompts.height=16", "--data.init_args.prompts.width=32")
    assert [r.get("error") for r in index] == [None, None]
    i2v = written_video(work, index[0])
    vae = DiffusersVideoVAE(wan)
    pixels = image.permute(2, 0, 1)[:, None] * 2 - 1  # [3, 1, H, W]
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(pixels[None]))[0, :, 0]  # [3, H, W]
    torch.testing.assert_close(i2v[:, 0], reconstruction, atol=VIDEO_TOL, rtol=0)
    assert written_video(work, index[1]).shape == (3, 5, 16, 32)


# --------------------------------------------------------------------------------------------- module parity
def test_wan_and_ltx_transformers_equal_diffusers_on_a_mixed_pack(wan, ltx) -> None:
    """Two sizes (one of them twice, so a group runs as a batch) in one pack, different timesteps per sample."""
    for folder, shapes, extra in ((wan, [(2, 4, 6), (3, 2, 4), (2, 4, 6)], {}),
                                  (ltx, [(2, 4, 6), (3, 2, 4), (2, 4, 6)],
                                   dict(ltx_vae_temporal_factor=4, ltx_vae_spatial_factor=4))):
        denoiser = DiffusersVideoTransformer(folder, **extra)
        conditioner = T5TextConditioner(folder, max_length=32)
        c = denoiser.latent_channels
        g = torch.Generator().manual_seed(0)
        latents = [torch.randn(c, *s, generator=g) for s in shapes]
        t = torch.tensor([0.9, 0.5, 0.2])
        cond = conditioner(["a red square", "a blue circle moving up", ""])
        packed = SpacetimePatcher(1, 1, 1).patchify(latents)
        with torch.no_grad():
            out = SpacetimePatcher(1, 1, 1).unpatchify(denoiser(packed, t, cond))
            for i, latent in enumerate(latents):
                expected = denoiser.family.call(denoiser.transformer, latent[None], t[i:i + 1] * 1000,
                                                cond.context[i:i + 1], cond.context_mask[i:i + 1],
                                                denoiser.call_context)[0]
                torch.testing.assert_close(out[i], expected, atol=MODULE_TOL, rtol=0)
        # the direct diffusers call, spelled out for Wan (the family call above is what the adapter runs)
        if folder is wan:
            direct = denoiser.transformer(hidden_states=latents[1][None], timestep=t[1:2] * 1000,
                                          encoder_hidden_states=cond.context[1:2], return_dict=False)[0][0]
            torch.testing.assert_close(out[1], direct.detach(), atol=MODULE_TOL, rtol=0)


@pytest.mark.parametrize("family", ["wan", "ltx", "cogvideox"])
def test_vae_encode_decode_equal_diffusers_with_the_pipeline_normalisation(family, wan, ltx, tmp_path) -> None:
    folder = {"wan": lambda: wan / "vae", "ltx": lambda: ltx / "vae",
              "cogvideox": lambda: save_tiny_cogvideox_vae(tmp_path / "cog")}[family]()
    vae = DiffusersVideoVAE(folder, subfolder=None)
    model = vae.autoencoder
    if family == "wan":
        mean, inv_std = torch.tensor(model.config.latents_mean), 1.0 / torch.tensor(model.config.latents_std)
        normalise = lambda z: (z - mean.view(1, -1, 1, 1, 1)) * inv_std.view(1, -1, 1, 1, 1)  # WanPipeline  # noqa: E731
        denormalise = lambda x: x / inv_std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)  # noqa: E731
        assert (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    elif family == "ltx":
        from diffusers import LTXPipeline

        sf = model.config.scaling_factor
        normalise = lambda z: LTXPipeline._normalize_latents(z, model.latents_mean, model.latents_std, sf)  # noqa: E731
        denormalise = lambda x: LTXPipeline._denormalize_latents(x, model.latents_mean, model.latents_std, sf)  # noqa: E731
        assert (vae.temporal_factor, vae.spatial_factor) == (4, 4)
    else:
        sf = model.config.scaling_factor
        normalise, denormalise = (lambda z: z * sf), (lambda x: x / sf)  # CogVideoXPipeline
        assert (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    g = torch.Generator().manual_seed(0)
    videos = [torch.rand(3, 5, 16, 24, generator=g) * 2 - 1, torch.rand(3, 9, 24, 16, generator=g) * 2 - 1]
    with torch.no_grad():
        latents = vae.encode_list(videos)
        decoded = vae.decode_list(latents)
        for video, latent, pixels in zip(videos, latents, decoded):
            expected = normalise(model.encode(video[None]).latent_dist.mean)[0]
            assert latent.shape == (vae.latent_channels, *vae.latent_shape(*video.shape[1:]))
            torch.testing.assert_close(latent, expected, atol=MODULE_TOL, rtol=1e-5)
            expected_pixels = model.decode(denormalise(latent[None])).sample.clamp(-1, 1)[0]
            torch.testing.assert_close(pixels, expected_pixels, atol=MODULE_TOL, rtol=0)


def test_text_encoders_equal_the_pipelines_prompt_encoding(wan, ltx) -> None:
    from diffusers import LTXPipeline, WanPipeline

    prompts, negative = ["a red  square &amp; a circle", "moving up"], ["", "blurry static"]
    wan_pipe = WanPipeline.from_pretrained(wan)
    ours = T5TextConditioner(wan).eval()
    embeds, negative_embeds = wan_pipe.encode_prompt(prompts, negative, device="cpu", max_sequence_length=512)
    cond, null = ours(prompts), ours(negative)
    assert cond.context.shape == (2, 512, 16)
    torch.testing.assert_close(cond.context, embeds, atol=MODULE_TOL, rtol=0)
    torch.testing.assert_close(null.context, negative_embeds, atol=MODULE_TOL, rtol=0)
    assert torch.equal(ours.null(2).context, ours(["", ""]).context)  # the null condition is the encoded ""
    lengths = cond.context_mask.sum(1)
    assert (cond.context[0, lengths[0]:] == 0).all()  # zero beyond the prompt (Wan)

    ltx_pipe = LTXPipeline.from_pretrained(ltx)
    ours = T5TextConditioner(ltx, max_length=128, encoder_mask=False, zero_padding=False, clean_prompts=False)
    embeds, mask, negative_embeds, negative_mask = ltx_pipe.encode_prompt(prompts, negative, device="cpu")
    cond, null = ours(prompts), ours(negative)
    torch.testing.assert_close(cond.context, embeds, atol=MODULE_TOL, rtol=0)
    torch.testing.assert_close(null.context, negative_embeds, atol=MODULE_TOL, rtol=0)
    assert torch.equal(cond.context_mask, mask.bool()) and torch.equal(null.context_mask, negative_mask.bool())


# ----------------------------------------------------------------------------------------------- scheduler
def linear_model(x: PackedSequence, t: torch.Tensor) -> PackedSequence:
    """A stand-in velocity that depends on x and t, so a wrong sigma or update shows."""
    return x.with_tokens(0.3 * x.tokens + x.per_token(t)[:, None] - 0.5)


def reference_run(scheduler, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The pipelines' loop: ``scheduler.step(model(x, t), t, x)`` with the model's t = timestep / 1000."""
    seen = []
    for timestep in scheduler.timesteps:
        t = timestep.float() / 1000
        seen.append(float(t))
        x = scheduler.step(0.3 * x + t - 0.5, timestep, x, return_dict=False)[0]
    return x, seen


@pytest.mark.parametrize("kind", ["euler", "unipc", "ltx_dynamic"])
def test_flow_scheduler_equals_diffusers_step_for_step(kind, tmp_path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    make = {
        "euler": lambda: FlowMatchEulerDiscreteScheduler(shift=5.0),
        "unipc": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=3.0),
        "ltx_dynamic": lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95,
                                                               max_shift=2.05, base_image_seq_len=16,
                                                               max_image_seq_len=256, shift_terminal=0.1),
    }[kind]
    make().save_pretrained(tmp_path)
    sampler = DiffusersFlowScheduler(tmp_path, subfolder=None, linear_sigmas=kind == "ltx_dynamic")
    steps = 7
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 3, 4), (4, 1, 2, 2)]  # two lengths: with dynamic shifting each has its own schedule
    packed = SpacetimePatcher(1, 1, 1).patchify([torch.randn(s, generator=g) for s in shapes])
    seen: list[torch.Tensor] = []
    out = sampler.sample(lambda x, t: seen.append(t.clone()) or linear_model(x, t), packed, steps)
    for i, piece in enumerate(packed.split()):
        reference = make()
        kwargs = {}
        if kind == "ltx_dynamic":
            from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

            c = reference.config
            kwargs = dict(sigmas=torch.linspace(1.0, 1 / steps, steps).numpy(),
                          mu=calculate_shift(len(piece), c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                             c.max_shift))
        reference.set_timesteps(None if kwargs else steps, **kwargs)
        expected, times = reference_run(reference, piece.clone())
        assert [float(t[i]) for t in seen] == pytest.approx(times, abs=1e-7)  # the timesteps, step for step
        torch.testing.assert_close(out.split()[i], expected, atol=1e-6, rtol=1e-6)  # the whole trajectory
    assert len(seen) == steps  # one model call per step


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_folders_and_sizes_fail_naming_them(wan, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'[^']*vae' holds a AutoencoderKLWan, not one of WanTransformer3DModel"):
        DiffusersVideoTransformer(wan, subfolder="vae")  # a folder of another model type
    with pytest.raises(ValueError, match="holds a WanTransformer3DModel, not one of AutoencoderKLWan"):
        DiffusersVideoVAE(wan, subfolder="transformer")
    broken = tmp_path / "broken_vae"
    shutil.copytree(wan / "vae", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()  # a missing weights file
    with pytest.raises(FileNotFoundError, match=f"'{broken}' has a config.json but no weights file"):
        DiffusersVideoVAE(broken, subfolder=None)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DiffusersVideoTransformer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds a AutoencoderKLWan, not one of FlowMatchEulerDiscreteScheduler"):
        (tmp_path / "sched").mkdir()
        shutil.copy(wan / "vae" / "config.json", tmp_path / "sched" / "scheduler_config.json")
        DiffusersFlowScheduler(tmp_path / "sched", subfolder=None)
    with pytest.raises(FileNotFoundError, match="'[^']*vae' is not a transformers tokenizer folder"):
        T5TextConditioner(wan, encoder_subfolder="text_encoder", tokenizer_subfolder="vae")
    vae = DiffusersVideoVAE(wan)
    with pytest.raises(ValueError, match=r"frames 6 must be 1 \+ k\*4"):  # a frame count the VAE cannot take
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="height 12 must be a positive multiple of 8"):
        vae.latent_shape(5, 12, 16)
    denoiser = DiffusersVideoTransformer(wan)
    from framework.core.interfaces import DenoiserIO

    with pytest.raises(ValueError, match=r"SpacetimePatcher\(patch_t: 1, patch_h: 1, patch_w: 1\)"):
        denoiser.bind(DenoiserIO(token_dim=16, context_dim=16, pooled_dim=16))  # a (1, 2, 2) patcher's tokens
    with pytest.raises(ValueError, match="latent width 3 is not divisible by the transformer's patch size 2"):
        denoiser.check_latent_size((2, 2, 3))


def test_predict_with_a_frame_count_the_vae_cannot_take_fails_naming_it(wan, tmp_path, monkeypatch, capsys) -> None:
    with pytest.raises((SystemExit, Exception)) as info:  # the CLI prints the message and exits non-zero
        run_predict(WAN_CONFIG, wan, WAN_FOLDER, tmp_path, monkeypatch, "--data.init_args.prompts.frames=6",
                    "--data.init_args.prompts.height=16", "--data.init_args.prompts.width=16")
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None)
    out = capsys.readouterr()
    assert re.search(r"frames 6 must be 1 \+ k\*4", f"{info.value}\n{out.out}\n{out.err}")
    assert not list(tmp_path.glob("runs/*/samples/*.safetensors"))


# ----------------------------------------------------------------------------------------------- latent cache
def test_cache_latents_with_the_wan_vae_is_exact(wan, tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from framework.data.datamodules import SyntheticVideoDataModule
    from framework.data.latent_cache import iter_cached_latents

    sizes = [[5, 16, 16], [1, 16, 24]]
    config = {"model": {"class_path": "framework.modules.VideoDiffusion", "init_args": {"compressor": {
                  "class_path": "DiffusersVideoVAE", "init_args": {"path": str(wan)}}}},
              "data": {"class_path": "framework.data.datamodules.SyntheticVideoDataModule",
                       "init_args": {"num_samples": 4, "sizes": sizes, "object_size": 3, "batch_size": 2}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    assert main(["cache-latents", "-c", str(path), "--output", str(tmp_path / "cache"), "--no-progress"]) == 0
    vae = DiffusersVideoVAE(wan)
    dataset = SyntheticVideoDataModule(num_samples=4, sizes=sizes, object_size=3, batch_size=2).dataset
    cached = list(iter_cached_latents(tmp_path / "cache"))
    assert len(cached) == 4
    for sample, latent in cached:
        with torch.no_grad():
            assert torch.equal(latent, vae.encode(dataset[sample.index]["video"][None])[0])
    assert {tuple(latent.shape) for _, latent in cached} == {(4, 2, 2, 2), (4, 1, 2, 3)}
