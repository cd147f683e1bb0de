"""The ``kinetoscope`` command: LightningCLI for ``fit``/``predict``/..., plus ``plugins``.

Every plugin is imported through the registry before parsing, so YAML configs can name plugins by class name
(``class_path: DiT``) as well as by import path, and an unknown name fails listing the valid ones.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from framework.ablate import ablate_command
from framework.captioning import recaption_command
from framework.config_errors import check_config_files, summarize_config_error, without_dumps
from framework.data.latent_cache import cache_latents_command
from framework.data.scan import scan_command
from framework.metrics.evaluation import evaluate_command
from framework.metrics.i3d_weights import fetch_i3d_command
from framework.registry import PLUGIN_KINDS, default_registry, format_plugin_table


class KinetoscopeArgumentParser(LightningArgumentParser):
    """Adds the valid plugin names to errors about a ``class_path`` that does not resolve."""

    def error(self, message: str, ex: Exception | None = None):
        hint = explain_unknown_class(without_dumps(message))
        message = summarize_config_error(message)
        super().error(f"{message}\n{hint}" if hint else message, ex)


class KinetoscopeCLI(LightningCLI):
    """The training/inference CLI; build it through ``cli_main``, which loads the plugin registry first."""


def plugins_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kinetoscope plugins", description="List the installed plugins.")
    parser.add_argument("--kind", choices=list(PLUGIN_KINDS), help="only plugins of this kind")
    args = parser.parse_args(argv)
    registry = default_registry()
    print(format_plugin_table(registry.list(args.kind)))
    for name, error in registry.failed.items():
        print(f"(failed to import plugin {name!r}: {error})", file=sys.stderr)
    return 0


def explain_unknown_class(message: str) -> str | None:
    """Add the valid plugin names to jsonargparse's error for a class_path it could not resolve."""
    if "import path" not in message.lower() and "class_path" not in message:
        return None
    registry = default_registry()
    hints = []
    for kind, base in PLUGIN_KINDS.items():
        if re.search(rf"\b{kind}\b", message) or base.__name__ in message:
            names = [f"{i.cls.__name__} ({i.class_path})" for i in registry.list(kind)]
            hints.append(f"valid {kind} plugins: {', '.join(names)}")
    return "\n".join(hints) or None


def cli_main(args: list[str] | None = None, run: bool = True) -> KinetoscopeCLI:
    check_config_files(sys.argv[1:] if args is None else args)  # YAML syntax errors name the file and line
    default_registry()  # import every installed plugin so class names resolve
    return KinetoscopeCLI(
        args=args,
        run=run,
        parser_class=KinetoscopeArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


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
