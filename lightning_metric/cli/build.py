"""The model (weights from a checkpoint) and data module of ``fit``'s YAML, built for the
argparse commands exactly as ``fit`` builds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_metric.cli.lightning_cli import main

__all__ = ["build"]


def build(configs: list[str], ckpt_path: str, overrides: list[str]) -> tuple[nn.Module, Any]:
    """The model (weights from ``ckpt_path``) and data module of ``configs``."""
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    argv: list[str] = []
    for config in configs:
        argv += ["--config", config]
    cli = main([*argv, *overrides, "--trainer.logger=false"], run=False)
    assert cli is not None
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "state_dict" in state:
        # As Lightning's load_from_checkpoint: the module checks and adapts the checkpoint
        # first (class centres saved per rank are not read for inference).
        cli.model.on_load_checkpoint(state)
    cli.model.load_state_dict(state.get("state_dict", state))
    return cli.model.eval(), cli.datamodule
