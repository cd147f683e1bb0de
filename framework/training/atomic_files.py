"""Crash-safe file writes with SHA-256 sidecars: the storage layer of ``framework.training.checkpointing.SafeCheckpointIO``.

``write_verified`` writes a file through a fsync-ed temporary file in the same folder and ``os.replace`` (atomic on
POSIX within one file system), then fsyncs the folder, so a kill at any instant leaves either the old or the new
file under the name, complete. Each file gets a ``<file>.sha256`` sidecar (``sha256sum`` format); while a file is
replaced the sidecar lists both the old and the new digest, so a kill between the two renames still verifies.
``verify`` refuses a file whose bytes match no listed digest, naming it. The partial temporary file a killed writer
leaves behind is removed by the next write to the same name. Only torch-free standard library code here,
so a process that must write quickly (or a test that kills one) does not import Lightning.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger("kinetoscope.checkpointing")

SIDECAR_SUFFIX = ".sha256"
_CHUNK = 1 << 20


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint (or its safetensors export) was refused: changed bytes, corrupt file, or unsafe pickle."""


# ---------------------------------------------------------------------------------------------- file primitives
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def recorded_digests(path: Path) -> list[str] | None:
    """Digests listed in ``path``'s sidecar; None when there is no sidecar."""
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        return None
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_path(path: Path) -> Path:
    """This process's temporary name for ``path``: beside it (same folder, so ``os.replace`` is atomic), hidden."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``target`` with ``write`` and fsync it, so a later rename never exposes unwritten bytes."""
    with open(target, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a fsync-ed temporary file in the same folder and ``os.replace`` (no partial file ever)."""
    tmp = _temporary_path(path)
    try:
        _write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def _write_sidecar(path: Path, digests: list[str]) -> None:
    text = "".join(f"{d}  {path.name}\n" for d in dict.fromkeys(digests))
    _replace_atomically(sidecar_of(path), lambda f: f.write(text.encode()))


def write_verified(path: str | Path, write: Callable[[IO[bytes]], None]) -> str:
    """Atomically write ``path`` and its ``.sha256`` sidecar; returns the new digest.

    Order: new file to a temporary name (fsync) -> sidecar lists new + old digests -> rename over the old file ->
    sidecar lists only the new digest. Killed at any point, the file under ``path`` matches a listed digest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    tmp = _temporary_path(path)
    try:
        _write_synced(tmp, write)
        digest = sha256_of(tmp)
        _write_sidecar(path, [digest, *(recorded_digests(path) or [])])
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    _write_sidecar(path, [digest])
    return digest


def verify(path: str | Path, require_sidecar: bool = False) -> None:
    """Raise ``CheckpointIntegrityError`` naming ``path`` when its bytes do not match its sidecar's digest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    digests = recorded_digests(path)
    if digests is None:
        if require_sidecar:
            raise CheckpointIntegrityError(f"checkpoint {path}: no {sidecar_of(path).name} digest to verify it with")
        log.warning("checkpoint %s has no %s digest; loading it unverified (still weights_only)", path,
                    sidecar_of(path).name)
        return
    actual = sha256_of(path)
    if actual not in digests:
        raise CheckpointIntegrityError(
            f"checkpoint {path} was modified or corrupted after it was written: its SHA-256 {actual[:16]}... does "
            f"not match {sidecar_of(path).name} ({', '.join(d[:16] + '...' for d in digests)}); refusing to load it"
        )
