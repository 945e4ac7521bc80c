"""`lightning-metric benchmark` on digits: its numbers are those of `lightning-metric test` on each
fold's checkpoint, of numpy on those, and of the hand-concatenated embeddings; a rerun trains
nothing; other settings into the same output, or unequal conditions, are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from repo_paths import TESTS

from lightning_metric.cli import main as cli_main
from lightning_metric.cli.commands import run_command
from lightning_metric.data import DigitsDataModule
from lightning_metric.retrieval import retrieval_metrics

pytestmark = pytest.mark.slow

REPORTED = ("map@r", "r_precision", "precision@1")
# t_{0.975, 1} from a t table: the 95% interval of a mean of two values.
T_975_1 = 12.706204736174698

BASE = """
seed_everything: 0
trainer:
  max_epochs: 1
  limit_train_batches: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: ${trainer.default_root_dir}
  callbacks:
    - class_path: lightning_metric.callbacks.RecallAtK
      init_args:
        k: [1, 2]
model:
  class_path: lightning_metric.MetricLearningModule
  init_args:
    backbone:
      class_path: lightning_metric.backbones.SmallCNN
      init_args: {in_channels: 1, width: 4}
    embedding_dim: 8
    head:
      class_path: lightning_metric.heads.ArcFaceHead
      init_args: {scale: 16.0, margin: 0.3}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.003}
data:
  class_path: lightning_metric.data.DigitsDataModule
  init_args: {batch_size: 32, seed: 0}
"""
COSFACE = """
model:
  init_args:
    head:
      class_path: lightning_metric.heads.CosFaceHead
      init_args: {scale: 16.0, margin: 0.2}
"""
WIDER = """
model:
  init_args:
    backbone:
      init_args: {width: 6}
