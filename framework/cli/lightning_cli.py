"""LightningCLI for ``fit``/``validate``/``test``/``predict``: built through ``cli_main``, which loads the plugin registry
first, so YAML configs can name plugins by class name (``class_path: DiT``) as well as by import path, and an
unknown name fails listing the valid ones.
"""

from __future__ import annotations

import re
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from framework.cli.config_errors import check_config_files, summarize_config_error, without_dumps
from framework.core.registry import PLUGIN_KINDS, default_registry


class KinetoscopeArgumentParser(LightningArgumentParser):
    """Adds the valid plugin names to errors about a ``class_path`` that does not resolve."""

    def error(self, message: str, ex: Exception | None = None):
        hint = explain_unknown_class(without_dumps(message))
        message = summarize_config_error(message)
        super().error(f"{message}\n{hint}" if hint else message, ex)


class KinetoscopeCLI(LightningCLI):
    """The training/inference CLI; build it through ``cli_main``, which loads the plugin registry first."""


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
