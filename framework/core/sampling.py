"""SteppedSampler: a sampler base that owns the sampling loop; each sampler supplies its update step.

As in k-diffusion, where every solver is its own loop around a model call, the loops of our samplers were the same
but for the update; here the loop lives once::

    run = sampler.begin(noise, steps)          # the time grid, start point, generator: one run's state
    for k in range(run.num_steps):
        t_next = sampler.step(model_fn, run, k)  # advance run.x by one step (the sampler's own update)
        callback(k, t_next, run.x)

``begin`` returns a ``SamplingRun`` (or a subclass holding what the sampler carries between steps, e.g. the time
grid or a multistep solver's previous estimate); ``step`` reads and updates it. A third-party sampler subclasses a
built-in one and overrides ``step`` only (``examples/kinetoscope-plugin-example``).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from framework.core.interfaces import ModelFn, Sampler, StepCallback
from framework.layers.packing import PackedSequence


@dataclass
class SamplingRun:
    """One ``sample`` call's state: the current tokens and the number of steps the loop takes."""

    x: PackedSequence
    num_steps: int


class SteppedSampler(Sampler):
    """A sampler whose ``sample`` is the shared loop over ``step``; subclasses implement ``begin`` and ``step``."""

    @abstractmethod
    def begin(self, noise: PackedSequence, steps: int) -> SamplingRun:
        """Validate ``steps`` and set up a run starting from ``noise``."""

    @abstractmethod
    def step(self, model_fn: ModelFn, run: SamplingRun, k: int) -> Tensor:
        """Advance ``run.x`` by step ``k`` (calling ``model_fn`` as the update needs); returns the time [B] the
        tokens are at after the step (the framework's convention: 0 = clean, 1 = pure noise)."""

    @torch.no_grad()
    def sample(
        self, model_fn: ModelFn, noise: PackedSequence, steps: int, callback: StepCallback | None = None
    ) -> PackedSequence:
        return self.run_steps(model_fn, self.begin(noise, steps), callback)

    def run_steps(self, model_fn: ModelFn, run: SamplingRun, callback: StepCallback | None = None) -> PackedSequence:
        """The loop: every step of ``run`` in order, ``callback`` after each; returns the final tokens."""
        for k in range(run.num_steps):
            t_next = self.step(model_fn, run, k)
            if callback is not None:
                callback(k, t_next, run.x)
        return run.x
