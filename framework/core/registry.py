"""Plugin registry: every plugin, built-in or third-party, arrives through the ``kinetoscope.plugins`` entry points.

A distribution registers plugins in its ``pyproject.toml``::

    [project.entry-points."kinetoscope.plugins"]
    my_sampler = "my_package.samplers:MySampler"

The kind (compressor, patcher, ...) follows from the class's base, so one group serves all kinds. Importing a
plugin registers its class with Python, which lets YAML configs name it by class name (``class_path: DiT``) or by
full import path. A plugin whose import fails is reported by name and skipped; the rest still load.
"""

from __future__ import annotations

import enum
import inspect
import re
import typing
import warnings
from dataclasses import dataclass
from importlib import metadata

from framework.core.interfaces import Captioner, Compressor, Conditioner, Denoiser, Patcher, Sampler

ENTRY_POINT_GROUP = "kinetoscope.plugins"
PLUGIN_KINDS: dict[str, type] = {
    "compressor": Compressor,
    "patcher": Patcher,
    "denoiser": Denoiser,
    "conditioner": Conditioner,
    "sampler": Sampler,
    "captioner": Captioner,  # re-captioning tools (kinetoscope recaption), not part of a diffusion model
}


class PluginError(Exception):
    """A plugin could not be registered or found."""


class PluginImportWarning(UserWarning):
    """A plugin's module failed to import; it is left out and the others still load."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    cls: type
    provider: str  # distribution that declared the entry point

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    @property
    def summary(self) -> str:
        """The first full sentence of the plugin's own docstring (not its base class's), however it is wrapped."""
        doc = inspect.cleandoc(self.cls.__dict__.get("__doc__") or "").strip()
        paragraph = " ".join(doc.split("\n\n")[0].split())
        end = re.search(r"[.!?](?=\s+[A-Z(`]|$)", paragraph)  # not "e.g. the" nor a dotted.path
        return paragraph[: end.end()] if end else paragraph

    def init_arguments(self) -> list[tuple[str, str, str]]:
        """(name, type, default) of each ``__init__`` parameter, as written in the signature."""
        rows = []
        for p in list(inspect.signature(self.cls.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            annotation = "" if p.annotation is p.empty else _type_name(p.annotation)
            default = "(required)" if p.default is p.empty else _default_text(p.default)
            rows.append((p.name, annotation, default))
        return rows


def _default_text(default: object) -> str:
    """A default as it is written in a config: an enum by its member name (``CLEAN``), as jsonargparse reads it."""
    return default.name if isinstance(default, enum.Enum) else repr(default)


def _type_name(annotation: object) -> str:
    if isinstance(annotation, str):  # postponed annotations (from __future__ import annotations)
        return annotation
    if isinstance(annotation, type) and not typing.get_args(annotation):  # a plain class, not list[int]
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def kind_of(cls: type) -> str:
    for kind, base in PLUGIN_KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise PluginError(
        f"{cls!r} is not a subclass of any plugin base class ({', '.join(b.__name__ for b in PLUGIN_KINDS.values())})"
    )


class PluginRegistry:
    """Plugins by kind and name, loaded from entry points (or registered directly in tests)."""

    def __init__(self) -> None:
        self._plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in PLUGIN_KINDS}
        self.failed: dict[str, str] = {}  # entry point name -> error message

    def register(self, name: str, cls: type, provider: str = "<direct>") -> PluginInfo:
        kind = kind_of(cls)
        existing = self._plugins[kind].get(name)
        if existing is not None and existing.cls is not cls:
            raise PluginError(
                f"duplicate {kind} plugin name {name!r}: {existing.class_path} (from {existing.provider}) and "
                f"{cls.__module__}.{cls.__qualname__} (from {provider}); rename one of the entry points"
            )
        info = PluginInfo(name, kind, cls, provider)
        self._plugins[kind][name] = info
        return info

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> PluginRegistry:
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
            provider = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            try:
                cls = ep.load()
            except Exception as err:  # any import-time failure of a third-party package must not break the rest
                self.failed[ep.name] = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"kinetoscope plugin {ep.name!r} ({ep.value}, from {provider}) failed to import and is "
                    f"skipped: {type(err).__name__}: {err}",
                    PluginImportWarning,
                    stacklevel=2,
                )
                continue
            self.register(ep.name, cls, provider)
        return self

    def get(self, kind: str, name: str) -> type:
        if kind not in self._plugins:
            raise PluginError(f"unknown plugin kind {kind!r}; valid kinds: {', '.join(PLUGIN_KINDS)}")
        if name not in self._plugins[kind]:
            raise PluginError(f"unknown {kind} plugin {name!r}; valid choices: {', '.join(self.names(kind)) or '(none)'}")
        return self._plugins[kind][name].cls

    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[kind])

    def list(self, kind: str | None = None) -> list[PluginInfo]:
        kinds = [kind] if kind else list(PLUGIN_KINDS)
        return [self._plugins[k][n] for k in kinds for n in sorted(self._plugins[k])]

    def kind_for_base(self, base: type) -> str | None:
        for kind, kind_base in PLUGIN_KINDS.items():
            if base is kind_base:
                return kind
        return None


_default: PluginRegistry | None = None


def default_registry() -> PluginRegistry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None:
        _default = PluginRegistry().load_entry_points()
    return _default


def format_plugin_table(infos: list[PluginInfo]) -> str:
    lines = []
    for info in infos:
        lines.append(f"{info.name}  [{info.kind}]  {info.class_path}  (from {info.provider})")
        if info.summary:
            lines.append(f"    {info.summary}")
        for name, annotation, default in info.init_arguments():
            lines.append(f"    --{name}: {annotation or 'Any'} = {default}")
    return "\n".join(lines)
