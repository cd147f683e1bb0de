"""Callbacks that keep long runs alive and reproducible: exact RNG resume, a per-step loss log, numeric-fault guard.

* ``RNGStateCallback`` saves the torch (CPU and CUDA), NumPy and Python RNG states in every checkpoint and puts them
  back on resume, right before the first resumed batch is fetched: caption dropout (``torch.rand``), the sampler's
  noise and timesteps continue exactly where the killed run left off. (Lightning itself stores no RNG state.)
* ``LossLog`` appends ``{"step", "loss", "ids"}`` per optimizer step to a JSONL file -- the record the exact-resume
  test compares, and a plain-text trail of a run.
* ``NonFiniteGuard`` checks every step's gradients (before the optimizer step) and loss for NaN / Inf and then skips
  the step (the optimizer sees no gradients, so weights and Adam moments stay as they were) or stops the run
  (``NonFiniteAction``), naming the batch's sample ids. Checkpoints cannot carry NaNs over a good file either:
  ``framework.training.checkpointing.SafeCheckpointIO`` refuses to write weights that are not finite.

Together with ``SafeCheckpointIO`` (atomic checkpoints) and ``framework.data.resumable.resumable_loader`` (data
position), a run killed at any moment and resumed with ``--ckpt_path last`` continues bit-exactly on CPU
(``tests/test_reliability_resume.py``). Add them under ``trainer.callbacks`` in YAML.
"""

from __future__ import annotations

import enum
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("kinetoscope.reliability")


# ------------------------------------------------------------------------------------------------- RNG states
def capture_rng_states() -> dict[str, Any]:
    """Every global RNG as tensors / ints / lists, so the state loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(L.Callback):
    """Saves the global RNG states with each checkpoint; restores them when training resumes from one.

    The states are taken when the checkpoint is written (after the step's optimizer update) and set back in
    ``on_train_start``: after Lightning has built the resumed data iterator (which draws from the torch RNG) and
    before the first batch is fetched, the same point in the sequence of random draws as in the uninterrupted run.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            restore_rng_states(self._to_restore)
            self._to_restore = None


# ---------------------------------------------------------------------------------------------------- loss log
class LossLog(L.Callback):
    """Appends one JSON line per training batch: ``{"step": global step after it, "loss": float, "ids": [...]}``.

    Floats are written with Python's shortest round-trip repr, so equal lines mean bit-identical float32 losses.
    A resumed run appends to the same file; readers keep the last line of each step.
    """

    def __init__(self, path: str = "runs/losses.jsonl") -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.is_global_zero:
            return
        ids = list(batch.get("ids", [])) if isinstance(batch, dict) else []
        row = {"step": trainer.global_step, "loss": float(loss.detach().float()), "ids": ids}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_loss_log(path: str | Path) -> dict[int, float]:
    """step -> loss, the last line of each step winning (a resumed run rewrites the steps after its checkpoint)."""
    losses: dict[int, float] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            losses[int(row["step"])] = float(row["loss"])
    return dict(sorted(losses.items()))


# -------------------------------------------------------------------------------------------- numeric faults
class NonFiniteAction(str, enum.Enum):
    SKIP = "skip"  # drop the step's update and go on (the LR schedule and step counter still advance)
    STOP = "stop"  # raise NonFiniteError: the run ends, the last (finite) checkpoint stays the latest


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in a training step's loss or gradients, with the step's sample ids."""


@dataclass
class NonFiniteEvent:
    step: int  # the n-th optimizer step (1-based: ``global_step`` once the step is done)
    what: str  # "loss" or "gradient of <parameter names>"
    ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        ids = ", ".join(map(str, self.ids)) or "(batch has no ids)"
        return f"step {self.step}: non-finite {self.what}; batch sample ids: {ids}"


class NonFiniteGuard(L.Callback):
    """Detects NaN / Inf gradients (before the optimizer step) and losses; skips the step or stops the run.

    A non-finite loss always gives non-finite gradients, so checking gradients before ``optimizer.step`` catches both
    before any weight changes; the loss is checked as well so the report says which it was. On ``SKIP`` every
    gradient is dropped (``zero_grad(set_to_none=True)``: AdamW leaves parameters without gradients and their
    moments untouched); after ``max_consecutive_skips`` skipped steps in a row the run stops anyway, since a model
    that produces only NaNs is not recovering. Every event is logged as a warning naming the sample ids, counted in
    ``train/nonfinite_steps`` and kept in ``events``.
    """

    def __init__(self, action: NonFiniteAction = NonFiniteAction.SKIP, max_consecutive_skips: int = 20) -> None:
        if max_consecutive_skips < 1:
            raise ValueError(f"NonFiniteGuard: max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.action, self.max_consecutive_skips = NonFiniteAction(action), max_consecutive_skips
        self.events: list[NonFiniteEvent] = []
        self.consecutive = 0
        self._ids: list[str] = []
        self._bad_gradients: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._ids = list(batch.get("ids", [])) if isinstance(batch, dict) else []
        self._bad_gradients: list[str] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """Runs after backward and before the update: drop every gradient if any is non-finite."""
        self._bad_gradients = [name for name, p in pl_module.named_parameters()
                               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if self._bad_gradients:
            optimizer.zero_grad(set_to_none=True)  # the update this step becomes a no-op

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Report (and on STOP raise) here, where the loss is known; checkpoint callbacks run after this hook."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad_loss = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all())
        if bad_loss:
            self._handle(trainer, pl_module, "loss")
        elif self._bad_gradients:
            names = self._bad_gradients
            self._handle(trainer, pl_module, f"gradient of {len(names)} parameters "
                                             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        else:
            self.consecutive = 0

    def _handle(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        event = NonFiniteEvent(step=trainer.global_step, what=what, ids=self._ids)
        self.events.append(event)
        self.consecutive += 1
        if self.action is NonFiniteAction.STOP:
            raise NonFiniteError(f"NonFiniteGuard stopped the run: {event.describe()}")
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(f"NonFiniteGuard: {self.consecutive} non-finite steps in a row, stopping; last: "
                                 f"{event.describe()}")
        log.warning("NonFiniteGuard skipped the update of %s", event.describe())
        pl_module.log("train/nonfinite_steps", float(len(self.events)), on_step=True, on_epoch=False,
                      reduce_fx="max", batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"events": [(e.step, e.what, list(e.ids)) for e in self.events], "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [NonFiniteEvent(step, what, list(ids)) for step, what, ids in state_dict["events"]]
        self.consecutive = state_dict["consecutive"]
