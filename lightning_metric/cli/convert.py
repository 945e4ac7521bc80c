"""``lightning-metric convert-checkpoint``: a checkpoint whose class centres were saved per rank
(``ShardedCentresDDPStrategy``) as one single-file checkpoint, in one process
(:func:`lightning_metric.centre_checkpoint.convert_checkpoint`)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["parser", "run"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-metric convert-checkpoint",
        description=(
            "Write a checkpoint saved per rank (the file plus <file>.centres/) as one file "
            "holding every class centre and its optimizer state. Needs the memory of the "
            "whole centre state in one process; never overwrites --output."
        ),
    )
    p.add_argument("--ckpt_path", required=True, help="the sharded checkpoint's file")
    p.add_argument("--output", required=True, help="the single-file checkpoint to write")
    p.set_defaults(config=None)  # no model config: overrides are not accepted
    return p


def run(args: argparse.Namespace, overrides: list[str]) -> Path:
    from lightning_metric.centre_checkpoint import convert_checkpoint

    out = convert_checkpoint(args.ckpt_path, args.output)
    print(f"lightning-metric convert-checkpoint: wrote {out}")
    return out
