"""SafeCheckpointIO: atomic writes survive a SIGKILL at any point, tampered or code-carrying files are refused naming
the file, weights are exported as safetensors, NaN weights never replace a good checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.training.checkpointing import (
    CheckpointIntegrityError,
    NonFiniteCheckpointError,
    SafeCheckpointIO,
    load_checkpoint_safely,
    load_safetensors,
    recorded_digests,
    safetensors_path,
    sha256_of,
    sidecar_of,
)
from framework.cli.lightning_cli import cli_main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "reliability" / "tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Four steps of the tiny config through the CLI (checkpoints at steps 2 and 4, plus last)."""
    root = tmp_path_factory.mktemp("safe_ckpt")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli_main(["fit", "-c", str(TINY), "--trainer.max_steps=4"])
    finally:
        os.chdir(cwd)
    return root / "runs" / "tiny" / "checkpoints"


def test_cli_checkpoints_load_with_plain_weights_only(run_dir: Path) -> None:
    """Everything LightningCLI + VideoDiffusion put in a checkpoint loads without unpickling code."""
    ckpt = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert any(k.startswith("denoiser.") for k in ckpt["callbacks"]["EMACallback"]["average"]), "EMA weights missing"
    assert ckpt["optimizer_states"][0]["state"], "AdamW moments missing"
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 4
    assert ckpt["hyper_parameters"]["denoiser"]["class_path"].endswith("DiT")
    assert "RNGStateCallback" in ckpt["callbacks"]


def test_every_checkpoint_has_a_verified_digest_and_a_safetensors_export(run_dir: Path) -> None:
    for name in ("epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"):
        path = run_dir / name
        assert recorded_digests(path) and len(recorded_digests(path)) == 1  # the transition digest is gone
        ckpt = load_checkpoint_safely(path)
        exported = load_safetensors(safetensors_path(path))
        assert set(exported) == set(ckpt["state_dict"])
        for key, value in ckpt["state_dict"].items():
            assert torch.equal(exported[key], value), key
    # the export is a standard safetensors file (no kinetoscope code needed to read it)
    plain = load_file(run_dir / "last.safetensors")
    assert set(plain) == set(load_checkpoint_safely(run_dir / "last.ckpt")["state_dict"])


def test_changed_bytes_are_refused_naming_the_file(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes((run_dir / "last.ckpt").read_bytes())
    sidecar_of(path).write_text(sidecar_of(run_dir / "last.ckpt").read_text())
    load_checkpoint_safely(path)  # the copy verifies
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {path} was modified or corrupted"):
        load_checkpoint_safely(path)


class _RunsShell:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_a_pickle_that_executes_code_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    # the attacker controls the whole folder, so the digest matches: weights_only is what must stop it
    SafeCheckpointIO(export_safetensors=False).save_checkpoint({"state_dict": {}, "payload": _RunsShell()}, path)
    with pytest.raises(CheckpointIntegrityError, match=rf"checkpoint {path} contains objects .*system"):
        load_checkpoint_safely(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_file_is_refused_as_corrupt(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    path.write_bytes((run_dir / "last.ckpt").read_bytes()[:5000])  # no sidecar: e.g. a file copied half-way
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {path} is corrupt or truncated"):
        load_checkpoint_safely(path)
    with pytest.raises(CheckpointIntegrityError, match="no cut.ckpt.sha256 digest"):
        SafeCheckpointIO(require_digest=True).load_checkpoint(path)


def test_resume_from_a_tampered_checkpoint_fails_naming_it(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "tiny" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("last.ckpt", "last.ckpt.sha256"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    data = bytearray((folder / "last.ckpt").read_bytes())
    data[-3000] ^= 0xFF
    (folder / "last.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="last.ckpt was modified or corrupted"):
        cli_main(["fit", "-c", str(TINY), "--trainer.max_steps=6", "--ckpt_path=last"])


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(NonFiniteCheckpointError, match=r"refusing to write checkpoint .*last.ckpt.*\bw\b"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 3.0])}}, path)
    assert torch.equal(load_checkpoint_safely(path)["state_dict"]["w"], torch.ones(3))
    assert torch.equal(load_safetensors(safetensors_path(path))["w"], torch.ones(3))


# The write protocol SafeCheckpointIO.save_checkpoint uses (framework.training.atomic_files.write_verified), killed at three
# points; the script imports only torch and that module, so it starts in about a second.
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    import framework.training.atomic_files as files
    path, point = sys.argv[1], sys.argv[2]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace = os.replace
    def replace(src, dst):
        if str(dst) == path:  # the checkpoint's own rename, not a sidecar's
            if point == "before-rename":
                die()
            real_replace(src, dst)
            if point == "after-rename":
                die()  # the sidecar still lists the old and the new digest
        else:
            real_replace(src, dst)
    files.os.replace = replace
    def write(f):
        if point == "mid-write":  # part of the new file is on disk when the process dies
            f.write(b"PK" + os.urandom(100_000)); f.flush(); os.fsync(f.fileno()); die()
        torch.save({"state_dict": {"w": torch.full((50_000,), 2.0)}}, f)
    files.write_verified(path, write)
""")


@pytest.mark.parametrize("point", ["mid-write", "before-rename", "after-rename"])
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(point: str, tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((50_000,), 1.0)}}, path)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path), point], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    weights = load_checkpoint_safely(path, require_sidecar=True)["state_dict"]["w"]  # verifies the digest too
    expected = 2.0 if point == "after-rename" else 1.0
    assert torch.equal(weights, torch.full((50_000,), expected))
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((50_000,), 3.0)}}, path)  # the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt", "last.ckpt.sha256", "last.safetensors", "last.safetensors.sha256"])  # no partial file left
    assert recorded_digests(path) == [sha256_of(path)]
