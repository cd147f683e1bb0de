"""Step caches (plugins/denoisers/step_cache.py): threshold 0 equals the wrapped denoiser exactly, a positive
threshold skips blocks and stays close to the uncached sample, and checkpoints load with or without the cache."""

from __future__ import annotations

import pytest
import torch

from framework.core.interfaces import Conditioning, DenoiserIO
from framework.generation.guidance import guided_model_fn
from framework.layers.packing import PackedSequence
from plugins.denoisers.dit import DiT
from plugins.denoisers.mmdit import MMDiT
from plugins.denoisers.st_dit import STDiT
from plugins.denoisers.step_cache import FirstBlockCache, TimestepEmbeddingCache
from plugins.samplers.rectified_flow import RectifiedFlow
from plugins.samplers.rectified_flow_heun import RectifiedFlowHeun

STEPS, SCALE = 12, 3.0  # random weights change much between steps: thresholds below are large for them
CACHES = [FirstBlockCache, TimestepEmbeddingCache]


def conditioning(lengths: list[int], seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # [B, L]
    return Conditioning(torch.randn(len(lengths), max(lengths), 8, generator=g), mask,
                        torch.randn(len(lengths), 8, generator=g))


def random_denoiser(family, depth: int = 4):
    torch.manual_seed(0)
    denoiser = family(width=32, depth=depth, num_heads=2)
    denoiser.bind(DenoiserIO(token_dim=6, context_dim=8, pooled_dim=8))
    with torch.no_grad():
        for p in denoiser.parameters():  # off the adaLN-Zero init, so every block changes the hidden states
            p.normal_(0.0, 0.1)
    return denoiser.eval()


def sample(denoiser, sampler=None) -> torch.Tensor:
    noise = PackedSequence.from_grids([torch.randn(2, 2, 3, 6, generator=torch.Generator().manual_seed(1)),
                                       torch.randn(3, 2, 2, 6, generator=torch.Generator().manual_seed(2))])
    cond, null = conditioning([5, 3], seed=1), conditioning([1, 1], seed=2)
    with torch.no_grad():
        return (sampler or RectifiedFlow(shift=2.0)).sample(guided_model_fn(denoiser, cond, null, SCALE),
                                                            noise, STEPS).tokens


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max()
    return float(10 * torch.log10(peak**2 / (a - b).pow(2).mean()))


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("family", [DiT, STDiT, MMDiT])
@pytest.mark.parametrize("threshold", [0.0, 1e-12])  # 0: not intercepted; 1e-12: intercepted, never skipping
def test_threshold_zero_equals_uncached_exactly(cache, family, threshold) -> None:
    denoiser = random_denoiser(family)
    expected = sample(denoiser)
    wrapped = cache(denoiser, threshold=threshold, warmup_steps=1).eval()
    assert torch.equal(sample(wrapped), expected)
    assert wrapped.skip_ratio == 0.0


@pytest.mark.parametrize("cache, threshold", [(FirstBlockCache, 1.0), (TimestepEmbeddingCache, 1.5)])
@pytest.mark.parametrize("family", [DiT, MMDiT])
def test_positive_threshold_skips_blocks_and_stays_close(cache, threshold, family, monkeypatch) -> None:
    denoiser = random_denoiser(family)
    expected = sample(denoiser)
    block_type = type(denoiser.blocks[0])
    runs = []
    forward = block_type.forward
    monkeypatch.setattr(block_type, "forward", lambda self, *a, **k: runs.append(1) or forward(self, *a, **k))
    wrapped = cache(denoiser, threshold=threshold, warmup_steps=2).eval()
    cached = sample(wrapped)
    skipped = wrapped.state.skipped
    assert wrapped.state.calls == STEPS and skipped > 0
    skipped_blocks = len(denoiser.blocks) - wrapped.first_skipped
    assert len(runs) == STEPS * len(denoiser.blocks) - skipped * skipped_blocks  # the skipped blocks never ran
    assert not torch.equal(cached, expected)
    assert psnr(cached, expected) > 25.0  # a cache error, not a different sample (random weights: ~35 dB)


def test_warmup_calls_are_computed_and_runs_start_afresh() -> None:
    wrapped = FirstBlockCache(random_denoiser(DiT), threshold=10.0, warmup_steps=3).eval()  # skips whenever it may
    sample(wrapped)
    assert wrapped.state.skipped == STEPS - 3
    first = sample(wrapped)  # a second run does not reuse the first run's residual
    assert torch.equal(first, sample(wrapped))
    heun = RectifiedFlowHeun()
    sample(wrapped, heun)  # two calls per step: the warm-up counts calls
    assert wrapped.state.calls > STEPS


@pytest.mark.parametrize("cache", CACHES)
def test_checkpoint_and_parameter_names_are_the_wrapped_denoisers(cache) -> None:
    plain = random_denoiser(DiT)
    wrapped = cache(random_denoiser(DiT), threshold=0.1)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]  # EMA keys
    fresh = DiT(width=32, depth=4, num_heads=2)
    fresh.bind(DenoiserIO(token_dim=6, context_dim=8, pooled_dim=8))
    target = cache(fresh, threshold=0.0)
    target.load_state_dict(plain.state_dict())  # strict: an uncached checkpoint loads into the cached model
    assert torch.equal(sample(target.eval()), sample(plain))
    plain.load_state_dict(wrapped.state_dict())  # and back
    target.to(torch.float64)  # moves the wrapped denoiser's tensors too: they are the same
    assert fresh.embed.weight.dtype == torch.float64
    target.train()
    assert fresh.training and all(m.training for m in fresh.modules())


