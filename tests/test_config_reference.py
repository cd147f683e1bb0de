"""docs/configuration.md is generated from the plugins' signatures and must match the committed file."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_config_reference.py"


def test_committed_configuration_reference_is_up_to_date() -> None:
    generated = runpy.run_path(str(SCRIPT))["render"]()
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == generated, (
        "docs/configuration.md is out of date with the plugin signatures: run "
        "`python scripts/gen_config_reference.py` and commit the result"
    )


def test_reference_lists_every_builtin_plugin_with_its_arguments() -> None:
    from framework.core.registry import PluginRegistry

    text = (REPO / "docs" / "configuration.md").read_text()
    for info in PluginRegistry().load_entry_points().list():
        if info.provider != "kinetoscope":
            continue
        assert f"### {info.cls.__name__} (entry point `{info.name}`)" in text
        for name, _, _ in info.init_arguments():
            assert f"| `{name}` |" in text
    assert "| `beta_schedule` | BetaSchedule (one of LINEAR, COSINE) | `LINEAR` |" in text
