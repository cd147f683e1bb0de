"""Overlay composition for ``kinetoscope ablate``: a partial config deep-merged onto the base config.

When an overlay changes a node's ``class_path`` (e.g. ``DDIM`` for ``RectifiedFlow``), an overlay that gives
``init_args`` replaces the node's arguments; one that gives only ``class_path`` keeps the base's ``init_args``, and
any key the new class does not accept (or a misspelt key in the overlay) raises ``OverlayError`` naming the overlay
file, the node and the keys: they are never silently passed to the wrong class.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path

import yaml


class OverlayError(ValueError):
    """An overlay does not compose with the base config (unknown class, init_args the class does not accept)."""


def resolve_class(class_path: str) -> type:
    """A class from a full import path or a registered plugin's class name (``DDIM``), as the CLI resolves it."""
    from framework.core.registry import default_registry

    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise OverlayError(f"cannot import class_path {class_path!r}: {err}") from None
    matches = [info.cls for info in default_registry().list() if info.cls.__name__ == class_path]
    if not matches:
        names = sorted(info.cls.__name__ for info in default_registry().list())
        raise OverlayError(f"class_path {class_path!r} is neither an import path nor a plugin; plugins: {', '.join(names)}")
    return matches[0]


def accepted_init_args(cls: type) -> set[str] | None:
    """Names ``cls(...)`` accepts as keywords; None when it takes ``**kwargs`` (anything goes)."""
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def merge_overlay(base: object, overlay: object, source: Path, where: str = "") -> object:
    """Deep-merge ``overlay`` onto ``base`` (a new object; lists and scalars replace). Where the overlay changes a
    node's ``class_path``, its ``init_args`` (if given) replace the base's; ``init_args`` the new class does not
    accept, kept from the base or set by the overlay, raise ``OverlayError``."""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return copy.deepcopy(overlay)
    merged = copy.deepcopy(base)
    new_class = overlay.get("class_path")
    if new_class is not None and new_class != base.get("class_path"):
        cls = resolve_class(new_class)
        accepted = accepted_init_args(cls)
        replaces = "init_args" in overlay  # the overlay spells out the new class's arguments: the base's are dropped
        inherited = {} if replaces else dict(base.get("init_args") or {})
        given = dict(overlay.get("init_args") or {})
        if accepted is not None:
            stale = sorted(k for k in inherited if k not in accepted)
            unknown = sorted(k for k in given if k not in accepted)
            problems = []
            if stale:
                problems.append(f"would keep init_args {stale} of the base's {base.get('class_path')}")
            if unknown:
                problems.append(f"sets init_args {unknown}")
            if problems:
                raise OverlayError(
                    f"overlay {source}: at {where or '<root>'} class_path {new_class} "
                    f"{' and '.join(problems)}, which {cls.__name__} does not accept "
                    f"(it takes: {', '.join(sorted(accepted)) or 'nothing'}); give this node its init_args in the overlay"
                )
        merged["class_path"] = new_class
        merged["init_args"] = {**inherited, **given}
        if not merged["init_args"]:
            del merged["init_args"]
        for key, value in overlay.items():
            if key not in ("class_path", "init_args"):
                merged[key] = merge_overlay(merged.get(key), value, source, f"{where}.{key}".lstrip("."))
        return merged
    for key, value in overlay.items():
        merged[key] = merge_overlay(merged.get(key), value, source, f"{where}.{key}".lstrip("."))
    return merged


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise OverlayError(f"cannot read {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OverlayError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def compose(base: dict, overlays: list[Path]) -> dict:
    """The base config with each overlay merged on in order; every ``init_args`` key checked against its class."""
    config = copy.deepcopy(base)
    for path in overlays:
        config = merge_overlay(config, load_yaml(path), path)
    check_init_args(config, overlays)
    return config


def check_init_args(node: object, overlays: list[Path], where: str = "") -> None:
    """Raise ``OverlayError`` for an ``init_args`` key its ``class_path`` does not accept (a typo in an overlay
    would otherwise only fail once that run's subprocess parses it, after other runs have trained)."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            check_init_args(item, overlays, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("class_path"), str) and isinstance(node.get("init_args"), dict):
        cls = resolve_class(node["class_path"])
        accepted = accepted_init_args(cls)
        unknown = sorted(k for k in node["init_args"] if accepted is not None and k not in accepted)
        if unknown:
            sources = ", ".join(str(p) for p in overlays) or "the base config"
            raise OverlayError(
                f"{where or '<root>'}: init_args {unknown} are not arguments of {node['class_path']} (it takes: "
                f"{', '.join(sorted(accepted or ()))}); composed from the base config and {sources}"
            )
    for key, value in node.items():
        check_init_args(value, overlays, f"{where}.{key}".lstrip("."))
