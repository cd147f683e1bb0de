"""Run folders: every relative output path of a run lives under ``trainer.default_root_dir``.

Configs name their outputs relative to the run (``dirpath: checkpoints``, ``output_dir: samples``, the logger's
``save_dir: .``) and give the run's folder once, as ``trainer.default_root_dir``; so
``--trainer.default_root_dir=/tmp/try`` moves the checkpoints, the samples and the logs together, and
``--ckpt_path last`` looks for the checkpoint under that root. Absolute paths are kept as given.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from framework.generation.writer import VideoWriter

# (base class, the init argument that names a folder under the run's root). A Logger's ``save_dir`` is its folder.
ROOT_RELATIVE_ARGUMENTS: tuple[tuple[type, str], ...] = (
    (ModelCheckpoint, "dirpath"),
    (VideoWriter, "output_dir"),
    (Logger, "save_dir"),
)


def _class_of(node: Namespace) -> type | None:
    module, _, name = str(node.get("class_path", "")).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # jsonargparse has already resolved class paths; anything else is not ours to move


def resolve_run_paths(trainer: Namespace) -> None:
    """Rewrite, in place, the relative output folders of ``trainer``'s callbacks and loggers (parsed config
    namespaces) to lie under ``trainer.default_root_dir``."""
    root = trainer.get("default_root_dir")
    if not root:
        return  # Lightning's default root is the working directory, which relative paths already resolve against
    nodes = []
    for key in ("callbacks", "logger"):
        value = trainer.get(key)
        nodes += value if isinstance(value, list) else [value]
    for node in nodes:
        if not isinstance(node, Namespace) or not isinstance(node.get("init_args"), Namespace):
            continue
        cls = _class_of(node)
        for base, argument in ROOT_RELATIVE_ARGUMENTS:
            path = node.init_args.get(argument)
            if cls is not None and issubclass(cls, base) and path is not None and not Path(str(path)).is_absolute():
                node.init_args[argument] = str(Path(str(root)) / str(path))


def last_checkpoint_folders(trainer: Trainer) -> list[str]:
    """Where ``--ckpt_path last`` looks: each ModelCheckpoint's folder (its ``dirpath``, else the logger's)."""
    folders = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            folders.append(str(callback.dirpath) if callback.dirpath is not None
                           else "the logger's new version folder (ModelCheckpoint without dirpath)")
    return folders


def last_checkpoints(trainer: Trainer) -> set[str]:
    """The ``last*.ckpt`` files Lightning would choose from for ``ckpt_path="last"``."""
    found: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)  # Lightning's own lookup, so both agree
    return found


def has_prediction_writer(trainer: Trainer) -> bool:
    return any(isinstance(callback, BasePredictionWriter) for callback in trainer.callbacks)
