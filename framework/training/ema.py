"""EMACallback: an exponential moving average of a LightningModule's trained weights, kept by a Lightning callback.

``ema = decay * ema + (1 - decay) * weights`` after every ``update_every_n_steps`` optimizer steps (Polyak averaging,
as used for sampling by DDPM, Ho et al. 2020, and DiT, Peebles & Xie 2023, with decay 0.9999). Averaged weights give
cleaner samples than the last step's. The average is a Lightning callback state, so it is written into every
checkpoint and restored bit-exactly on resume (``trainer.fit(ckpt_path=...)``) or before ``validate`` / ``predict``
from a checkpoint; validation and prediction run with the averaged weights swapped in (``evaluate_with_ema``).

It works with any LightningModule and any strategy that keeps full parameters on each rank (single device, DDP):
every replica holds the same weights, so every replica keeps the same average without communication.

This is the project's one EMA. Lightning's own ``EMAWeightAveraging`` (lightning 2.6) was weighed and not taken: it
deep-copies the whole LightningModule into a ``torch.optim.swa_utils.AveragedModel`` (the frozen compressor and
text encoder included), it refuses to shard (its ``setup`` calls ``configure_model`` unsharded and warns that
sharded models are not supported, so it cannot follow FSDP2), it writes the average over the checkpoint's
``state_dict`` and copies it over the trained weights when fit ends. This callback averages the trainable
parameters only, in place, and keeps the trained weights as the checkpoint's model state. Its first update folds
the first step's weights into the initial ones (``ema = initial`` before any step), where ``AveragedModel`` (the
module's former own EMA) copied them; after ``n`` steps the initial weights keep ``decay^n`` of the average
(2e-9 for the quickstart's 0.995 over 4000 steps).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from torch import Tensor


class EMACallback(L.Callback):
    """Exponential moving average of the trainable parameters, saved in and restored from checkpoints."""

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, evaluate_with_ema: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMACallback: decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"EMACallback: update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay, self.update_every_n_steps, self.evaluate_with_ema = decay, update_every_n_steps, evaluate_with_ema
        self.average: dict[str, Tensor] = {}  # parameter name -> averaged value (same dtype and device)
        self.num_updates = 0
        self._swapped_out: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------------------------------------ averaging
    @staticmethod
    def trained_parameters(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self.trained_parameters(pl_module)
        if not self.average:  # a fresh run: start from the initial weights
            self.average = {name: p.detach().clone() for name, p in params.items()}
        self._check_matches(params)
        self.average = {name: value.to(params[name].device) for name, value in self.average.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.update_every_n_steps:
            return
        params = self.trained_parameters(pl_module)
        names = list(self.average)
        with torch.no_grad():
            torch._foreach_lerp_([self.average[n] for n in names], [params[n].detach() for n in names], 1 - self.decay)
        self.num_updates += 1

    def _check_matches(self, params: dict[str, torch.nn.Parameter]) -> None:
        if set(params) != set(self.average):
            missing, extra = sorted(set(params) - set(self.average)), sorted(set(self.average) - set(params))
            raise RuntimeError(
                f"EMACallback: the averaged weights do not match the model's trainable parameters "
                f"(missing from the average: {missing[:5]}, not in the model: {extra[:5]})"
            )
        for name, p in params.items():
            if self.average[name].shape != p.shape:
                raise RuntimeError(
                    f"EMACallback: {name} has shape {tuple(p.shape)} but its average {tuple(self.average[name].shape)}"
                )

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"average": {k: v.detach().cpu() for k, v in self.average.items()}, "num_updates": self.num_updates,
                "decay": self.decay}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written while the average is swapped in (e.g. by ModelCheckpoint at validation end) must
        still hold the trained weights as the model's: resuming continues training, not the average."""
        if self._swapped_out is not None:
            for name, value in self._swapped_out.items():
                checkpoint["state_dict"][name] = value.detach().cpu().clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = {k: v.clone() for k, v in state_dict["average"].items()}
        self.num_updates = state_dict["num_updates"]

    # ------------------------------------------------------------------------------------------- evaluation swap
    @contextmanager
    def averaged_weights(self, pl_module: L.LightningModule):
        """Temporarily load the averaged weights into ``pl_module`` (the trained ones come back on exit)."""
        self._swap_in(pl_module)
        try:
            yield pl_module
        finally:
            self._swap_out(pl_module)

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.average or self._swapped_out is not None:
            return
        params = self.trained_parameters(pl_module)
        self._check_matches(params)
        self._swapped_out = {}
        with torch.no_grad():
            for name, p in params.items():
                self._swapped_out[name] = p.detach().clone()
                p.copy_(self.average[name])

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._swapped_out is None:
            return
        params = self.trained_parameters(pl_module)
        with torch.no_grad():
            for name, value in self._swapped_out.items():
                params[name].copy_(value)
        self._swapped_out = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate_with_ema:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate_with_ema:
            self._swap_in(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)


def ema_weights(trainer: L.Trainer, pl_module: L.LightningModule):
    """A context with the averaged weights of ``trainer``'s ``EMACallback`` (one that evaluates with them) swapped
    into ``pl_module``, or a no-op without one: for generating outside ``predict`` (metric callbacks, ablation
    probes) with the weights ``predict`` would use."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMACallback) and callback.evaluate_with_ema:
            return callback.averaged_weights(pl_module)
    return nullcontext(pl_module)


def load_averaged_weights(pl_module: torch.nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Copy the ``EMACallback`` average stored in a loaded ``checkpoint`` into ``pl_module``'s parameters (for
    scripts that load a checkpoint without a trainer); False when the checkpoint holds none."""
    states = [state for key, state in checkpoint.get("callbacks", {}).items()
              if key.startswith("EMACallback") and state.get("average")]
    if not states:
        return False
    params = dict(pl_module.named_parameters())
    with torch.no_grad():
        for name, value in states[0]["average"].items():
            if name not in params:
                raise RuntimeError(f"EMACallback average holds {name}, which the model does not have")
            params[name].copy_(value)
    return True
