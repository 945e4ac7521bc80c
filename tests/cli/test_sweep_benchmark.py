"""Bad and unusual inputs of `lightning-metric benchmark`: each row is refused before anything
trains, with a message naming the value, or (unusual but valid) checked against ground truth."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest

from lightning_metric.cli.benchmark.configs import (
    BenchmarkError,
    check_data_accepts_folds,
    check_map_at_r,
    differences,
    parse_specs,
)
from lightning_metric.cli.benchmark.run import (
    _run_fold,
    _set_aside,
    check_or_record_plan,
    config_results,
    fold_done,
)
from lightning_metric.cli.benchmark.stats import concatenate, mean_interval
from lightning_metric.cli.commands import run_command

DIGITS = """
trainer: {accelerator: cpu, logger: false}
model:
  class_path: lightning_metric.MetricLearningModule
  init_args:
    backbone:
      class_path: lightning_metric.backbones.SmallCNN
      init_args: {in_channels: 1, width: 4}
    embedding_dim: 8
    head: {class_path: lightning_metric.heads.ArcFaceHead}
data:
  class_path: lightning_metric.data.DigitsDataModule
  init_args: {seed: 0}
"""


class PlainDataModule(pl.LightningDataModule):
    """A user's own data module without folds."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()


def digits(tmp: Path, text: str = DIGITS, name: str = "digits.yaml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def bench(tmp: Path, *argv: str) -> Any:
    return run_command(["benchmark", "--output", str(tmp / "out"), *argv])


def recall(**init_args: Any) -> dict[str, Any]:
    callback = {"class_path": "lightning_metric.callbacks.RecallAtK", "init_args": init_args}
    return {"trainer": {"callbacks": [callback]}}


def plan(num_folds: int = 2, base: list[str] | None = None, h: str = "a") -> dict[str, Any]:
    return {"num_folds": num_folds, "base": base or [], "configs": {"x": {"hash": h}}}


def fake_fold(directory: Path, labels: list[int], h: str = "h") -> dict[str, Any]:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(len(str(directory)))
    np.save(directory / "embeddings.npy", rng.normal(size=(len(labels), 3)).astype(np.float32))
    np.save(directory / "labels.npy", np.asarray(labels))
    np.save(directory / "ids.npy", np.arange(len(labels)))
    metrics = {"map@r": 0.5, "r_precision": 0.5, "precision@1": 0.5}
    record = {"config_hash": h, "metrics": metrics, "fit_seconds": 1.0, "embed_seconds": 0.1}
    (directory / "result.json").write_text(json.dumps(record))
    return {"dir": str(directory)}


def failing_fold(tmp: Path) -> None:
    code = "import sys; print('boom from the fold'); sys.exit(3)"
    _run_fold([sys.executable, "-c", code], tmp / "fold_0")


def relabelled_folds(tmp: Path) -> None:
    folds = [fake_fold(tmp / "f0", [0, 0, 1, 1]), fake_fold(tmp / "f1", [0, 1, 0, 1])]
    config_results("x", {"hash": "h", "folds": folds})


RAISES: list[tuple[str, Callable[[Path], Any], type[BaseException], str]] = [
    ("one fold", lambda t: bench(t, "--config", digits(t), "--num_folds", "1"),
     SystemExit, r"--num_folds must be an integer >= 2 .*got 1"),
    ("zero folds", lambda t: bench(t, "--config", digits(t), "--num_folds", "0"),
     SystemExit, r"got 0"),
    ("missing YAML", lambda t: bench(t, "--config", f"a={t}/none.yaml", "--num_folds", "2"),
     SystemExit, r"--config 'a=.*none.yaml': the YAML file '.*none.yaml' does not exist"),
    ("missing base", lambda t: bench(t, "--config", digits(t), "--base", "b.yaml",
                                     "--num_folds", "2"),
     SystemExit, r"the YAML file 'b.yaml' does not exist"),
    ("duplicate names", lambda t: bench(t, "--config", f"a={digits(t)}", "--config",
                                        f"a={digits(t)}", "--num_folds", "2"),
     SystemExit, r"two --config entries are named 'a'"),
    ("default names collide", lambda t: parse_specs([digits(t), digits(t)]),
     BenchmarkError, r"named 'digits'"),
    ("no file", lambda t: parse_specs(["a="]), BenchmarkError, r"'a=' names no YAML file"),
    ("bad name", lambda t: parse_specs([f"a b={digits(t)}"]),
     BenchmarkError, r"the name 'a b' must be letters"),
    ("no config", lambda t: parse_specs([]), BenchmarkError, r"at least one --config"),
    ("missing --num_folds", lambda t: bench(t, "--config", digits(t)), SystemExit, r"2"),
    ("unknown flag", lambda t: bench(t, "--config", digits(t), "--num_folds", "2", "--bogus"),
     SystemExit, r"2"),
    ("more folds than classes", lambda t: bench(t, "--config", digits(t), "--num_folds", "6",
                                                "--dry_run"),
     SystemExit, r"refuses --num_folds 6: .*num_folds=6 is larger than the 5 classes"),
    ("unknown allow key", lambda t: bench(t, "--config", digits(t), "--num_folds", "2",
                                          "--allow_difference", "model.init_args.nothing"),
     SystemExit, r"--allow_difference model.init_args.nothing matches no key"),
    ("YAML key the parser rejects", lambda t: bench(
        t, "--config", digits(t, DIGITS + "bogus_key: 1\n"), "--num_folds", "2"),
     SystemExit, r"config 'digits' \(.*digits.yaml\) does not parse:\n.*bogus_key"),
    ("data module without folds",
     lambda t: check_data_accepts_folds("mine", {"data": {
         "class_path": "test_sweep_benchmark.PlainDataModule"}}),
     BenchmarkError, r"PlainDataModule does not accept num_folds and fold\. .*num_folds: "
                     r"Optional\[int\] = None"),
    ("no data module", lambda t: check_data_accepts_folds("mine", {}),
     BenchmarkError, r"config 'mine' has no data module"),
    ("RecallAtK without map@r", lambda t: check_map_at_r("c", recall(map_at_r=False)),
     BenchmarkError, r"map_at_r=False.*val/map@r"),
    ("RecallAtK off in validation", lambda t: check_map_at_r("c", recall(on_validation=False)),
     BenchmarkError, r"on_validation=False"),
    ("RecallAtK query/reference", lambda t: check_map_at_r("c", recall(query_dataloader_idx=0,
                                                                      reference_dataloader_idx=1)),
     BenchmarkError, r"query_dataloader_idx=0"),
    ("key in one config only", lambda t: _refuse(differences(
        {"a": {"data": {"init_args": {"m_per_class": 4}}}, "b": {"data": {"init_args": {}}}})),
     BenchmarkError, r"data.init_args.m_per_class: a=4, b='<absent>'"),
    ("other num_folds recorded", lambda t: (check_or_record_plan(plan(2), t),
                                            check_or_record_plan(plan(3), t)),
     BenchmarkError, r"num_folds 2 -> 3.*new --output"),
    ("other base recorded", lambda t: (check_or_record_plan(plan(), t),
                                       check_or_record_plan(plan(base=["b.yaml"]), t)),
     BenchmarkError, r"--base \[\] -> \['b.yaml'\]"),
    ("config changed", lambda t: (check_or_record_plan(plan(), t),
                                  check_or_record_plan(plan(h="b"), t)),
     BenchmarkError, r"config 'x' changed"),
    ("fold of another config", lambda t: fold_done(Path(fake_fold(t / "f", [0, 0])["dir"]), "z"),
     BenchmarkError, r"written by another config \(hash h, this one is z\)"),
    ("failing fold", failing_fold, RuntimeError, r"(?s)exit code 3.*fold\.log.*boom from the fold"),
    ("folds of other test items", relabelled_folds, BenchmarkError, r"fold 1 embedded other"),
    ("interval of one value", lambda t: mean_interval([0.5]), ValueError, r"at least 2 values, got 1"),
    ("concatenate other sizes", lambda t: concatenate([np.ones((3, 2)), np.ones((4, 2))]),
     ValueError, r"different numbers of test items: \[3, 4\]"),
]  # fmt: skip


def _refuse(result: tuple[dict[str, Any], dict[str, Any]]) -> None:
    from lightning_metric.cli.benchmark.configs import refusal_message

    refused, _ = result
    if refused:
        raise BenchmarkError(refusal_message(refused))


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [r[1:] for r in RAISES], ids=[r[0] for r in RAISES]
)
def test_refused(call: Callable[[Path], Any], error: type, pattern: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=pattern):
        call(tmp_path)
    assert not (tmp_path / "out" / "digits").exists()  # nothing trained


