"""`lightning-metric export`: the trained model as ONNX or TorchScript, with the sidecar
that describes its input (:mod:`lightning_metric.export` does the writing and checking)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_metric.batch import split_batch
from lightning_metric.checks import METRICS
from lightning_metric.cli.build import build

__all__ = ["parser", "run"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-metric export",
        description=(
            "Write the trained model (input -> unit-norm embedding) as ONNX (.onnx) or "
            "TorchScript (.pt), with a dynamic batch axis, and <output>.json beside it: "
            "input shape [C, H, W], dtype, the data module's preprocessing record (colour "
            "mode, resize and centre crop, pixel scale, inversion, mean/std: what "
            "lightning_metric.data.preprocess.Preprocessing.from_dict reads back), "
            "embedding_dim and metric. The exported file is checked against the model."
        ),
    )
    p.add_argument("--config", action="append", required=True, help="YAML (repeatable)")
    p.add_argument("--ckpt_path", required=True, help="checkpoint with the trained weights")
    p.add_argument("--output", required=True, help="model.onnx or model.pt")
    p.add_argument("--metric", default="cosine", choices=METRICS)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument(
        "--dim",
        type=int,
        help="export the Matryoshka prefix of this size (first dim coordinates, re-normalised)",
    )
    return p


def run(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Export the checkpoint's model as ``args`` ask; returns the written model file."""
    from lightning_metric.export import describe_input, export, sidecar_path

    model, datamodule = build(args.config, args.ckpt_path, overrides)
    example = _inputs(_sample_batch(datamodule, "predict"))[:2].float()
    cls = type(model)
    out = export(
        model,
        args.output,
        example,
        input_info=describe_input(datamodule, example),
        metric=args.metric,
        opset=args.opset,
        dim=args.dim,
        extra={
            "checkpoint": str(Path(args.ckpt_path).resolve()),
            "model_class_path": f"{cls.__module__}.{cls.__qualname__}",
            "config": [str(Path(c).resolve()) for c in args.config],
        },
    )
    print(f"lightning-metric export: wrote {out} and {sidecar_path(out)}")
    return out


def _sample_batch(datamodule: Any, split: str = "predict") -> Any:
    datamodule.setup(split if split != "val" else "validate")
    loader = getattr(datamodule, f"{split}_dataloader")()
    return next(iter(loader))


def _inputs(batch: Any) -> Tensor:
    return split_batch(batch, "lightning-metric")[0]