@pytest.mark.parametrize("cache", CACHES)
def test_bad_settings_and_unwrappable_denoisers_are_named(cache) -> None:
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        cache(random_denoiser(DiT), threshold=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        cache(random_denoiser(DiT), warmup_steps=0)


# ---------------------------------------------------------------------------------------- through the CLI
def cache_overlay(path, cache: str, threshold: float) -> str:
    """A predict-time overlay that wraps the quickstart's DiT in a step cache (the checkpoint is unchanged)."""
    path.write_text(f"""model:
  init_args:
    denoiser:
      class_path: {cache}
      init_args:
        denoiser:
          class_path: DiT
          init_args: {{width: 128, depth: 4, num_heads: 4}}
        threshold: {threshold}
        warmup_steps: 2
""")
    return str(path)


def test_predict_with_a_cache_config_loads_the_uncached_checkpoint(tmp_path, monkeypatch) -> None:
    import json
    import sys
    from pathlib import Path

    from framework.cli.lightning_cli import cli_main
    from framework.cli.main import main

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    main(["fit", "-c", str(quickstart), "--trainer.max_steps=2", "--data.init_args.batch_size=4",
          "--data.init_args.num_samples=16", *quiet])
    predict = ["predict", "-c", str(quickstart), "--ckpt_path", "last", "--model.init_args.sampling_steps=8",
               "--trainer.callbacks+=framework.generation.writer.VideoWriter", *quiet]

    def run(name: str, *overlay: str) -> list[bytes]:
        out = tmp_path / name
        runs.append(cli_main([*predict[:3], *overlay, *predict[3:], f"--trainer.default_root_dir={tmp_path / 'runs/quickstart'}",
              f"--trainer.callbacks.output_dir={out}", "--trainer.callbacks.formats=[gif]"]))
        rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        return [(out / row["files"][0]).read_bytes() for row in rows]

    runs = []
    plain = run("plain")
    exact = run("exact", "-c", cache_overlay(tmp_path / "exact.yaml", "FirstBlockCache", 0.0))
    assert exact == plain  # threshold 0: the same videos, byte for byte
    skipping = run("skipping", "-c", cache_overlay(tmp_path / "skip.yaml", "TimestepEmbeddingCache", 100.0))
    cache = runs[-1].model.denoiser
    assert isinstance(cache, TimestepEmbeddingCache)
    assert (cache.state.calls, cache.state.skipped) == (8, 6)  # the last prompt: every call after the warm-up
    assert len(skipping) == len(plain)


@pytest.mark.parametrize("cache", CACHES)
def test_a_diffusers_wan_transformer_is_wrapped_through_its_blocks(cache, tmp_path) -> None:
    pytest.importorskip("diffusers", reason="optional extra: pip install 'kinetoscope[diffusers]'")
    from pretrained_fixtures import tiny_wan_transformer

    from plugins.denoisers.diffusers_transformer import DiffusersVideoTransformer

    torch.manual_seed(0)
    tiny_wan_transformer(in_channels=4, text_dim=16).save_pretrained(tmp_path / "t")
    denoiser = DiffusersVideoTransformer(tmp_path / "t", subfolder=None).eval()
    with torch.no_grad():
        for p in denoiser.parameters():  # Wan zero-initialises parts; random weights make the residuals nonzero
            p.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(0)
    noise = PackedSequence.from_grids([torch.randn(2, 4, 6, 4, generator=g)])
    mask = torch.ones(1, 5, dtype=torch.bool)
    cond = Conditioning(torch.randn(1, 5, 16, generator=g), mask, torch.randn(1, 16, generator=g))
    null = Conditioning(torch.zeros(1, 5, 16), mask, torch.zeros(1, 16))

    def run(d) -> torch.Tensor:
        with torch.no_grad():
            return RectifiedFlow().sample(guided_model_fn(d, cond, null, SCALE), noise, 6).tokens

    expected = run(denoiser)
    assert torch.equal(run(cache(denoiser, threshold=1e-12).eval()), expected)  # intercepted, never skipping
    skipping = cache(denoiser, threshold=100.0, warmup_steps=2).eval()
    cached = run(skipping)
    assert skipping.state.skipped == 4 and torch.isfinite(cached).all()
