"""Suite-wide settings.

The tests run tiny models, for which thread start-up and synchronisation cost more than the arithmetic they
parallelise; on a shared 2-core machine one intra-op thread made small convolutions and attention calls several
times faster (measured up to 40x for the VAE tests under load). Benchmarks set their own thread counts.

Timeouts (pytest-timeout): every test gets the default of pyproject.toml (300 s). A test marked ``slow`` starts
several Python processes (DDP/FSDP ranks, a fresh venv, ablation runs, a training run killed and resumed) that each
import torch (~10 s idle, up to a minute on a loaded machine), so it gets ``SLOW_TIMEOUT_S`` unless it carries its
own ``@pytest.mark.timeout``.
"""

import pytest
import torch

torch.set_num_threads(1)

SLOW_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
