"""Training behaviour a user relies on: the loss goes down and captions stay distinguishable."""

from __future__ import annotations

import torch

from framework.data.datamodules import SyntheticVideoDataModule
from framework.modules import VideoDiffusion
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow


def tiny_model() -> VideoDiffusion:
    return VideoDiffusion(
        PixelCompressor(),
        SpacetimePatcher(1, 4, 4),
        DiT(width=64, depth=2, num_heads=4),
        HashedTextConditioner(width=32, depth=1, num_heads=2, caption_dropout=0.0),
        RectifiedFlow(),
    )


def pooled_spread(model: VideoDiffusion, captions: list[str]) -> float:
    pooled = model.conditioner(captions).pooled  # [B, D]
    return (pooled - pooled.mean(0)).norm(dim=-1).mean().item()


def test_training_lowers_the_loss_and_keeps_captions_apart() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    data = SyntheticVideoDataModule(num_samples=64, sizes=[(4, 16, 16)], batch_size=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    captions = [f"a red square moving {d} on a black background" for d in ("left", "right", "up", "down")]
    spread_before = pooled_spread(model, captions)
    losses = []
    for _ in range(25):
        for batch in data.train_dataloader():
            loss = model.training_step(batch, 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, f"loss did not halve: {first:.3f} -> {last:.3f}"
    # Regression guard: with small word embeddings Adam made all captions' features identical within ~50 steps
    # (spread 3.3 -> 0.09), so the model could not learn anything caption-specific but colour-by-accident.
    assert pooled_spread(model, captions) > 0.2 * spread_before


def test_ema_callback_weights_are_the_ones_predict_and_video_metrics_generate_with(tmp_path) -> None:
    """VideoDiffusion keeps no average of its own: EMACallback's is swapped in for ``predict`` (and by
    ``ema_weights`` for the metric callbacks), and the trained weights come back afterwards."""
    import lightning as L

    from framework.data.prompts import Prompts
    from framework.training.ema import EMACallback, ema_weights

    torch.manual_seed(0)
    model = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
        HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(), sampling_steps=2,
    )
    assert not any(name.startswith("ema") for name, _ in model.named_parameters())
    data = SyntheticVideoDataModule(num_samples=8, sizes=[(4, 16, 16)], batch_size=4,
                                    prompts=Prompts(captions=["a red square moving right on a black background"],
                                                    frames=4))
    ema = EMACallback(decay=0.5)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ema])
    trainer.fit(model, data)
    trained = model.denoiser.head.weight.detach().clone()
    assert not torch.equal(ema.average["denoiser.head.weight"], trained)

    (predicted,) = trainer.predict(model, data)
    with ema_weights(trainer, model):  # what VideoMetrics does
        assert torch.equal(model.denoiser.head.weight, ema.average["denoiser.head.weight"])
        (averaged,) = model.pipeline().generate([predicted[0].request.caption], [(4, 16, 16)],
                                                [predicted[0].request.seed])
    assert torch.equal(model.denoiser.head.weight, trained)  # swapped back
    (plain,) = model.pipeline().generate([predicted[0].request.caption], [(4, 16, 16)], [predicted[0].request.seed])
    assert torch.equal(predicted[0].video, averaged) and not torch.equal(averaged, plain)


def test_checkpoints_with_the_former_module_ema_hand_it_to_ema_callback() -> None:
    """A checkpoint written when VideoDiffusion kept ``ema.module.*`` loads: the average becomes EMACallback's state
    (trained parameters only) and the module state dict loads strictly."""
    torch.manual_seed(0)
    model = tiny_model()
    state = dict(model.state_dict())
    for name, p in model.named_parameters():
        state[f"ema.module.{name}"] = p.detach() + 1
    state["ema.n_averaged"] = torch.tensor(7)
    checkpoint = {"state_dict": state}
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])  # strict: no ema.* key left
    moved = checkpoint["callbacks"]["EMACallback"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(moved["average"]) == trained and moved["num_updates"] == 7
    assert torch.equal(moved["average"]["denoiser.head.weight"], model.denoiser.head.weight + 1)
    # Scripts that load a checkpoint without a trainer (benchmarks) take the average like this:
    from framework.training.ema import load_averaged_weights

    expected = model.denoiser.head.weight.detach() + 1
    assert load_averaged_weights(model, checkpoint)
    assert torch.equal(model.denoiser.head.weight, expected)
    assert not load_averaged_weights(model, {"state_dict": {}})


def test_negative_prompts_and_guidance_rescale_change_generation_and_empty_ones_do_not(tmp_path) -> None:
    from framework.data.prompts import Prompts, load_prompt_requests

    torch.manual_seed(0)
    model = tiny_model().eval()
    for p in model.denoiser.parameters():  # zero-initialised layers would make every caption look the same
        torch.nn.init.normal_(p, std=0.2)
    captions = ["a red square moving left on a black background"] * 2
    sizes, seeds = [(4, 16, 16)] * 2, [3, 3]
    plain = model.generate(captions, sizes, seeds, steps=4, guidance_scale=3.0)
    empty = model.generate(captions, sizes, seeds, steps=4, guidance_scale=3.0, negative_prompts=["", ""])
    negative = model.generate(captions, sizes, seeds, steps=4, guidance_scale=3.0,
                              negative_prompts=["", "a blue circle moving up on a white background"])
    rescaled = model.generate(captions, sizes, seeds, steps=4, guidance_scale=3.0, guidance_rescale=0.7)
    torch.testing.assert_close(empty[0], plain[0])
    torch.testing.assert_close(negative[0], plain[0])  # the first sample has no negative prompt
    assert not torch.allclose(negative[1], plain[1], atol=1e-3)
    assert not torch.allclose(rescaled[0], plain[0], atol=1e-3)

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"caption": "a", "negative_prompt": "static"}\n{"caption": "b"}\n')
    requests = load_prompt_requests(Prompts(file=prompts_file, negative_prompt="blurry"))
    assert [r.negative_prompt for r in requests] == ["static", "blurry"]
