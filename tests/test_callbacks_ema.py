"""EMACallback: the average follows its formula, survives a checkpoint bit-exactly, and is used for evaluation only."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from framework.training.ema import EMACallback


class Regression(L.LightningModule):
    """A small deterministic model: every run with the same seed takes the same steps."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)  # not trained, so not averaged
        self.val_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_weights.append(self.net[0].weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g)  # one batch per epoch: a checkpoint after any step ends an epoch
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)  # no shuffle: deterministic


def trainer(tmp_path, max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **kwargs,
    )


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def test_average_follows_the_formula_from_the_initial_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = Regression()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ema, recorder = EMACallback(decay=0.6), Recorder()
    trainer(tmp_path, 3, [recorder, ema], enable_checkpointing=False, limit_val_batches=0).fit(model, loader())
    assert set(ema.average) == set(initial) and not any(n.startswith("frozen") for n in ema.average)
    expected = initial
    for step in recorder.weights:
        expected = {n: 0.6 * expected[n] + 0.4 * step[n] for n in expected}
    for name in expected:
        torch.testing.assert_close(ema.average[name], expected[name])
    assert ema.num_updates == 3
    assert not torch.allclose(ema.average["net.0.weight"], model.net[0].weight)  # an average, not the last step


def test_resuming_from_a_checkpoint_restores_the_average_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    straight = EMACallback(decay=0.9)
    trainer(tmp_path / "a", 4, [straight], enable_checkpointing=False, limit_val_batches=0).fit(Regression(), loader())

    torch.manual_seed(0)
    first = EMACallback(decay=0.9)
    run = trainer(tmp_path / "b", 2, [first], enable_checkpointing=False, limit_val_batches=0)
    run.fit(Regression(), loader())
    path = tmp_path / "half.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("EMACallback")]
    for name, value in first.average.items():
        assert torch.equal(state["average"][name], value), name  # written bit-exactly

    resumed = EMACallback(decay=0.9)
    trainer(tmp_path / "b", 4, [resumed], enable_checkpointing=False, limit_val_batches=0).fit(
        Regression(), loader(), ckpt_path=path
    )
    assert resumed.num_updates == straight.num_updates == 4
    for name, value in straight.average.items():
        assert torch.equal(resumed.average[name], value), name


def test_validation_sees_the_average_and_checkpoints_keep_the_trained_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = Regression()
    ema = EMACallback(decay=0.9)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 3, [ema, checkpoint], check_val_every_n_epoch=3, num_sanity_val_steps=0,
            limit_val_batches=1).fit(model, loader(), loader())
    assert torch.equal(model.val_weights[-1], ema.average["net.0.weight"])  # validated with the average
    trained = model.net[0].weight.detach()
    assert not torch.equal(trained, ema.average["net.0.weight"])  # the trained weights came back afterwards
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]["net.0.weight"]
    assert torch.equal(saved, trained)


@pytest.mark.parametrize(("kwargs", "name"), [({"decay": 1.0}, "decay"), ({"decay": -0.1}, "decay"),
                                              ({"update_every_n_steps": 0}, "update_every_n_steps")])
def test_invalid_arguments_fail_naming_them(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        EMACallback(**kwargs)
