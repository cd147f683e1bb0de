"""Plugin discovery through the ``kinetoscope.plugins`` entry points, including separately installed distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from framework.core.interfaces import Compressor, Conditioner, Denoiser, Patcher, Sampler
from framework.core.registry import (
    ENTRY_POINT_GROUP,
    PLUGIN_KINDS,
    PluginError,
    PluginImportWarning,
    PluginRegistry,
    format_plugin_table,
)

BUILTINS = {
    "pixel": ("compressor", Compressor),
    "spacetime": ("patcher", Patcher),
    "dit": ("denoiser", Denoiser),
    "hashed_text": ("conditioner", Conditioner),
    "rectified_flow": ("sampler", Sampler),
}

# A third-party sampler as a user would write it: docstring, typed arguments with and without defaults.
TINY_SAMPLER_SOURCE = '''
from framework.core.interfaces import Sampler


class TinySampler(Sampler):
    """A tiny third-party sampler for the registry tests.

    Only the first docstring line is the summary.
    """

    def __init__(self, scale: float, steps: int = 4, eta: float = 0.5, seed: int | None = None,
                 label: str = "tiny") -> None:
        super().__init__()
        self.scale, self.steps, self.eta, self.seed, self.label = scale, steps, eta, seed, label

    def training_loss(self, model_fn, clean, generator=None):
        raise NotImplementedError

    def sample(self, model_fn, noise, steps, callback=None):
        raise NotImplementedError
'''


@pytest.fixture
def forget_modules():
    """Drop modules imported from tmp dirs so tests never see each other's (or a stale) copy."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def write_distribution(site: Path, dist_name: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write an installed distribution into ``site``: its modules plus a ``.dist-info`` with METADATA and
    entry_points.txt (exactly what pip leaves behind), without running pip."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist_name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


# ------------------------------------------------------------------------------------------------- built-ins
def test_builtin_plugins_come_from_entry_points():
    registry = PluginRegistry().load_entry_points()
    assert registry.failed == {}
    by_name = {info.name: info for info in registry.list()}
    for name, (kind, base) in BUILTINS.items():
        assert name in by_name, f"built-in plugin {name!r} not found; found {sorted(by_name)}"
        info = by_name[name]
        assert info.kind == kind
        assert info.provider == "kinetoscope"
        assert issubclass(info.cls, base)
        assert registry.get(kind, name) is info.cls
        assert name in registry.names(kind)
    assert [i.kind for i in registry.list("sampler")] == ["sampler"] * len(registry.list("sampler"))


