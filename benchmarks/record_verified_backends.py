"""Record which attention kernels passed their equality tests on this device, for ``AttentionBackend.AUTO``.

Reads the JUnit XML of a ``pytest tests/test_cuda.py --junitxml=FILE`` run (``benchmarks/gpu_check.sh`` writes it)
and records a kernel as verified on this device (its name, torch and xformers versions) only when every test that
checks it against per-sample SDPA ran and passed; a skipped, failed or missing test leaves it out. The record goes
to ``verified_backends.json`` (``framework/layers/attention.py`` reads it; an earlier record of the same device and
versions is replaced).

    python benchmarks/record_verified_backends.py --junit test_cuda.xml [--out benchmarks/results/verified_backends.json]
"""

from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.layers.attention import AttentionBackend, record_verified_backends, verified_backends_file  # noqa: E402
from results_store import commit  # noqa: E402

# The tests (tests/test_cuda.py) that must pass for a kernel to count as verified: forward and backward against
# per-sample SDPA on a mixed-length pack.
REQUIRED_TESTS = {
    AttentionBackend.XFORMERS: ["test_xformers_matches_per_sample_sdpa_forward_and_backward_on_a_mixed_pack"],
    AttentionBackend.FLEX: ["test_flex_matches_per_sample_sdpa_forward_and_backward_on_a_mixed_pack"],
}


def passed_tests(junit: Path) -> set[str]:
    """Names of the test cases that ran and passed (no failure, error or skip element)."""
    cases = ET.parse(junit).getroot().iter("testcase")
    return {case.get("name", "") for case in cases
            if not any(child.tag in ("failure", "error", "skipped") for child in case)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, required=True, help="pytest --junitxml output of tests/test_cuda.py")
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    parser.add_argument("--out", type=Path, default=None, help="default: the file AUTO reads")
    args = parser.parse_args()
    if not args.junit.exists():
        parser.error(f"--junit {args.junit}: no such file (run pytest tests/test_cuda.py --junitxml={args.junit})")
    passed = passed_tests(args.junit)
    verified = {backend for backend, tests in REQUIRED_TESTS.items() if all(t in passed for t in tests)}
    evidence = (f"{', '.join(sorted(t for tests in REQUIRED_TESTS.values() for t in tests if t in passed)) or 'none'}"
                f" passed in {args.junit.name}, commit {commit()}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    record = record_verified_backends(verified, args.device, evidence, args.out or verified_backends_file())
    print(f"verified on {record['device_name']} (torch {record['torch']}, xformers {record['xformers']}): "
          f"{record['backends'] or 'none'} -> {args.out or verified_backends_file()}")


if __name__ == "__main__":
    main()
