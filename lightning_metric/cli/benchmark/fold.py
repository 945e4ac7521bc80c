"""One fold of a benchmark, run as its own process (so that Lightning's DDP launcher can
re-execute it on the other ranks exactly as it does ``fit``):

    python -m lightning_metric.cli.benchmark.fold --output DIR --config_hash H -- <fit arguments>

Trains with the given config arguments (which include ``--data.init_args.num_folds K
--data.init_args.fold i``) and ``default_root_dir = DIR``, keeps the checkpoint with the best
validation ``map@r`` (a ModelCheckpoint of its own beside the config's), then, on rank 0, embeds
the whole test split with that checkpoint in loader order and writes ``DIR/embeddings.npy``,
``DIR/labels.npy`` and ``DIR/result.json`` (last, so its presence means the fold is complete).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_metric.callbacks.recall import RecallAtK
from lightning_metric.cli.benchmark.layout import (
    CHECKPOINT_DIR,
    EMBEDDINGS,
    IDS,
    LABELS,
    MONITOR,
    REPORTED,
    RESULT,
)
from lightning_metric.cli.benchmark.stats import retrieval_scores
from lightning_metric.cli.lightning_cli import main as cli_main
from lightning_metric.provenance import file_sha256
from lightning_metric.retrieval.index.embedding import embed_loader

__all__ = ["run_fold"]


def run_fold(output: Path, config_hash: str, fit_args: Sequence[str]) -> dict[str, Any] | None:
    """Train one fold and write its results (rank 0); returns the result record on rank 0."""
    started = time.perf_counter()
    args = [*fit_args, f"--trainer.default_root_dir={output}"]
    cli = cli_main(args, run=False)
    assert cli is not None
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    if not any(isinstance(c, RecallAtK) for c in callbacks):
        callbacks.insert(0, RecallAtK())
    best = ModelCheckpoint(
        dirpath=str(output / CHECKPOINT_DIR),
        filename="best-map@r",
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    callbacks.append(best)
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    if not best.best_model_path:
        raise RuntimeError(
            f"fold {output}: no checkpoint was saved by {MONITOR} (was validation run? check "
            "limit_val_batches / check_val_every_n_epoch)"
        )
    embed_started = time.perf_counter()
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    model = model.cpu()
    model.load_state_dict(state["state_dict"])
    datamodule.setup("test")
    # In the run's precision (bf16 autocast where the CLI picked it), as `lightning-metric
    # test` on the fold's checkpoint embeds: the fold reports the numbers a user reproduces.
    with trainer.precision_plugin.forward_context():
        embeddings, labels, ids = embed_loader(
            model, datamodule.test_dataloader(), "lightning-metric benchmark"
        )
    emb, lab = embeddings.numpy().astype(np.float32), labels.numpy().astype(np.int64)
    np.save(output / EMBEDDINGS, emb)
    np.save(output / LABELS, lab)
    np.save(output / IDS, ids.numpy().astype(np.int64))
    metrics = retrieval_scores(emb, lab)
    result = {
        "config_hash": config_hash,
        "metrics": metrics,
        "best_val_map@r": float(best.best_model_score) if best.best_model_score is not None else None,
        "checkpoint": {"path": str(Path(best.best_model_path).resolve()),
                       "sha256": file_sha256(best.best_model_path)},
        "test_items": int(len(lab)),
        "fit_seconds": fit_seconds,
        "embed_seconds": time.perf_counter() - embed_started,
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        "command": [sys.executable, "-m", "lightning_metric.cli.benchmark.fold", *sys.argv[1:]],
    }  # fmt: skip
    tmp = output / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output / RESULT)
    shown = "  ".join(f"test/{k}={metrics[k]:.4f}" for k in REPORTED if k in metrics)
    print(f"lightning-metric benchmark: fold {output} done in {fit_seconds:.0f} s: {shown}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_metric.cli.benchmark.fold")
    parser.add_argument("--output", required=True, help="the fold's folder (default_root_dir)")
    parser.add_argument("--config_hash", required=True, help="recorded in result.json")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER, help="-- then the fit arguments")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # The fit arguments are passed to LightningCLI as `args` while sys.argv keeps the fold's
    # own command line, which Lightning's DDP launcher re-executes on the other ranks.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    run_fold(output, args.config_hash, fit_args)


if __name__ == "__main__":  # pragma: no cover
    main()
