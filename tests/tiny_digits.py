"""The digits example config as a CLI run of a few steps, and a checkpoint from such a run."""

from __future__ import annotations

from pathlib import Path

from repo_paths import CONFIGS

from lightning_metric.cli import main

DIGITS = str(CONFIGS / "digits_arcface.yaml")


def tiny_args(root: Path, epochs: int = 1) -> list[str]:
    """The digits config as a run of a few steps inside ``root``."""
    return [
        "--config",
        DIGITS,
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def tiny_checkpoint(root: Path, *flags: str) -> Path:
    """A checkpoint after 1 epoch of 2 steps, trained with ``flags``."""
    main(["fit", *tiny_args(root), *flags])
    return root / "checkpoints" / "best.ckpt"


def smoke_args(tmp_path: Path) -> list[str]:
    """Overrides that turn an example config into a seconds-long run inside tmp_path."""
    return [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.enable_progress_bar=false",
    ]


def tiny_index(root: Path, *writer_flags: str) -> tuple[Path, Path]:
    """A tiny digits checkpoint and the index ``lightning-metric predict`` writes with it
    through ``EmbeddingIndexWriter`` into ``root/index``; ``writer_flags`` are its options
    (``"factory=HNSW32"`` becomes ``--trainer.callbacks.factory=HNSW32``)."""
    ckpt = tiny_checkpoint(root)
    out = root / "index"
    main(
        [
            "predict",
            *tiny_args(root),
            "--trainer.precision=32-true",
            "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter",
            f"--trainer.callbacks.output_dir={out}",
            *(f"--trainer.callbacks.{flag}" for flag in writer_flags),
            f"--ckpt_path={ckpt}",
        ]
    )
    return ckpt, out
