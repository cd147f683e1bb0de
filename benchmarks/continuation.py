"""Does frame conditioning work? Continue held-out synthetic clips and check the object's colour and direction.

Each held-out clip (``SyntheticMovingShapes`` with a seed the models never trained on) gives its first
``--context`` frames; the model generates the whole ``--frames``-frame clip with those frames given, and
``framework.metrics.motion_probe.score_clip`` measures colour and motion direction on the *generated* frames only
(the given ones are left out, so copying them earns nothing). Compared side by side, same clips and seeds:

* ``conditioned``: the quickstart recipe trained with frame conditioning (configs/quickstart_frames.yaml);
* ``conditioned_text_only``: the same model generating from the caption alone (what the given frames add);
* ``baseline_replacement``: the plain quickstart model (configs/quickstart.yaml), given the same frames by
  replacement only (Ho et al. 2022's "replacement" method: it never saw given frames in training);
* ``baseline_text_only``: the plain quickstart model generating from the caption alone.

A token is given only when every frame it covers is given, so the default context (4 frames) is one temporal token
of a 4x4x4 patch; a model with 8-frame tubes keeps no context frames by replacement (``context_latent_frames_kept``
in the report says how many each model received) unless it was trained with the frames as channels
(``frame_conditioning.channels``), which reach tokens of any temporal size.

With the empty caption (``caption: empty``) colour and direction can only come from the given frames, so the text-only
baseline is at chance (1/6 colours, 1/4 directions); with the true caption (``caption: true``) text alone already
names both, which shows how much the frames add or disturb.

    kinetoscope fit -c configs/quickstart.yaml            # -> runs/quickstart/checkpoints/last.ckpt
    kinetoscope fit -c configs/quickstart_frames.yaml     # -> runs/quickstart_frames/checkpoints/last.ckpt
    OMP_NUM_THREADS=1 python benchmarks/continuation.py   # -> benchmarks/results/continuation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from framework.data.synthetic import SyntheticMovingShapes, render_clip
from framework.generation.frame_conditioning import FrameCondition, token_mask, ungiven_frames, with_given_tokens
from framework.metrics.motion_probe import score_clip
from framework.modules import VideoDiffusion
from framework.core.registry import default_registry
from framework.training.ema import load_averaged_weights

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "continuation.json"


def load_with_average(path: str) -> VideoDiffusion:
    """A checkpoint's model with its EMACallback average loaded (the weights predict generates with)."""
    model = VideoDiffusion.load_from_checkpoint(path, map_location="cpu").eval()
    load_averaged_weights(model, torch.load(path, map_location="cpu", weights_only=True))
    return model


def continue_clips(model: VideoDiffusion, videos: list[torch.Tensor], captions: list[str], context: int,
                   steps: int, given: bool) -> list[torch.Tensor]:
    """Generate each clip with its first ``context`` frames given (or with nothing given)."""
    conditions = None
    if given:
        conditions = []
        for video in videos:
            latent = model.compressor.encode(video[None])[0]  # [c, t, h, w]
            t_context = model.compressor.latent_shape(context, video.shape[2], video.shape[3])[0]
            mask = torch.zeros(latent.shape[1], dtype=torch.bool)
            mask[:t_context] = True
            conditions.append(FrameCondition(latent, mask))
    sizes = [tuple(v.shape[1:]) for v in videos]
    return model.generate(captions, sizes, list(range(len(videos))), steps=steps, frame_conditions=conditions)


def context_frames_kept(model: VideoDiffusion, video: torch.Tensor, context: int) -> int:
    """How many of the ``context`` given frames the model actually receives (as latent frames): a token is given
    only when every frame it covers is, so e.g. an 8-frame-tube model keeps none of a 4-frame context."""
    latent = model.compressor.encode(video[None])[0]  # [c, t, h, w]
    t_context = model.compressor.latent_shape(context, video.shape[2], video.shape[3])[0]
    mask = torch.arange(latent.shape[1]) < t_context
    embedding = model.frame_embedding
    if embedding is not None and embedding.given_channels(model.patcher, [latent], [mask], model.device) is not None:
        return t_context  # given as channels: every frame reaches the model, whole tokens or not
    return t_context - ungiven_frames(model.patcher, [tuple(latent.shape)], [mask])[0]


