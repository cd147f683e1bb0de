"""Classifier-free guidance (Ho & Salimans, 2022) with guidance rescale and negative prompts, shared by every sampler.

The guided prediction ``uncond + scale * (cond - uncond)`` is linear in the model output, so it applies unchanged
to velocity, noise or clean-data predictions. Both branches run as one packed batch: one denoiser call per step.

* **Negative prompts**: the "unconditional" branch is whatever the sample is steered away from. The empty caption
  (the null condition learned through caption dropout) steers away from nothing in particular; a negative prompt
  ("blurry, static") steers away from it. ``unconditional_branch`` builds that branch per sample, using the null
  condition where a sample has no negative prompt.
* **Guidance rescale** (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023, Sec. 3.4,
  Eq. 15-16): large scales inflate the prediction's magnitude and over-expose samples. The guided prediction is
  rescaled per sample to the standard deviation of the conditional one, then mixed back with weight ``rescale``
  (``phi`` in the paper; 0 = plain guidance, 0.7 recommended there): ``phi * x_cfg * std(cond) / std(x_cfg) +
  (1 - phi) * x_cfg``. Standard deviations are taken over each sample's own tokens and channels, never across the
  packed batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.core.interfaces import Conditioner, Conditioning, Denoiser, ModelFn
from framework.layers.packing import PackedSequence


def guided_model_fn(
    denoiser: Denoiser,
    cond: Conditioning,
    null: Conditioning | None,
    scale: float,
    rescale: float = 0.0,
) -> ModelFn:
    """Bind conditioning (and guidance) to a denoiser: ``(x_t, t[B]) -> prediction``.

    ``null`` is the branch guided away from: the null condition, or ``unconditional_branch(...)`` with negative
    prompts. ``rescale`` in [0, 1] is the guidance-rescale weight (0 = plain classifier-free guidance)."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if null is None or scale == 1.0:
        prepared = denoiser.prepare(cond)  # caption-only work once, not at every step
        # t is usually a row of the sampler's [steps + 1, B] schedule, i.e. a view. TorchDynamo guards a view input
        # on its base's size too, and duck sizing ties that size to any equal one (e.g. 3 latent frames for 2
        # steps), so a compiled denoiser recompiled when the step count changed (measured: 11-15 s on CPU). A copy
        # has no base; the guided branch's torch.cat makes one already.
        return lambda x, t: denoiser(x, t.clone(), prepared)
    if null.batch_size != cond.batch_size:
        raise ValueError(
            f"guidance: the unconditional branch has {null.batch_size} samples, the conditional one {cond.batch_size}"
        )
    both = denoiser.prepare(Conditioning.cat([cond, null]))
    doubled: list[tuple[PackedSequence, PackedSequence]] = []  # (input layout, its two-branch pack), built once

    def model_fn(x: PackedSequence, t: Tensor) -> PackedSequence:
        # samplers step with x.with_tokens(...), which keeps the layout's tensors: same tensors, same layout
        if not doubled or doubled[0][0].positions is not x.positions or doubled[0][0].grid_sizes != x.grid_sizes:
            doubled[:] = [(x, PackedSequence.concat([x, x]))]
        pair = doubled[0][1].with_tokens(torch.cat([x.tokens, x.tokens]))  # [2N, D], keeps the pack's cached views
        out = denoiser(pair, torch.cat([t, t]), both).tokens  # [2N, D]
        conditional, unconditional = out.chunk(2)  # each [N, D]
        guided = unconditional + scale * (conditional - unconditional)  # [N, D]
        if rescale > 0:
            ratio = per_sample_std(x, conditional) / per_sample_std(x, guided).clamp(min=1e-12)  # [B]
            rescaled = guided * x.per_token(ratio)[:, None].to(guided.dtype)  # [N, D]
            guided = rescale * rescaled + (1 - rescale) * guided
        return x.with_tokens(guided)

    return model_fn


def per_sample_std(layout: PackedSequence, values: Tensor) -> Tensor:
    """Standard deviation over each sample's tokens and channels: ``values`` [N, D] laid out as ``layout`` -> [B]."""
    values = values.float()
    mean = layout.per_sample_mean(values.mean(dim=1))  # [B]
    centred = values - layout.per_token(mean)[:, None]  # [N, D]
    return layout.per_sample_mean(centred.pow(2).mean(dim=1)).sqrt()  # [B]


def unconditional_branch(
    conditioner: Conditioner, batch_size: int, negative_prompts: list[str] | None = None
) -> Conditioning:
    """The branch guidance steers away from: per sample its negative prompt, or the null condition where the
    prompt is empty or none is given (the null condition is the conditioner's encoding of the empty caption)."""
    if negative_prompts is None:
        return conditioner.null(batch_size)
    if len(negative_prompts) != batch_size:
        raise ValueError(f"guidance: got {len(negative_prompts)} negative prompts for {batch_size} samples")
    was_training = conditioner.training
    conditioner.eval()  # never drop a negative prompt (caption dropout) while sampling
    try:
        return conditioner(list(negative_prompts))
    finally:
        conditioner.train(was_training)
