import multiprocessing
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Per-test limit for `ddp` tests: above ddp_harness.DEADLINE_S (240 s, itself above the 60 s
# process-group timeout) plus the test's own single-process work, well below the global 600 s.
DDP_TEST_TIMEOUT_S = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ddp") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(DDP_TEST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: a second only adds synchronisation, and
    thrashes when the machine is busy (~10x slower on a shared 2-core machine). Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch) -> None:
    """Example configs write outputs/ relative to the working directory: keep it per test."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _kill_leftover_processes():
    """No process a test started outlives it.

    When pytest-timeout interrupts a test, the ranks of Lightning's ddp_spawn launcher keep
    running (its exception handling does not kill them); they, like run_ranks' ranks and
    DataLoader workers, are multiprocessing children of this process.
    """
    yield
    leftovers = multiprocessing.active_children()
    for proc in leftovers:
        proc.kill()
    for proc in leftovers:
        proc.join(timeout=30)
