"""The suite's own guarantees: a hanging test fails by timeout instead of stalling the run, and the order shuffling
that .ci/run asks for is available and reports its seed.

Each check runs pytest in a subprocess on a test file written here, under this repository's pytest settings
(``-c pyproject.toml``), so what is tested is the configuration the suite itself runs with.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HANGING_TESTS = '''
import multiprocessing
import time


def test_sleeps_forever():
    time.sleep(3600)


def test_waits_on_a_queue_nobody_fills():  # how a DataLoader hangs when a worker dies without a word
    multiprocessing.get_context("spawn").Queue().get()


def test_finishes():
    assert True
'''


def run_pytest(tmp_path: Path, *args: str, quiet: bool = True, guard_s: float = 240) -> subprocess.CompletedProcess:
    """pytest on files in ``tmp_path`` with the repository's settings; ``guard_s`` only stops this test hanging."""
    command = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
               "-p", "no:cacheprovider", *(["-q"] if quiet else []), *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=guard_s)


def test_the_suite_has_a_default_per_test_timeout_and_installs_its_plugins():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert 0 < float(project["tool"]["pytest"]["ini_options"]["timeout"]) <= 600
    dev = project["project"]["optional-dependencies"]["dev"]  # what scripts/test.sh installs
    assert {"pytest-timeout", "pytest-random-order"} <= {dep.split(">")[0].split("=")[0] for dep in dev}


def test_a_hanging_test_fails_by_timeout_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_hang.py").write_text(HANGING_TESTS)
    # the configured default, shortened so this check takes seconds (the mechanism is the same at 300 s)
    result = run_pytest(tmp_path, "test_hang.py", "-o", "timeout=2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 failed, 1 passed" in output, output  # both hangs fail, and the test after them still runs
    for name in ("test_sleeps_forever", "test_waits_on_a_queue_nobody_fills"):
        assert f"FAILED test_hang.py::{name} - Failed: Timeout" in output, output


def test_a_timeout_mark_overrides_the_default(tmp_path):
    (tmp_path / "test_marked.py").write_text(
        "import time\nimport pytest\n\n\n@pytest.mark.timeout(1)\ndef test_hangs():\n    time.sleep(3600)\n")
    result = run_pytest(tmp_path, "test_marked.py")  # default 300 s; the mark's 1 s must win
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "1 failed" in output and "Timeout" in output, output


def test_shuffled_order_reports_its_seed_and_reproduces_with_it(tmp_path):
    seed = 20261208
    (tmp_path / "test_order.py").write_text("".join(
        f"def test_{i}():\n    print('RAN {i}')\n\n" for i in range(12)))

    def order(*args: str) -> tuple[list[str], str]:
        result = run_pytest(tmp_path, "test_order.py", "-s", *args, quiet=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return re.findall(r"RAN (\d+)", result.stdout), result.stdout

    first, header = order("--random-order", f"--random-order-seed={seed}")
    again, _ = order("--random-order", f"--random-order-seed={seed}")
    assert f"--random-order-seed={seed}" in header  # in the header, so a failing order can be replayed
    assert first == again and sorted(first, key=int) == [str(i) for i in range(12)]
    plain, _ = order()
    assert plain == [str(i) for i in range(12)]  # without --random-order the file order is kept
    assert first != plain  # 12! orders: a seed giving the identity would be a broken shuffle


@pytest.mark.slow
def test_slow_tests_get_the_longer_timeout(request):
    from tests.conftest import SLOW_TIMEOUT_S

    assert request.node.get_closest_marker("timeout").args == (SLOW_TIMEOUT_S,)