def context_loss_gain(model: VideoDiffusion, videos: list[torch.Tensor], captions: list[str], context: int,
                      repeats: int = 4) -> dict:
    """The model's own training loss on the frames after the context, with the context given vs not given (same
    timesteps and noise): how much the given frames help it denoise the rest. Tokens that hold both given and
    generated frames (8-frame tubes with ``channels``) stay in the loss, given frames included."""
    pipeline = model.pipeline()  # the weights generation uses (EMA when on)
    denoiser, conditioner, embedding = pipeline.denoiser, pipeline.conditioner, pipeline.frame_embedding
    marker = embedding.marker if embedding is not None else None
    latents = [model.compressor.encode(v[None])[0] for v in videos]  # [c, t, h, w] each
    clean = model.patcher.patchify(latents)
    shapes = [tuple(model.compressor.encode(v[None])[0].shape) for v in videos]
    t_context = model.compressor.latent_shape(context, videos[0].shape[2], videos[0].shape[3])[0]
    masks = [torch.arange(shape[1]) < t_context for shape in shapes]
    given = token_mask(model.patcher, shapes, masks)  # [N]
    channels = (embedding.given_channels(model.patcher, latents, masks, model.device)
                if embedding is not None else None)  # None without channels
    cond = conditioner(captions)
    plain = lambda x, t: denoiser(x, t, cond)  # noqa: E731
    with_context = with_given_tokens(plain, given, clean.tokens, marker, channels)
    losses = {"without_context": 0.0, "with_context": 0.0}
    for seed in range(repeats):
        for key, fn in (("without_context", plain), ("with_context", with_context)):
            generator = torch.Generator().manual_seed(seed)
            losses[key] += model.sampler.training_loss(fn, clean, generator, loss_mask=~given).mean().item() / repeats
    losses = {k: round(v, 4) for k, v in losses.items()}
    losses["relative_change"] = round(losses["with_context"] / losses["without_context"] - 1, 3)
    return losses


def summarise(outputs: list[torch.Tensor], specs, context: int) -> dict:
    scores = [score_clip(out[:, context:], spec) for out, spec in zip(outputs, specs)]
    rate = lambda key: round(sum(s[key] for s in scores) / len(scores), 3)  # noqa: E731
    return {"colour_ok": rate("colour_ok"), "direction_ok": rate("direction_ok"), "both_ok": rate("both_ok")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conditioned", default=str(REPO / "runs/quickstart_frames/checkpoints/last.ckpt"))
    parser.add_argument("--baseline", default=str(REPO / "runs/quickstart/checkpoints/last.ckpt"))
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--context", type=int, default=4,
                        help="given frames; only whole tokens are given (4 = one temporal token of a 4x4x4 patch)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    for path in (args.conditioned, args.baseline):
        if not Path(path).exists():
            raise SystemExit(f"no checkpoint at {path}: see the commands in this script's docstring")
    default_registry()
    torch.set_grad_enabled(False)
    conditioned, baseline = (load_with_average(path) for path in (args.conditioned, args.baseline))
    held_out = SyntheticMovingShapes(num_samples=args.clips, sizes=[(args.frames, 16, 16)], seed=987654)
    specs = [held_out.spec(i) for i in range(args.clips)]
    videos = [render_clip(spec) for spec in specs]  # [3, T, 16, 16] each
    runs = {"conditioned": (conditioned, True), "conditioned_text_only": (conditioned, False),
            "baseline_replacement": (baseline, True), "baseline_text_only": (baseline, False)}
    results: dict[str, dict] = {}
    for caption_mode in ("empty", "true"):
        captions = [""] * len(specs) if caption_mode == "empty" else [spec.caption for spec in specs]
        for name, (model, given) in runs.items():
            start = time.perf_counter()
            outputs = continue_clips(model, videos, captions, args.context, args.steps, given)
            report = summarise(outputs, specs, args.context)
            if given:
                report["context_latent_frames_kept"] = context_frames_kept(model, videos[0], args.context)
                report["denoising_loss_after_context"] = context_loss_gain(model, videos, captions, args.context)
            report["seconds"] = round(time.perf_counter() - start, 1)
            results[f"caption_{caption_mode}/{name}"] = report
            print(f"caption {caption_mode:5s} {name:22s} {json.dumps(report)}", flush=True)
    output = {
        "checkpoints": {"conditioned": args.conditioned, "baseline": args.baseline},
        "clips": args.clips, "frames": args.frames, "context_frames": args.context, "sampling_steps": args.steps,
        "held_out_seed": 987654, "scored": "generated frames only (context frames excluded)",
        "chance": {"colour_ok": round(1 / 6, 3), "direction_ok": 0.25},
        "results": results,
        "note": "CPU, 2 shared cores; timings are noisy",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