# -------------------------------------------------------------------------------- a separately installed package
@pytest.fixture(scope="module")
def tinyplug_site(tmp_path_factory) -> Path:
    """``pip install --target`` a tiny distribution that declares a sampler entry point (offline, ~1 s)."""
    root = tmp_path_factory.mktemp("tinyplug")
    pkg = root / "src"
    (pkg / "tinyplug").mkdir(parents=True)
    (pkg / "tinyplug" / "__init__.py").write_text(TINY_SAMPLER_SOURCE)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "tinyplug"
            version = "0.1"

            [project.entry-points."kinetoscope.plugins"]
            tiny = "tinyplug:TinySampler"

            [tool.setuptools]
            packages = ["tinyplug"]
            """
        )
    )
    target = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(pkg)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    assert (target / "tinyplug-0.1.dist-info" / "entry_points.txt").exists()
    return target


def test_separately_installed_plugin_is_listed(tinyplug_site, monkeypatch, forget_modules):
    forget_modules.append("tinyplug")
    monkeypatch.syspath_prepend(str(tinyplug_site))
    registry = PluginRegistry().load_entry_points()

    assert registry.failed == {}
    assert "tiny" in registry.names("sampler")
    [info] = [i for i in registry.list("sampler") if i.name == "tiny"]
    assert info.provider == "tinyplug"
    assert info.class_path == "tinyplug.TinySampler"
    assert registry.get("sampler", "tiny").__name__ == "TinySampler"
    # the built-ins are still there next to it
    assert "rectified_flow" in registry.names("sampler")

    table = format_plugin_table([info])
    assert "tiny  [sampler]  tinyplug.TinySampler  (from tinyplug)" in table
    assert "A tiny third-party sampler for the registry tests." in table
    assert "Only the first docstring line" not in table
    for line in (
        "--scale: float = (required)",
        "--steps: int = 4",
        "--eta: float = 0.5",
        "--seed: int | None = None",
        "--label: str = 'tiny'",
    ):
        assert line in table, f"{line!r} missing from:\n{table}"


def test_cli_lists_separately_installed_plugin(tinyplug_site):
    script = Path(sys.executable).parent / "kinetoscope"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "framework.cli.main"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tinyplug_site), env.get("PYTHONPATH")]))
    result = subprocess.run(
        command + ["plugins", "--kind", "sampler"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tiny  [sampler]  tinyplug.TinySampler  (from tinyplug)" in out
    assert "--steps: int = 4" in out
    assert "rectified_flow  [sampler]" in out
    assert "[denoiser]" not in out  # --kind filters


# ---------------------------------------------------------------------------------------------------- conflicts
def test_duplicate_names_from_two_distributions(tmp_path, monkeypatch, forget_modules):
    body = '''
    from framework.core.interfaces import Sampler

    class {cls}(Sampler):
        """Duplicate-name test sampler."""
        def training_loss(self, model_fn, clean, generator=None): ...
        def sample(self, model_fn, noise, steps, callback=None): ...
    '''
    write_distribution(tmp_path, "dupalpha", {"dupalpha_mod": body.format(cls="AlphaSampler")},
                       {"samename": "dupalpha_mod:AlphaSampler"})
    write_distribution(tmp_path, "dupbeta", {"dupbeta_mod": body.format(cls="BetaSampler")},
                       {"samename": "dupbeta_mod:BetaSampler"})
    forget_modules.extend(["dupalpha_mod", "dupbeta_mod"])
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(PluginError) as excinfo:
        PluginRegistry().load_entry_points()
    message = str(excinfo.value)
    for fragment in ("samename", "dupalpha_mod.AlphaSampler", "dupbeta_mod.BetaSampler", "dupalpha", "dupbeta"):
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_duplicate_direct_registration_names_both_classes():
    from plugins.samplers.rectified_flow import RectifiedFlow

    class OtherFlow(RectifiedFlow):
        """Another sampler."""

    registry = PluginRegistry()
    registry.register("flow", RectifiedFlow, provider="first")
    registry.register("flow", RectifiedFlow, provider="first")  # same class again is not a conflict
    with pytest.raises(PluginError, match=r"(?s)RectifiedFlow.*first.*OtherFlow.*second"):
        registry.register("flow", OtherFlow, provider="second")
    assert registry.get("sampler", "flow") is RectifiedFlow


def test_failing_import_is_reported_and_others_load(tmp_path, monkeypatch, forget_modules):
    write_distribution(
        tmp_path, "brokenplug",
        {"brokenplug_mod": 'raise RuntimeError("boom: missing CUDA toolkit")\n'},
        {"broken": "brokenplug_mod:BrokenSampler"},
    )
    forget_modules.append("brokenplug_mod")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.warns(PluginImportWarning) as record:
        registry = PluginRegistry().load_entry_points()
    messages = [str(w.message) for w in record if issubclass(w.category, PluginImportWarning)]
    assert len(messages) == 1
    assert "'broken'" in messages[0] and "brokenplug" in messages[0] and "boom: missing CUDA toolkit" in messages[0]
    assert set(registry.failed) == {"broken"}
    assert "RuntimeError" in registry.failed["broken"] and "boom" in registry.failed["broken"]
    for name, (kind, _) in BUILTINS.items():
        assert name in registry.names(kind)
    assert "broken" not in registry.names("sampler")


# ------------------------------------------------------------------------------------------------------ lookups
def test_unknown_name_lists_valid_choices():
    registry = PluginRegistry().load_entry_points()
    with pytest.raises(PluginError, match="nope") as excinfo:
        registry.get("denoiser", "nope")
    assert "dit" in str(excinfo.value)
    assert "valid choices" in str(excinfo.value)


def test_unknown_kind_lists_kinds():
    registry = PluginRegistry()
    with pytest.raises(PluginError) as excinfo:
        registry.get("scheduler", "dit")
    message = str(excinfo.value)
    assert "scheduler" in message
    for kind in PLUGIN_KINDS:
        assert kind in message


@pytest.mark.parametrize("not_a_plugin", [dict, 42, "plugins.denoisers.dit:DiT"])
def test_registering_a_non_plugin_raises(not_a_plugin):
    registry = PluginRegistry()
    with pytest.raises(PluginError, match="not a subclass of any plugin base class"):
        registry.register("bad", not_a_plugin)
    assert all(registry.names(kind) == [] for kind in PLUGIN_KINDS)


# Evaluated annotations (no ``from __future__ import annotations`` in the plugin's module), as many third-party
# plugins are written. This test module postpones its own annotations, so the class is built from source.
GENERIC_ANNOTATIONS_SOURCE = '''
from typing import Literal, Optional
from framework.core.interfaces import Sampler


class GenericSampler(Sampler):
    """Sampler with parameterised argument types."""

    def __init__(self, sizes: list[int] = [1, 2], limit: Optional[float] = None,
                 mode: Literal["euler", "heun"] = "euler", plain: int = 3) -> None:
        super().__init__()

    def training_loss(self, model_fn, clean, generator=None): ...
    def sample(self, model_fn, noise, steps, callback=None): ...
'''


def test_table_keeps_type_parameters_of_evaluated_annotations():
    namespace: dict = {"__name__": "generic_sampler_mod"}
    exec(compile(GENERIC_ANNOTATIONS_SOURCE, "generic_sampler_mod.py", "exec", dont_inherit=True), namespace)
    info = PluginRegistry().register("generic", namespace["GenericSampler"], provider="test")
    table = format_plugin_table([info])
    assert "--plain: int = 3" in table  # plain classes already work
    assert "--sizes: list[int] = [1, 2]" in table, table
    assert "--limit: Optional[float] = None" in table, table
    assert "--mode: Literal['euler', 'heun'] = 'euler'" in table, table
