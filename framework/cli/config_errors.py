"""One clear line first for every config mistake the ``kinetoscope`` CLI can hit.

jsonargparse reports a bad value inside a plugin's ``init_args`` as a Union mismatch ("Does not validate against any
of the Union subtypes ...") followed by a dump of the whole parsed model config, and a YAML syntax error as coming
from ``<unicode string>``. ``check_config_files`` parses every ``-c/--config`` file first, naming the file, line and
column of a syntax error; ``summarize_config_error`` puts the actual problem (which key, which plugin class, what
was expected) on the first line and shortens the value dumps. Tested in ``tests/test_reliability_config.py``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

_DUMP_LIMIT = 200  # characters kept of a "Given value: ..." line


def config_paths(argv: Sequence[str]) -> list[Path]:
    """The files given with ``-c PATH``, ``--config PATH`` or ``--config=PATH``."""
    paths = []
    for i, word in enumerate(argv):
        if word in ("-c", "--config") and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif word.startswith("--config="):
            paths.append(Path(word.split("=", 1)[1]))
    return paths


def yaml_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable config file, or None."""
    if not path.is_file():
        return None  # jsonargparse reports missing files itself
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"config {path}: not UTF-8 text ({err.reason} at byte {err.start})"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return f"config {path}: not valid YAML{where}: {problem}"
    if data is not None and not isinstance(data, dict):
        return f"config {path}: expected a mapping of keys (trainer:, model:, data:, ...), got a {type(data).__name__}"
    return None


def check_config_files(argv: Sequence[str]) -> None:
    """Exit with status 2 and one line naming the file when a ``-c`` config is not valid YAML."""
    for path in config_paths(argv):
        if problem := yaml_problem(path):
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)


def shorten_dumps(message: str) -> str:
    lines = []
    for line in message.splitlines():
        if line.lstrip().startswith("Given value:") and len(line) > _DUMP_LIMIT:
            line = line[:_DUMP_LIMIT] + " ..."
        lines.append(line)
    return "\n".join(lines)


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "Expected a <class 'NoneType'>")


def _innermost_problem(message: str) -> tuple[str, str | None, str] | None:
    """(dotted key, plugin class or None, what is wrong) along the first chain of nested errors."""
    keys: list[str] = []
    cls = None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_NOISE) or re.match(r"valid \w+ plugins:", line):
            continue
        if key := re.fullmatch(r'Parser key "([^"]+)":', line):
            keys.append(key.group(1))
        elif found := re.fullmatch(r"Problem with given class_path '([^']+)':", line):
            cls = found.group(1)
        else:
            return (".init_args.".join(keys), cls, line) if keys or cls else None
    return None


def error_summary(message: str) -> str | None:
    """The one line that says which key (and plugin class) is wrong and how, or None when none can be found."""
    outer = re.match(r'\s*Parser key "([^"]+)"', message)
    missing_class = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*((?:module '[^']+' has no attribute|"
                              r"No module named)[^\n]*)", message)
    if missing_class:  # checked first: unions of several base classes list an unhelpful mismatch per base
        cls, detail = missing_class.groups()
        return f"{outer.group(1) if outer else 'config'}: class_path '{cls}' cannot be imported ({detail.strip()})"
    if problem := _innermost_problem(message):
        key, cls, detail = problem
        given = re.search(r"^\s*Given value: (.*)$", message, flags=re.MULTILINE)  # the innermost comes first
        if "Got value" not in detail and given and len(given.group(1)) <= 80 and not given.group(1).startswith("{"):
            detail = f"{detail}. Got value: {given.group(1)}"
        return f"{key or cls}{f' ({cls})' if cls and key else ''}: {detail}"
    return None


def summarize_config_error(message: str) -> str:
    """``message`` with a one-line summary first (when one can be found) and long value dumps cut short."""
    summary = error_summary(message)
    shortened = shorten_dumps(message)
    return f"{summary}\n{shortened}" if summary else shortened


def without_dumps(message: str) -> str:
    """``message`` minus its "Given value:" lines (they mention every plugin kind, which misleads the hints)."""
    return "\n".join(line for line in message.splitlines() if not line.lstrip().startswith("Given value:"))
