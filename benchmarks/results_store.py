"""One place that writes a benchmark's result: a new JSON file per run, never overwriting an earlier one.

``save_result("quickstart_learning", payload)`` writes
``benchmarks/results/quickstart_learning/<UTC time>-<commit>.json`` with the machine, commit, command line and the
system load at the end of the run added, and returns the path. Every earlier run stays beside it, so a figure in the
README names the runs it rests on and their spread can be recomputed (``load_results``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def commit() -> str:
    """The short commit of the working tree, with ``-dirty`` when it has uncommitted changes to tracked files."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    short = git("rev-parse", "--short", "HEAD") or "unknown"
    return short + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    import torch  # the benchmarks import it anyway; deferred so this module loads without it

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def save_result(name: str, payload: dict, results_dir: Path = RESULTS, path: Path | None = None) -> Path:
    """Write ``payload`` (plus machine, commit and command) as a new file under ``results_dir/name/``, or to
    ``path`` when one is given (a script's ``--out``: that file is replaced)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = {"benchmark": name, "commit": commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "utc": stamp, "machine": machine(), **payload}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path
    folder = results_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}-{record['commit']}.json"
    suffix = 1
    while path.exists():  # two runs in the same second: keep both
        path = folder / f"{stamp}-{record['commit']}-{suffix}.json"
        suffix += 1
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_results(name: str, results_dir: Path = RESULTS) -> list[dict]:
    """Every stored run of benchmark ``name``, oldest first."""
    return [json.loads(p.read_text()) for p in sorted((results_dir / name).glob("*.json"))]
