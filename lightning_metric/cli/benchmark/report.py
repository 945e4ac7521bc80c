"""The benchmark's report: ``results.json`` (every number, the commands, the machine),
``results.md`` (one row per config), ``results.png`` (separate MAP@R with its interval, the
concatenated MAP@R as a marker), the table printed, and everything logged to the logger the
configs configure."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_metric.cli.benchmark.layout import REPORTED, RESULTS_JSON, RESULTS_MD, RESULTS_PNG

__all__ = ["machine", "markdown_table", "write_report"]

_TITLES = {"map@r": "MAP@R", "r_precision": "R-precision", "precision@1": "P@1"}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def markdown_table(results: dict[str, Any], num_folds: int) -> str:
    head = ["config"]
    head += [f"{_TITLES[k]} (separate)" for k in REPORTED]
    head += [f"{_TITLES[k]} (concat.)" for k in REPORTED]
    head += ["time (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name]
        cells += [f"{r['separate'][k]['mean']:.4f} ± {r['separate'][k]['half_width']:.4f}"
                  for k in REPORTED]  # fmt: skip
        cells += [f"{r['concatenated'][k]:.4f}" for k in REPORTED]
        cells += [f"{r['total_seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nSeparate: mean over the {num_folds} folds' models ± the half-width of its 95% "
        f"Student-t interval (t_0.975,{num_folds - 1} x std / sqrt({num_folds})). Concatenated: "
        "each test item's fold embeddings concatenated and L2-normalised (ranking by the "
        "folds' mean cosine). Time: training + test embedding, all folds.\n"
    )
    return "\n".join(rows) + "\n" + note


def _picture(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(results)
    means = [results[n]["separate"]["map@r"]["mean"] for n in names]
    halves = [results[n]["separate"]["map@r"]["half_width"] for n in names]
    concat = [results[n]["concatenated"]["map@r"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5))
    x = list(range(len(names)))
    ax.bar(x, means, yerr=halves, capsize=6, color="#8fb3d9", label="separate (95% interval)")
    ax.scatter(x, concat, marker="D", color="#c0392b", zorder=3, label="concatenated")
    ax.set_xticks(x, names)
    ax.set_ylabel("test MAP@R")
    ax.set_ylim(0, min(1.0, max([*means, *concat, 0.01]) * 1.25 + max(halves, default=0)))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _loggers(plan: dict[str, Any], output: Path) -> list[Any]:
    """The logger(s) of the first config, rebuilt with ``save_dir`` under ``output``."""
    from jsonargparse.typing import import_object
    from lightning.pytorch.loggers import WandbLogger

    from lightning_metric.cli.lightning_cli import quiet_wandb

    first = next(iter(plan["configs"].values()))["resolved"]
    configured = (first.get("trainer") or {}).get("logger")
    if not configured or configured is True:
        return []
    loggers = []
    for item in configured if isinstance(configured, list) else [configured]:
        if not isinstance(item, dict) or "class_path" not in item:
            continue
        init = dict(item.get("init_args") or {})
        init["save_dir"] = str(output / "logs")
        if "name" in init:
            init["name"] = "benchmark"
        Path(init["save_dir"]).mkdir(parents=True, exist_ok=True)
        logger = import_object(item["class_path"])(**init)
        if isinstance(logger, WandbLogger):
            quiet_wandb(logger)
        loggers.append(logger)
    return loggers


def _log(loggers: list[Any], report: dict[str, Any], picture: Path) -> list[str]:
    """Every number to every logger, the picture and the table where the logger can."""
    metrics: dict[str, float] = {}
    for name, r in report["results"].items():
        for k in REPORTED:
            metrics[f"benchmark/{name}/separate/{k}"] = r["separate"][k]["mean"]
            metrics[f"benchmark/{name}/separate/{k}_half_width"] = r["separate"][k]["half_width"]
            metrics[f"benchmark/{name}/concatenated/{k}"] = r["concatenated"][k]
            for fold in r["folds"]:
                metrics[f"benchmark/{name}/fold_{fold['fold']}/{k}"] = fold["metrics"][k]
        metrics[f"benchmark/{name}/total_seconds"] = r["total_seconds"]
    where = []
    for logger in loggers:
        logger.log_metrics(metrics)
        kind = type(logger).__name__
        if hasattr(logger, "log_image"):
            logger.log_image(key="benchmark/results", images=[str(picture)])
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(picture).convert("RGB"))
            logger.experiment.add_image("benchmark/results", image, dataformats="HWC")
        if hasattr(logger, "log_table"):
            columns = ["config", *[f"{k} separate" for k in REPORTED],
                       *[f"{k} half-width" for k in REPORTED],
                       *[f"{k} concatenated" for k in REPORTED], "seconds"]  # fmt: skip
            data = [
                [name, *[r["separate"][k]["mean"] for k in REPORTED],
                 *[r["separate"][k]["half_width"] for k in REPORTED],
                 *[r["concatenated"][k] for k in REPORTED], r["total_seconds"]]
                for name, r in report["results"].items()
            ]  # fmt: skip
            logger.log_table(key="benchmark/table", columns=columns, data=data)
        logger.finalize("success")
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()
        where.append(f"{kind} ({getattr(logger, 'save_dir', None)})")
    return where


def write_report(
    plan: dict[str, Any], results: dict[str, Any], output: Path, seconds: float
) -> dict[str, Any]:
    report = {
        "protocol": "Musgrave et al. 2020 (A Metric Learning Reality Check): class-disjoint "
        "k-fold cross-validation on the training classes; each fold's checkpoint is the best "
        "by val/map@r; metrics on the held-out test classes, leave-one-out, cosine",
        "num_folds": plan["num_folds"],
        "base": plan["base"],
        "overrides": plan["overrides"],
        "allowed_differences": plan["allowed_differences"],
        "configs": {
            n: {k: c[k] for k in ("files", "hash", "resolved", "folds")}
            for n, c in plan["configs"].items()
        },  # fmt: skip
        "results": results,
        "machine": machine(),
        "seconds_this_run": seconds,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / RESULTS_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown_table(results, plan["num_folds"])
    (output / RESULTS_MD).write_text(table, encoding="utf-8")
    _picture(results, output / RESULTS_PNG)
    where = _log(_loggers(plan, output), report, output / RESULTS_PNG)
    print(table)
    print(f"lightning-metric benchmark: wrote {output / RESULTS_JSON}, {output / RESULTS_MD}, "
          f"{output / RESULTS_PNG}" + (f"; logged to {', '.join(where)}" if where else ""))  # fmt: skip
    return report
