"""The training progress bar for step-limited runs (``max_steps`` with ``max_epochs: -1``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class RunProgressBar(RichProgressBar):
    """Lightning's rich bar labels the training bar ``Epoch {e}/{max_epochs - 1}``, which reads ``Epoch 15/-2`` when
    the run is limited by ``max_steps`` instead of epochs; this one names the step limit then."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            description += f"/{trainer.max_epochs - 1}"
        elif trainer.max_steps is not None and trainer.max_steps > 0:
            description += f" (until step {trainer.max_steps})"  # set once per epoch: no count that goes stale
        if len(self.validation_description) > len(description):  # as Lightning: no flicker beside "Validation"
            description = f"{description:{len(self.validation_description)}}"
        return description