def test_interval_of_known_values() -> None:
    # t_{0.975,1} = 12.7062 (t table); std(ddof=1) of (0.3, 0.5) = 0.1414.
    mean, half = mean_interval([0.3, 0.5])
    assert mean == pytest.approx(0.4)
    assert half == pytest.approx(12.706204736 * np.sqrt(0.02) / np.sqrt(2))
    assert mean_interval([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.0))
    # t_{0.975,4} = 2.7764.
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert mean_interval(values)[1] == pytest.approx(2.776445 * np.std(values, ddof=1) / np.sqrt(5))


def test_concatenated_cosine_is_the_mean_of_the_fold_cosines() -> None:
    rng = np.random.default_rng(0)
    folds = [rng.normal(size=(6, 4)) * rng.uniform(0.5, 3, size=(6, 1)) for _ in range(3)]
    joined = concatenate(folds)
    assert np.allclose(np.linalg.norm(joined, axis=1), 1)
    units = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in folds]
    mean_cos = sum(u @ u.T for u in units) / 3
    assert np.allclose(joined @ joined.T, mean_cos, atol=1e-6)


def test_objective_and_output_names_may_differ() -> None:
    a = {"model": {"init_args": {"head": {"class_path": "A"}, "objective_lr": 0.1}},
         "trainer": {"default_root_dir": "x", "logger": {"init_args": {"name": "a"}},
                     "callbacks": [{"init_args": {"dirpath": "x/c", "monitor": "m"}}]}}  # fmt: skip
    b = json.loads(json.dumps(a))
    b["model"]["init_args"] = {"head": {"class_path": "B"}, "objective_lr": None}
    b["trainer"].update(default_root_dir="y", logger={"init_args": {"name": "b"}})
    b["trainer"]["callbacks"][0]["init_args"]["dirpath"] = "y/c"
    refused, accepted = differences({"a": a, "b": b})
    assert refused == {}
    assert set(accepted) == {
        "model.init_args.head.class_path", "model.init_args.objective_lr",
        "trainer.default_root_dir", "trainer.logger.init_args.name",
        "trainer.callbacks[0].init_args.dirpath",
    }  # fmt: skip
    b["trainer"]["callbacks"][0]["init_args"]["monitor"] = "n"  # not an output name
    refused, _ = differences({"a": a, "b": b})
    assert refused == {"trainer.callbacks[0].init_args.monitor": {"a": "m", "b": "n"}}


def test_a_config_without_recall_at_k_gets_one_and_names_default_to_the_stem(
    tmp_path: Path,
) -> None:
    assert check_map_at_r("c", {"trainer": {"callbacks": []}}) is False
    assert check_map_at_r("c", recall(k=[1])) is True
    specs = parse_specs([f"{digits(tmp_path, name='arcface.yaml')}"], base=[digits(tmp_path)])
    assert specs[0].name == "arcface"
    assert specs[0].files == (str(tmp_path / "digits.yaml"), str(tmp_path / "arcface.yaml"))


def test_an_interrupted_fold_is_set_aside_not_deleted(tmp_path: Path) -> None:
    fold = tmp_path / "a" / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    (fold / "checkpoints" / "last.ckpt").write_text("partial")
    _set_aside(fold)
    assert not fold.exists()
    (aside,) = (tmp_path / "a").iterdir()
    assert aside.name.startswith("fold_0.interrupted-")
    assert (aside / "checkpoints" / "last.ckpt").read_text() == "partial"
