"""A video pipeline's own diffusers flow scheduler (flow-matching Euler, UniPC) as a ``Sampler``.

Why drive the diffusers scheduler object instead of re-implementing it: a pretrained model is sampled well only on
the schedule it was tuned for, and the schedulers carry details a re-implementation would have to chase release by
release (FlowMatchEuler shifts an already shifted ``sigma_min`` and ends at sigma 0; UniPC with flow sigmas rounds
its timesteps to integers and keeps a multistep history with a predictor-corrector). Loading the folder's
``scheduler_config.json`` into the class that wrote it gives, step for step, the pipeline's sigmas, timesteps and
updates -- the library made for the job -- for any flow scheduler diffusers has. (``RectifiedFlow`` stays our own
sampler for models we train from scratch: its grid is a plain shifted ``linspace(1, 0)``.)

Sampling: one scheduler per sample (diffusers schedulers hold per-run state: step index, UniPC's history), all fed
by one denoiser call per step on the whole pack; the denoiser gets ``t = timestep / num_train_timesteps`` in
[0, 1] (``DiffusersVideoTransformer`` multiplies it back). With ``use_dynamic_shifting`` in the config (LTX) each
sample's shift ``mu`` comes from its token count as in ``LTXPipeline`` (``calculate_shift``); ``linear_sigmas``
passes LTXPipeline's ``sigmas = linspace(1, 1 / steps, steps)`` instead of the scheduler's default spacing.

SDEdit (``start_t`` < 1) follows diffusers' video-to-video pipelines: ``start_t`` is the strength, sampling skips
the first ``steps * (1 - strength)`` steps and starts from the clean input noised to that step's sigma
(``x = (1 - sigma) x0 + sigma eps``).

Training (fine-tuning) is ``RectifiedFlow``'s flow-matching loss with the scheduler's shift (``shift`` /
``flow_shift``): the model predicts ``eps - x0`` at ``x_t = (1 - t) x0 + t eps``, as these models were trained.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from framework.core.interfaces import ModelFn, StepCallback
from framework.layers.packing import PackedSequence
from plugins.diffusers_folders import check_class, component_folder, import_diffusers, read_config
from plugins.samplers.rectified_flow import FlowPrediction, RectifiedFlow

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


def calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """LTXPipeline's ``calculate_shift``: mu linear in the sequence length between (base, max)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


class DiffusersFlowScheduler(RectifiedFlow):
    """Samples with a local diffusers ``FlowMatchEulerDiscreteScheduler`` or flow ``UniPCMultistepScheduler``
    (a pipeline's ``scheduler`` folder); trains with the flow-matching velocity loss at the scheduler's shift."""

    def __init__(self, path: Path, subfolder: str | None = "scheduler", linear_sigmas: bool = False,
                 logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        """``path`` is a pipeline folder and ``subfolder`` its scheduler (``null``: ``path`` holds
        ``scheduler_config.json`` itself). ``logit_mean`` / ``logit_std`` set the training timestep distribution."""
        owner = "DiffusersFlowScheduler"
        folder = component_folder(path, subfolder)
        config = read_config(folder, owner, "scheduler_config.json")
        name = check_class(folder, config, FLOW_SCHEDULERS, owner)
        scheduler_class = getattr(import_diffusers(owner), name)
        self_config = scheduler_class.from_config(config).config
        if name == "UniPCMultistepScheduler" and not (self_config.use_flow_sigmas
                                                      and self_config.prediction_type == "flow_prediction"):
            raise ValueError(f"{owner}: {str(folder)!r} holds a UniPCMultistepScheduler without flow sigmas "
                             f"(use_flow_sigmas: {self_config.use_flow_sigmas}, prediction_type: "
                             f"{self_config.prediction_type!r}); only flow-matching schedules are supported")
        shift = float(self_config.flow_shift if name == "UniPCMultistepScheduler" else self_config.shift)
        super().__init__(logit_mean=logit_mean, logit_std=logit_std, shift=shift,
                         prediction=FlowPrediction.VELOCITY)
        self.folder, self.scheduler_config, self.scheduler_class = folder, config, scheduler_class
        self.linear_sigmas = linear_sigmas
        self.num_train_timesteps = int(self_config.num_train_timesteps)

    def make_scheduler(self, steps: int, seq_len: int, device: torch.device):
        """A fresh scheduler with its timesteps set for ``steps`` steps of a sample with ``seq_len`` tokens."""
        if steps < 1:
            raise ValueError(f"DiffusersFlowScheduler: steps must be >= 1, got {steps}")
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        kwargs = {}
        if self.linear_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            c = scheduler.config
            kwargs["mu"] = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                           c.max_shift)
        scheduler.set_timesteps(None if "sigmas" in kwargs else steps, device=device, **kwargs)
        return scheduler

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: PackedSequence,
        steps: int,
        callback: StepCallback | None = None,
        start_t: float = 1.0,
        start: PackedSequence | None = None,
    ) -> PackedSequence:
        if not 0.0 < start_t <= 1.0:
            raise ValueError(f"DiffusersFlowScheduler: start_t (SDEdit strength) must be in (0, 1], got {start_t}")
        device = noise.tokens.device
        # Samples of equal length share their schedule; each still needs its own scheduler (multistep state).
        by_length = {n: self.make_scheduler(steps, n, device) for n in set(noise.seqlens)}
        schedulers = [copy.deepcopy(by_length[n]) for n in noise.seqlens]
        first = 0
        if start_t < 1.0:  # diffusers' strength: skip the first steps * (1 - strength) steps
            first = (steps - int(min(steps * start_t, steps))) * schedulers[0].order
            if first >= len(schedulers[0].timesteps):
                raise ValueError(f"DiffusersFlowScheduler: SDEdit strength {start_t} leaves no step of {steps}")
        for s in schedulers:
            s.set_begin_index(first)
        if start_t < 1.0:
            if start is None:
                raise ValueError(f"DiffusersFlowScheduler: start_t={start_t} < 1 needs the clean ``start`` to noise")
            sigma = torch.stack([s.sigmas[first] for s in schedulers]).to(device, noise.tokens.dtype)  # [B]
            sigma_tok = noise.per_token(sigma)[:, None]  # [N, 1]
            x = noise.with_tokens((1 - sigma_tok) * start.tokens + sigma_tok * noise.tokens)
        else:
            x = noise
        for i in range(first, len(schedulers[0].timesteps)):
            timesteps = torch.stack([s.timesteps[i] for s in schedulers]).to(device)  # [B], model scale
            t = timesteps.float() / self.num_train_timesteps  # [B] in [0, 1]
            velocity = model_fn(x, t).tokens  # [N, D]
            pieces = [s.step(v, ts, xs, return_dict=False)[0]  # each sample's own update, [n_i, D]
                      for s, v, ts, xs in zip(schedulers, x.split(velocity), timesteps, x.split())]
            x = x.with_tokens(torch.cat(pieces).to(x.tokens.dtype))
            if callback is not None:
                callback(i - first, torch.stack([s.sigmas[s.step_index] for s in schedulers]).to(device), x)
        return x
