"""The ``kinetoscope`` command: Lightning's ``fit``/``predict``/... (``framework.cli.lightning_cli``) plus the tool
commands that are not trainer runs (``plugins``, ``scan``, ``evaluate``, ...).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from framework.cli.ablate import ablate_command
from framework.cli.lightning_cli import cli_main
from framework.core.registry import PLUGIN_KINDS, default_registry, format_plugin_table
from framework.data.latent_cache import cache_latents_command
from framework.data.recaption import recaption_command
from framework.data.scan import scan_command
from framework.metrics.evaluation import evaluate_command
from framework.metrics.i3d_weights import fetch_i3d_command


def plugins_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kinetoscope plugins", description="List the installed plugins.")
    parser.add_argument("--kind", choices=list(PLUGIN_KINDS), help="only plugins of this kind")
    args = parser.parse_args(argv)
    registry = default_registry()
    print(format_plugin_table(registry.list(args.kind)))
    for name, error in registry.failed.items():
        print(f"(failed to import plugin {name!r}: {error})", file=sys.stderr)
    return 0


# Tool commands that are not Lightning trainer runs: name -> function(argv) -> exit code. Each lives next to
# the code it drives; add one line here to expose a new one (Lightning's fit/validate/test/predict stay below).
TOOL_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "plugins": plugins_command,
    "scan": scan_command,
    "fetch-i3d": fetch_i3d_command,
    "evaluate": evaluate_command,
    "cache-latents": cache_latents_command,
    "ablate": ablate_command,
    "recaption": recaption_command,
}


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] and words[0] in TOOL_COMMANDS:
        return TOOL_COMMANDS[words[0]](words[1:])
    cli_main(argv)  # None: LightningCLI reads sys.argv itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
