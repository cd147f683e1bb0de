"""Loading pretrained diffusers / transformers components from local folders, with errors that name the folder.

Every open-weight adapter (the framewise and video VAEs, the video transformers, the schedulers) reads a local folder
that ``save_pretrained`` wrote -- never the hub. A diffusers folder holds ``config.json`` (``scheduler_config.json``
for a scheduler) whose ``_class_name`` says which class wrote it, and the weights. The checks here run before
diffusers does, so a wrong folder fails with the folder, the class it holds and the classes the plugin takes,
instead of a deep loading error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


def import_diffusers(owner: str):
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"{owner} needs diffusers: pip install 'kinetoscope[diffusers]'") from err
    return diffusers


def component_folder(path: Path | str, subfolder: str | None = None) -> Path:
    """``path`` / ``subfolder`` (a pipeline folder and its component, e.g. ``vae``), or ``path`` itself."""
    folder = Path(path).expanduser()
    return folder / subfolder if subfolder else folder


def read_config(folder: Path, owner: str, config_name: str = "config.json") -> dict:
    """The folder's diffusers config as a dict; raises naming the folder when it is missing or unreadable."""
    config_file = folder / config_name
    if not config_file.is_file():
        raise FileNotFoundError(f"{owner}: {str(folder)!r} is not a diffusers model folder (no {config_name})")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{owner}: {str(config_file)!r} is not valid JSON: {err}") from None


def check_class(folder: Path, config: dict, expected: Iterable[str], owner: str) -> str:
    """The config's ``_class_name``; raises naming the folder, the class found and the classes ``owner`` takes."""
    expected = tuple(expected)
    found = config.get("_class_name")
    if found not in expected:
        raise ValueError(f"{owner}: {str(folder)!r} holds a {found or 'model of unknown class (no _class_name)'}, "
                         f"not one of {', '.join(expected)}")
    return found


def load_pretrained_model(model_class: type, folder: Path, owner: str):
    """``model_class.from_pretrained(folder)`` offline; a missing or unreadable weights file names the folder and the
    files looked for."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{owner}: {str(folder)!r} has a config.json but no weights file (expected one of "
                                f"{', '.join(WEIGHT_FILES)})")
    try:
        return model_class.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{owner}: cannot load a {model_class.__name__} from {str(folder)!r}: {err}") from err


def load_diffusers_model(folder: Path, class_names: Iterable[str], owner: str):
    """(model, class name) for a local diffusers model folder holding one of ``class_names``."""
    diffusers = import_diffusers(owner)
    name = check_class(folder, read_config(folder, owner), class_names, owner)
    return load_pretrained_model(getattr(diffusers, name), folder, owner), name
