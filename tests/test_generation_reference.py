"""Generation reproduces, bit for bit, the videos stored before the generation pipeline was split out of
VideoDiffusion (``tests/data/generation_reference.pt``, written by ``tests/generation_reference.py`` at commit
28a2772): text-to-video, negative prompts with guidance rescale, micro-conditions, image-to-video and extension
with given frames (token replacement and channels), SDEdit, every denoiser family and sampler, the causal VAE, prompt
rows through ``predict_step`` and ``kinetoscope predict`` itself.

The comparison is exact: the refactor keeps every operation and its order, so the same CPU float32 kernels give the
same bits (a change of reduction order would show here, and must then be argued against a derived bound instead)."""

from __future__ import annotations

import pytest
import torch

import generation_reference as ref


@pytest.fixture(scope="module")
def stored() -> dict[str, list[torch.Tensor]]:
    return torch.load(ref.REFERENCE, weights_only=True)


def assert_same_videos(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, i, g.shape, w.shape)
        assert torch.equal(g, w), f"{name}[{i}]: max difference {float((g.double() - w.double()).abs().max())}"


@pytest.mark.parametrize("case", list(ref.CASES))
def test_generation_matches_the_stored_reference(case, stored):
    assert_same_videos(case, ref.CASES[case](), stored[case])


def test_prompt_rows_through_predict_step_match_the_stored_reference(tmp_path, stored):
    assert_same_videos("prompt_rows", ref.prompt_rows(tmp_path), stored["prompt_rows"])


def test_kinetoscope_predict_writes_the_stored_reference_frames(tmp_path, monkeypatch, stored):
    monkeypatch.chdir(tmp_path)
    assert_same_videos("cli_predict", ref.cli_predict(tmp_path, []),
                       stored["cli_predict"])


def test_predict_from_a_checkpoint_with_the_former_module_ema_uses_its_average(tmp_path, monkeypatch):
    """A checkpoint written before EMACallback (hyperparameter ``ema_decay``, the average as ``ema.module.*``) still
    predicts through ``kinetoscope predict`` with its averaged weights: the same frames as a checkpoint holding
    those weights directly."""
    import lightning as L

    from plugins.denoisers.dit import DiT
    from plugins.samplers.rectified_flow import RectifiedFlow

    monkeypatch.chdir(tmp_path)
    model = ref.build(DiT(width=32, depth=2, num_heads=2), RectifiedFlow(shift=3.0, prediction="clean"),
                      patch=(8, 4, 4))
    averaged = {k: v for k, v in model.state_dict().items()}
    state = {k: (v + 0.05 if v.is_floating_point() else v) for k, v in averaged.items()}  # "trained" != average
    old = {f"ema.module.{name}": averaged[name] for name, p in model.named_parameters()}
    old["ema.n_averaged"] = torch.tensor(40)
    hparams = {"_class_path": "framework.modules.VideoDiffusion", "ema_decay": 0.995}  # as LightningCLI saves them
    torch.save({"state_dict": {**state, **old}, "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, tmp_path / "old.ckpt")
    from_old = ref.cli_predict(tmp_path, [], checkpoint=tmp_path / "old.ckpt")
    torch.save({"state_dict": averaged, "pytorch-lightning_version": L.__version__}, tmp_path / "plain.ckpt")
    assert_same_videos("old checkpoint", from_old, ref.cli_predict(tmp_path, [], checkpoint=tmp_path / "plain.ckpt"))


def test_pipeline_built_from_plugins_takes_given_noise_and_returns_latents(stored):
    """The pipeline on its own (no LightningModule): given initial noise equal to the seeded one reproduces the
    stored videos, ``decode=False`` returns the latents that decode to them, and noise of the wrong shape is named."""
    from framework.generation.pipeline import GenerationPipeline
    from plugins.denoisers.dit import DiT
    from plugins.samplers.rectified_flow import RectifiedFlow

    model = ref.build(DiT(width=32, depth=2, num_heads=2), RectifiedFlow(shift=3.0), sampling_steps=3)
    pipeline = GenerationPipeline(model.compressor, model.patcher, model.denoiser, model.conditioner, model.sampler,
                                  sampling_steps=3)
    sizes = [(4, 16, 16), (4, 16, 24)]
    noise = pipeline.initial_noise(ref.CAPTIONS, sizes, [0, 7])
    latents = pipeline.generate(ref.CAPTIONS, sizes, [123, 456], noise=noise, decode=False)
    assert [tuple(x.shape) for x in latents] == [(3, 4, 16, 16), (3, 4, 16, 24)]
    assert_same_videos("pipeline", pipeline.decode(latents), stored["text_to_video_dit"])
    with pytest.raises(ValueError, match=r"sample 1's noise is \(3, 4, 16, 16\), its latent is \(3, 4, 16, 24\)"):
        pipeline.generate(ref.CAPTIONS, sizes, [0, 7], noise=[noise[0], noise[0]])
