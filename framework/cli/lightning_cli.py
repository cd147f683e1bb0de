"""LightningCLI for ``fit``/``validate``/``test``/``predict``: built through ``cli_main``, which loads the plugin registry
first, so YAML configs can name plugins by class name (``class_path: DiT``) as well as by import path, and an
unknown name fails listing the valid ones.

Beyond Lightning's own CLI: relative output folders follow ``trainer.default_root_dir`` (``run_paths``);
``predict``/``validate``/``test`` with ``--ckpt_path last`` fail when there is no checkpoint instead of running
untrained weights (``--allow_untrained=true`` asks for that explicitly); ``predict`` fails up front when nothing
would write its outputs or when a prompt size does not fit the model; a config error is one short message
naming the config file (no usage dump).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from typing import Any

from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer import Trainer

from framework.cli.config_errors import (
    check_config_files,
    config_paths,
    error_summary,
    shorten_dumps,
    summarize_config_error,
    without_dumps,
)
from framework.cli.progress import RunProgressBar
from framework.cli.run_paths import (
    has_prediction_writer,
    last_checkpoint_folders,
    last_checkpoints,
    resolve_run_paths,
)
from framework.core.errors import UsageError
from framework.core.registry import PLUGIN_KINDS, default_registry
from framework.data.prompts import PromptRequest, Prompts, load_prompt_requests
from framework.modules.video_diffusion import VideoDiffusion

log = logging.getLogger(__name__)

# Subcommands that load weights with --ckpt_path (fit's "last" is "resume if there is one", so it may be missing).
CHECKPOINT_READERS = ("validate", "test", "predict")


class KinetoscopeArgumentParser(LightningArgumentParser):
    """Config errors as one short message: the problem first, the valid plugin names for a ``class_path`` that
    does not resolve, the config file(s) it came from, and no usage listing (it is ~50 lines of every trainer
    option, and the actual error used to come last)."""

    config_files: tuple[str, ...] = ()  # the -c files of this command line, set by cli_main

    def error(self, message: str, ex: Exception | None = None):
        summary = error_summary(message)
        hint = explain_unknown_class(summary or without_dumps(message))
        if not self.exit_on_error:  # a nested parser: the caller parses the full text, so keep it
            message = summarize_config_error(message)
            return super().error(f"{message}\n{hint}" if hint else message, ex)
        lines = [summary or shorten_dumps(message)]  # the nested detail only when no summary line was found
        if hint:
            lines.append(hint)
        if summary and (files := blamed_config_files(summary, self.config_files)):
            lines.append(f"(from config file {', '.join(files)})")
        self._logger.error(lines[0])
        parser = getattr(ex, "subcommand_parser", None) or self
        text = "\n".join(lines)
        sys.stderr.write(f"error: {text}\n(all options: {parser.prog.replace(' [options]', '')} --help)\n")
        self.exit(2)


def blamed_config_files(message: str, files: tuple[str, ...]) -> list[str]:
    """The config files that name the class an error complains about."""
    quoted = re.findall(r"(?:class_path '|import path string: )([^'\s,]+)", message)
    names = {name.rsplit(".", 1)[-1] for name in quoted}
    found = []
    for path in files:
        try:
            text = open(path, encoding="utf-8").read()
        except OSError:
            continue
        if any(re.search(rf"\b{re.escape(name)}\b", text) for name in names):
            found.append(path)
    return found


class KinetoscopeCLI(LightningCLI):
    """The training/inference CLI; build it through ``cli_main``, which loads the plugin registry first."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in CHECKPOINT_READERS:
            parser.add_argument(
                "--allow_untrained", type=bool, default=False,
                help="with --ckpt_path last and no checkpoint found: run with the config's initial weights instead of "
                     "failing (a model trained from scratch then samples noise)",
            )
        return parser

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        resolve_run_paths(config.trainer)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        given = config.get("callbacks") or []
        wants_bar = config.get("enable_progress_bar") is not False and not config.get("barebones")
        if _RICH_AVAILABLE and wants_bar and not any(isinstance(c, ProgressBar) for c in [*given, *callbacks]):
            callbacks = [*callbacks, RunProgressBar()]  # what Lightning would add, with a sane epoch label
        return super()._instantiate_trainer(config, callbacks)

    def _check_checkpoint(self) -> None:
        """``--ckpt_path last`` with no checkpoint is an error unless ``--allow_untrained=true``."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is None and not config.get("allow_untrained"):
            log.warning("%s without --ckpt_path: running the weights the config builds (untrained, unless its plugins "
                        "load pretrained weights); --ckpt_path last runs the trained checkpoint", self.subcommand)
        if config.get("ckpt_path") != "last" or last_checkpoints(self.trainer):
            return
        folders = last_checkpoint_folders(self.trainer) or ["nowhere: trainer.callbacks has no ModelCheckpoint"]
        if not config.get("allow_untrained"):
            raise UsageError(
                f"{self.subcommand} --ckpt_path last: no last*.ckpt checkpoint in {', '.join(folders)} "
                f"(trainer.default_root_dir is {self.trainer.default_root_dir!r}). Train first (kinetoscope fit with "
                "the same config and default_root_dir), give a checkpoint file with --ckpt_path PATH, or pass "
                "--allow_untrained=true to run the config's initial weights."
            )
        log.warning("%s: no checkpoint in %s; running the initial weights (--allow_untrained=true)",
                    self.subcommand, ", ".join(folders))
        config["ckpt_path"] = None

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()
        if not has_prediction_writer(self.trainer):
            raise UsageError(
                "predict: no prediction writer in trainer.callbacks, so the generated videos would be thrown away; "
                "add `- class_path: framework.generation.writer.VideoWriter` (init_args: output_dir, formats) to "
                "the config's trainer.callbacks"
            )
        prompts = getattr(self.datamodule, "prompts", None)
        if isinstance(self.model, VideoDiffusion) and isinstance(prompts, Prompts):
            # sizes only: the prompt extension (a rewrite of the captions) runs once, when the rows are generated
            check_prompt_sizes(self.model, load_prompt_requests(dataclasses.replace(prompts, extension=None)))


def check_prompt_sizes(model: VideoDiffusion, requests: list[PromptRequest]) -> None:
    """One paragraph for every prompt size the model cannot generate (before any sampling starts)."""
    by_size: dict[tuple[int, int, int], list[str]] = {}
    for r in requests:
        if r.error is None:
            by_size.setdefault((r.frames, r.height, r.width), []).append(r.source or str(r.index))
    problems = []
    for (frames, height, width), rows in by_size.items():
        try:
            model.patcher.grid_size(model.compressor.latent_shape(frames, height, width))
        except ValueError as err:
            problems.append(f"{frames}x{height}x{width} (frames x height x width; prompt rows {', '.join(rows)}): {err}")
    if problems:
        raise UsageError(
            f"predict: {len(problems)} prompt size(s) do not fit the model's {type(model.compressor).__name__} and "
            f"{type(model.patcher).__name__}, so nothing was generated: {'; '.join(problems)}. Set "
            "data.init_args.prompts.frames/height/width (or the rows' own sizes) to sizes whose latent divides by "
            "the patch size."
        )


def explain_unknown_class(message: str) -> str | None:
    """Add the valid plugin names to jsonargparse's error for a class_path it could not resolve."""
    if "import path" not in message.lower() and "class_path" not in message and "required" not in message:
        return None
    registry = default_registry()
    hints = []
    for kind, base in PLUGIN_KINDS.items():
        if re.search(rf"\b{kind}\b", message) or base.__name__ in message:
            names = [f"{i.cls.__name__} ({i.class_path})" for i in registry.list(kind)]
            hints.append(f"valid {kind} plugins: {', '.join(names)}")
    return "\n".join(hints) or None


def cli_main(args: list[str] | None = None, run: bool = True) -> KinetoscopeCLI:
    words = sys.argv[1:] if args is None else args
    check_config_files(words)  # YAML syntax errors name the file and line
    KinetoscopeArgumentParser.config_files = tuple(str(p) for p in config_paths(words))
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
