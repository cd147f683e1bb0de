"""Relative links between the docs pages point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# [text](target) or [text](target#anchor); the target is checked, the anchor is not
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_links_of_index_cli_plugin_guide_and_reference_resolve() -> None:
    docs = REPO / "docs"
    for page in [docs / "index.md", docs / "writing-plugins.md", docs / "cli.md", docs / "configuration.md"]:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"
