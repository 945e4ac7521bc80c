"""Where a benchmark keeps its files (shared by the orchestration and the fold process)."""

from __future__ import annotations

from pathlib import Path

PLAN = "benchmark.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
RESULT = "result.json"
EMBEDDINGS = "embeddings.npy"
LABELS = "labels.npy"
IDS = "ids.npy"
LOG = "fold.log"
CHECKPOINT_DIR = "benchmark_checkpoints"
MONITOR = "val/map@r"
# The numbers the report gives (the keys `lightning-metric test` logs as test/<key>).
REPORTED = ("map@r", "r_precision", "precision@1")


def fold_dir(output: Path, name: str, fold: int) -> Path:
    return output / name / f"fold_{fold}"
