"""SafeCheckpointIO: crash-safe checkpoint writes, verified loads that never execute pickled code, safetensors export.

Training runs last days; a kill (OOM killer, pre-emption, power loss) must never cost more than the steps since the
last checkpoint. Three guarantees, each tested in ``tests/test_reliability_checkpoints.py``:

* **Atomic writes.** A checkpoint is written to a temporary file in the same folder, flushed and ``fsync``-ed, then
  moved over the old one with ``os.replace`` (atomic on POSIX within a file system) and the folder is ``fsync``-ed.
  A kill at any instant leaves either the old or the new file, complete -- never a half-written one under the name.
* **Integrity.** Each file gets a ``<file>.sha256`` sidecar (``sha256sum`` format). While a file is replaced the
  sidecar lists both the old and the new digest, so a kill between the two renames still verifies. A file whose
  bytes no longer match is refused, naming the file; torch's zip reader alone does not notice changed tensor bytes.
* **Never NaN over good.** Weights holding NaN / Inf are refused (``NonFiniteCheckpointError``) before anything is
  written, so the last good checkpoint stays under its name.
* **No code on load.** Loading always uses ``torch.load(weights_only=True)``: a pickle that names a code-executing
  global (``os.system``, ``builtins.eval``, a custom class) is refused, naming the file and the global. The
  checkpoints VideoDiffusion writes under LightningCLI (weights, EMA ``AveragedModel`` state, optimizer and
  LR-scheduler states, the CLI's hyperparameters as plain dicts, loop and callback states) hold only tensors,
  containers and primitives, so no type needs ``torch.serialization.add_safe_globals`` (checked by a test that
  loads one with plain ``torch.load(weights_only=True)``).

Beside every checkpoint ``<name>.ckpt`` the model weights (``checkpoint["state_dict"]``) are also exported as
``<name>.safetensors`` (Hugging Face safetensors: a JSON header plus raw tensor bytes, nothing executable), for
inference and for tools that should never unpickle anything.

Use it through the trainer's ``plugins`` (YAML)::

    trainer:
      plugins:
        - class_path: framework.training.checkpointing.SafeCheckpointIO
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file, save

from framework.training.atomic_files import (  # noqa: F401  (re-exported: the checkpoint API in one import)
    CheckpointIntegrityError,
    recorded_digests,
    sha256_of,
    sidecar_of,
    verify,
    write_verified,
)

SAFETENSORS_SUFFIX = ".safetensors"


class NonFiniteCheckpointError(FloatingPointError):
    """Weights with NaN / Inf were about to be written over a checkpoint."""


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state_dict`` that hold a NaN or Inf."""
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


# ------------------------------------------------------------------------------------------------- public API
def load_checkpoint_safely(path: str | Path, map_location: Any = None, require_sidecar: bool = False) -> dict:
    """Verify ``path`` against its digest, then ``torch.load(weights_only=True)``; every failure names the file."""
    path = Path(path)
    verify(path, require_sidecar)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(unsupported|Unsupported) (global: )?GLOBAL [^\n]*|Unsupported operand [^\n]*", str(err))
        raise CheckpointIntegrityError(
            f"checkpoint {path} contains objects that weights_only loading refuses to build (loading it could "
            f"execute code), refusing to load it: {found.group(0) if found else str(err)}"
        ) from err
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointIntegrityError(f"checkpoint {path} is corrupt or truncated: {err}") from err


def safetensors_path(checkpoint_path: str | Path) -> Path:
    return Path(checkpoint_path).with_suffix(SAFETENSORS_SUFFIX)


def export_safetensors(state_dict: dict[str, Any], path: str | Path) -> Path:
    """Write the tensors of ``state_dict`` as safetensors (atomically, with a sidecar digest)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    path = Path(path)

    def write(f: IO[bytes]) -> None:
        f.write(save(tensors, metadata={"format": "pt", "source": "kinetoscope"}))

    write_verified(path, write)
    return path


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Weights exported by ``SafeCheckpointIO``, verified against their digest."""
    path = Path(path)
    verify(path)
    try:
        return load_file(path, device=device)
    except Exception as err:  # safetensors raises its own SafetensorError for malformed headers
        raise CheckpointIntegrityError(f"safetensors file {path} is corrupt: {err}") from err


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic fsync-ed writes with SHA-256 sidecars, ``weights_only`` verified loads, and a
    ``.safetensors`` export of the weights beside every checkpoint (see the module docstring)."""

    def __init__(self, export_safetensors: bool = True, require_digest: bool = False,
                 refuse_non_finite: bool = True) -> None:
        """``require_digest`` refuses checkpoints without a ``.sha256`` sidecar (e.g. written by plain Lightning);
        ``refuse_non_finite`` raises ``NonFiniteCheckpointError`` instead of writing weights with NaN / Inf."""
        super().__init__()
        self.export_safetensors, self.require_digest = export_safetensors, require_digest
        self.refuse_non_finite = refuse_non_finite

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        if self.refuse_non_finite and (bad := non_finite_tensors(checkpoint.get("state_dict", {}))):
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {path}: weights hold NaN/Inf in {len(bad)} tensors "
                f"({', '.join(bad[:5])}); the previous checkpoint under this name (if any) is kept"
            )
        write_verified(path, lambda f: torch.save(checkpoint, f))
        if self.export_safetensors and isinstance(checkpoint.get("state_dict"), dict):
            export_safetensors(checkpoint["state_dict"], safetensors_path(path))

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Always ``weights_only=True`` (the ``weights_only`` argument is ignored: this plugin never unpickles code)."""
        return load_checkpoint_safely(path, map_location, self.require_digest)

    def remove_checkpoint(self, path: _PATH) -> None:
        path = Path(path)
        for file in (path, sidecar_of(path), safetensors_path(path), sidecar_of(safetensors_path(path))):
            file.unlink(missing_ok=True)
