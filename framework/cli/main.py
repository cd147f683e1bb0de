"""The ``kinetoscope`` command: Lightning's ``fit``/``predict``/... (``framework.cli.lightning_cli``) plus the tool
commands that are not trainer runs (``plugins``, ``scan``, ``evaluate``, ...).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

from lightning.pytorch import Trainer

from framework.cli.ablate import ablate_command
from framework.cli.lightning_cli import KinetoscopeCLI, cli_main
from framework.core.errors import UsageError
from framework.core.registry import PLUGIN_KINDS, default_registry, format_plugin_table
from framework.data.latent_cache import cache_latents_command
from framework.data.recaption import recaption_command
from framework.data.scan import scan_command
from framework.data.streaming import optimize_command
from framework.metrics.evaluation import evaluate_command
from framework.metrics.i3d_weights import fetch_i3d_command
from framework.modules.video_diffusion import PromptRowsFailed


def plugins_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kinetoscope plugins", description="List the installed plugins.")
    parser.add_argument("--kind", choices=list(PLUGIN_KINDS), help="only plugins of this kind")
    args = parser.parse_args(argv)
    registry = default_registry()
    print(format_plugin_table(registry.list(args.kind)))
    for name, error in registry.failed.items():
        print(f"(failed to import plugin {name!r}: {error})", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class ToolCommand:
    run: Callable[[list[str]], int]  # argv after the command name -> exit code
    summary: str  # one line for `kinetoscope --help`


# Tool commands that are not Lightning trainer runs. Each lives next to the code it drives; add one line here to
# expose a new one (Lightning's fit/validate/test/predict come from KinetoscopeCLI).
TOOL_COMMANDS: dict[str, ToolCommand] = {
    "plugins": ToolCommand(plugins_command, "list the installed plugins and their init arguments"),
    "scan": ToolCommand(scan_command, "write a manifest (CSV/JSONL) of the videos and images in a folder"),
    "fetch-i3d": ToolCommand(fetch_i3d_command, "download and convert the I3D weights FVD needs (once)"),
    "evaluate": ToolCommand(evaluate_command, "FVD, KID and temporal metrics of generated against real videos"),
    "cache-latents": ToolCommand(cache_latents_command, "encode a manifest's videos once with a compressor"),
    "ablate": ToolCommand(ablate_command, "train a base config under overlay files x seeds and report the results"),
    "recaption": ToolCommand(recaption_command, "write captions for a manifest's videos with a captioner"),
    "optimize": ToolCommand(optimize_command, "write a manifest's clips into LitData chunks for streaming"),
}


TRAINER_SUMMARIES = {
    "fit": "train the config's model on its data (--ckpt_path last resumes)",
    "validate": "one pass over the validation data (--ckpt_path: the weights to check)",
    "test": "one pass over the test data (--ckpt_path: the weights to check)",
    "predict": "generate the config's prompts into video files (--ckpt_path last: the trained weights)",
}


def help_text() -> str:
    lines = ["usage: kinetoscope COMMAND [options]   (kinetoscope COMMAND --help: the command's options)", "",
             "Trainer runs of a config (-c CONFIG.yaml; --print_config shows it resolved):"]
    for name in KinetoscopeCLI.subcommands():
        summary = TRAINER_SUMMARIES.get(name) or (getattr(Trainer, name).__doc__ or "").strip().split(". ")[0]
        lines.append(f"  {name:<15}{summary}")
    lines += ["", "Tools:"]
    lines += [f"  {name:<15}{command.summary}" for name, command in TOOL_COMMANDS.items()]
    lines += ["", *textwrap.wrap("Relative output folders (checkpoints, samples, logs) lie under "
                                 "--trainer.default_root_dir. Documentation: docs/cli.md.", 100)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if not words or words[0] in ("-h", "--help"):
        print(help_text())
        return 0 if words else 2
    try:
        if words[0] in TOOL_COMMANDS:
            return TOOL_COMMANDS[words[0]].run(words[1:])
        cli_main(argv)  # None: LightningCLI reads sys.argv itself
    except UsageError as err:  # a request that cannot be done as asked: the message is the whole story
        print(f"kinetoscope {words[0]}: error: {err}", file=sys.stderr)
        return 2
    except PromptRowsFailed as err:  # the good rows are written; the bad ones are named
        print(f"kinetoscope {words[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
