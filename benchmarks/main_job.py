"""The README main job against the previous release's recipe, as a user runs it.

    python benchmarks/main_job.py              # 1 pair, capped to AVX2, 2 threads
    python benchmarks/main_job.py --pairs 3

Each run is ``lightning-metric fit --config examples/configs/glyphs_arcface.yaml`` in its own
process, capped to AVX2 (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``: how most laptops and cloud CPUs run it), with a CSV logger. The
reference is the same command with the previous recipe's flags (average-pooled neck, cosine
per epoch, whole epochs); runs alternate, so a busy machine slows both alike. Printed per run:
wall seconds, the final val/recall@1 and val/map@r; then the median wall ratio (this recipe /
the previous one).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "glyphs_arcface.yaml"
AVX2 = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
PREVIOUS = [
    "--model.init_args.neck=null",
    "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
    "--model.init_args.lr_scheduler.init_args.T_max=3",
    "--model.init_args.lr_scheduler_interval=epoch",
    "--trainer.limit_train_batches=1.0",
]


def run(name: str, flags: list[str], folder: Path) -> tuple[float, dict[str, float]]:
    root = folder / name
    command = [
        sys.executable, "-m", "lightning_metric.cli", "fit", "--config", str(CONFIG),
        f"--trainer.default_root_dir={root}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.enable_progress_bar=false", *flags,
    ]  # fmt: skip
    env = {**os.environ, **AVX2, "WANDB_MODE": "offline"}
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    last = [r for r in rows if r.get("val/map@r")][-1]
    return wall, {k: float(last[f"val/{k}"]) for k in ("recall@1", "map@r")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1)
    args = parser.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            results = {}
            for name, flags in (("this", []), ("previous", PREVIOUS)):
                wall, metrics = run(f"{name}{pair}", flags, Path(tmp))
                results[name] = wall
                shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                print(f"pair {pair} {name:8s} recipe: {wall:6.1f} s  val {shown}", flush=True)
            ratios.append(results["this"] / results["previous"])
    print(f"median wall ratio this / previous recipe over {len(ratios)} pair(s): "
          f"{statistics.median(ratios):.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
