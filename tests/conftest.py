import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch) -> None:
    """Example configs write outputs/ relative to the working directory: keep it per test."""
    monkeypatch.chdir(tmp_path)