"""


def write_configs(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"base": BASE, "cosface": COSFACE, "wider": WIDER}
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    return {name: str(folder / f"{name}.yaml") for name in files}


def command(files: dict[str, str], output: Path, *extra: str) -> list[str]:
    return [
        "benchmark",
        "--config", f"arcface={files['base']}",
        "--config", f"cosface={files['base']},{files['cosface']}",
        "--num_folds", "2", "--output", str(output), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("benchmark")
    files = write_configs(root / "configs")
    output = root / "out"
    started = time.perf_counter()
    report = run_command(command(files, output))
    return {"files": files, "output": output, "report": report,
            "seconds": time.perf_counter() - started}  # fmt: skip


def test_fold_numbers_are_those_of_lightning_metric_test(benchmark: dict[str, Any]) -> None:
    files, report = benchmark["files"], benchmark["report"]
    overlays = {"arcface": [files["base"]], "cosface": [files["base"], files["cosface"]]}
    for name, result in report["results"].items():
        for fold in result["folds"]:
            ckpt = fold["checkpoint"]["path"]
            assert Path(ckpt).is_file() and Path(ckpt).parent.name == "benchmark_checkpoints"
            tested = cli_main(
                ["test", *[a for f in overlays[name] for a in ("--config", f)],
                 "--data.init_args.num_folds=2", f"--data.init_args.fold={fold['fold']}",
                 f"--ckpt_path={ckpt}", "--trainer.logger=false",
                 f"--trainer.default_root_dir={benchmark['output']}/hand"]
            )  # fmt: skip
            logged = tested.trainer.callback_metrics
            for key in REPORTED:
                assert fold["metrics"][key] == pytest.approx(logged[f"test/{key}"].item(), abs=1e-5)
            assert fold["metrics"]["precision@1"] == pytest.approx(logged["test/recall@1"].item())
            # The checkpoint kept is the best by validation map@r.
            states = torch.load(ckpt, weights_only=False)["callbacks"]
            ours = next(v for k, v in states.items() if "'monitor': 'val/map@r'" in k)
            assert fold["best_val_map@r"] == pytest.approx(ours["best_model_score"].item())


def test_separate_and_concatenated_numbers(benchmark: dict[str, Any]) -> None:
    output, report = benchmark["output"], benchmark["report"]
    saved = json.loads((output / "results.json").read_text())
    assert saved["results"].keys() == {"arcface", "cosface"}
    assert saved["machine"]["torch"] == torch.__version__
    table = (output / "results.md").read_text()
    assert (output / "results.png").stat().st_size > 1000
    # The configs' logger (CSVLogger here) received every number.
    (logged,) = (output / "logs").rglob("metrics.csv")
    header, row = logged.read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(","), strict=True))
    for name, result in report["results"].items():
        for key in REPORTED:
            assert float(values[f"benchmark/{name}/concatenated/{key}"]) == pytest.approx(
                result["concatenated"][key]
            )
            half = float(values[f"benchmark/{name}/separate/{key}_half_width"])
            assert half == pytest.approx(result["separate"][key]["half_width"])
    for name, result in report["results"].items():
        folds = result["folds"]
        assert [f["fold"] for f in folds] == [0, 1]
        for key in REPORTED:
            values = np.array([f["metrics"][key] for f in folds])
            mean = values.mean()
            half = T_975_1 * values.std(ddof=1) / np.sqrt(2)
            assert result["separate"][key]["mean"] == pytest.approx(mean, abs=1e-12)
            assert result["separate"][key]["half_width"] == pytest.approx(half, rel=1e-9)
            assert saved["results"][name]["separate"][key]["mean"] == pytest.approx(mean)
        line = next(row for row in table.splitlines() if row.startswith(f"| {name} |"))
        sep = result["separate"]["map@r"]
        assert f"{sep['mean']:.4f} ± {sep['half_width']:.4f}" in line
        directories = [output / name / f"fold_{i}" for i in (0, 1)]
        embeddings = [np.load(d / "embeddings.npy") for d in directories]
        labels = np.load(directories[0] / "labels.npy")
        assert np.array_equal(labels, np.load(directories[1] / "labels.npy"))
        assert len(labels) == result["test_items"] > 0
        units = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in embeddings]
        joined = np.hstack(units)
        joined /= np.linalg.norm(joined, axis=1, keepdims=True)
        expected = retrieval_metrics(torch.from_numpy(joined), torch.from_numpy(labels))
        for key in REPORTED:
            assert result["concatenated"][key] == pytest.approx(expected[key], abs=1e-6)
        # Each fold trained on its own classes: the two fold models differ.
        assert not np.allclose(embeddings[0], embeddings[1])


def test_rerun_trains_nothing_and_other_settings_are_refused(benchmark: dict[str, Any]) -> None:
    files, output, report = benchmark["files"], benchmark["output"], benchmark["report"]
    ckpts = sorted(output.rglob("*.ckpt"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    started = time.perf_counter()
    again = run_command(command(files, output))
    assert time.perf_counter() - started < benchmark["seconds"] / 2
    assert {p: p.stat().st_mtime_ns for p in sorted(output.rglob("*.ckpt"))} == before
    for name in report["results"]:
        assert again["results"][name]["separate"] == report["results"][name]["separate"]
        assert again["results"][name]["concatenated"] == report["results"][name]["concatenated"]
    plan = (output / "benchmark.json").read_text()
    with pytest.raises(
        SystemExit,
        match=r"other settings \(config 'arcface' changed; config 'cosface' changed.*new --output",
    ):
        run_command(command(files, output, "--trainer.max_epochs=2"))
    with pytest.raises(SystemExit, match=r"num_folds 2 -> 3"):
        run_command([*command(files, output)[:-2], "--num_folds", "3", "--output", str(output)])
    assert (output / "benchmark.json").read_text() == plan  # nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in sorted(output.rglob("*.ckpt"))} == before


def test_report_only_reports_the_finished_configs_and_trains_nothing(
    benchmark: dict[str, Any], capsys: Any
) -> None:
    files, output, report = benchmark["files"], benchmark["output"], benchmark["report"]
    before = {p: p.stat().st_mtime_ns for p in sorted(output.rglob("*.ckpt"))}
    result = output / "cosface" / "fold_1" / "result.json"
    kept = result.read_text()
    result.unlink()  # cosface's fold 1 is not finished now
    try:
        partial = run_command(command(files, output, "--report_only"))
    finally:
        result.write_text(kept)
    assert "left out: ['cosface']" in capsys.readouterr().out
    assert list(partial["results"]) == ["arcface"]
    assert partial["results"]["arcface"]["separate"] == report["results"]["arcface"]["separate"]
    assert {p: p.stat().st_mtime_ns for p in sorted(output.rglob("*.ckpt"))} == before
    whole = run_command(command(files, output, "--report_only"))
    assert (
        whole["results"]["cosface"]["concatenated"] == report["results"]["cosface"]["concatenated"]
    )
    assert json.loads((output / "results.json").read_text())["results"].keys() == {
        "arcface",
        "cosface",
    }


def test_unequal_backbones_are_refused_unless_allowed(tmp_path: Path, capsys: Any) -> None:
    files = write_configs(tmp_path / "configs")
    argv = [
        "benchmark",
        "--config", f"narrow={files['base']}",
        "--config", f"wide={files['base']},{files['cosface']},{files['wider']}",
        "--num_folds", "2", "--output", str(tmp_path / "out"), "--dry_run",
    ]  # fmt: skip
    key = "model.init_args.backbone.init_args.width"
    with pytest.raises(SystemExit, match=rf"{key}: narrow=4, wide=6\n.*--allow_difference"):
        run_command(argv)
    capsys.readouterr()
    plan = run_command([*argv, "--allow_difference", "model.init_args.backbone"])
    assert plan["allowed_differences"][key] == {"narrow": 4, "wide": 6}
    assert "model.init_args.head.class_path" in plan["allowed_differences"]
    printed = capsys.readouterr().out
    for name in ("narrow", "wide"):
        for fold in (0, 1):
            assert f"--output {tmp_path / 'out' / name / f'fold_{fold}'}" in printed
            assert f"--data.init_args.fold={fold}" in printed
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_fold_runs_under_lightning_ddp(tmp_path: Path) -> None:
    """Lightning's ddp launcher re-executes the fold's own command line on rank 1."""
    files = write_configs(tmp_path / "configs")
    out = tmp_path / "fold"
    argv = [
        sys.executable, "-m", "lightning_metric.cli.benchmark.fold", "--output", str(out),
        "--config_hash", "h", "--", "--config", files["base"],
        "--data.init_args.num_folds=2", "--data.init_args.fold=1",
        # Lightning's ddp launcher, meeting through a file rather than a port (tests only).
        "--trainer.strategy=ddp_harness.FileRendezvousLaunchedDDP",
        f"--trainer.strategy.init_file={tmp_path / 'rendezvous'}",
        "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
    ]  # fmt: skip
    tests = str(TESTS)  # ddp_harness, for every re-executed rank
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        text, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        text, _ = process.communicate()
        pytest.fail(f"the DDP fold hung:\n{text[-3000:]}")
    assert process.returncode == 0, text[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["config_hash"] == "h"
    labels = np.load(out / "labels.npy")
    # Rank 0 embeds the whole test split in loader order, not its DistributedSampler half.
    data = DigitsDataModule(batch_size=32, seed=0, num_folds=2, fold=1)
    data.setup("test")
    whole = torch.cat([batch["label"] for batch in data.test_dataloader()]).numpy()
    assert np.array_equal(labels, whole)
    assert len(labels) == result["test_items"] == len(np.load(out / "embeddings.npy"))
    expected = retrieval_metrics(torch.from_numpy(np.load(out / "embeddings.npy")),
                                 torch.from_numpy(labels))  # fmt: skip
    assert result["metrics"]["map@r"] == pytest.approx(expected["map@r"])
