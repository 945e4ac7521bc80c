"""Bad and unusual inputs of the guards: resume flags, non-finite steps, re-ranking, sharded heads.

Each row is ``(name, call, error, message regex)``: the call raises ``error`` with a message
naming the value; with ``error=None`` the input is unusual but valid and the call itself
checks its result against ground truth (a formula, a brute-force reference).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from test_nonfinite_training import _batches, _fit, _gradient_module, _module, filled_gradient
from tiny_digits import tiny_args, tiny_checkpoint

from lightning_metric import MetricLearningModule
from lightning_metric.checks import ArgumentTypeError
from lightning_metric.cli import main
from lightning_metric.cli.checkpoint_settings import CheckpointSettingsError
from lightning_metric.heads import ArcFaceHead, ShardingError
from lightning_metric.heads.sharding import shard_centres
from lightning_metric.nonfinite import NonFiniteError, first_nonfinite_gradient
from lightning_metric.retrieval import RetrievalMetrics
from lightning_metric.retrieval.rerank import (
    KReciprocal,
    QueryExpansion,
    alpha_query_expansion,
    database_side_augmentation,
    k_reciprocal,
    k_reciprocal_all,
    ranking_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")

G = torch.Generator().manual_seed(0)
Q = torch.nn.functional.normalize(torch.randn(4, 6, generator=G), dim=1)
R = torch.nn.functional.normalize(torch.randn(9, 6, generator=G), dim=1)
LABELS = torch.arange(9) % 3
D9 = (2 - 2 * R.double() @ R.double().T).clamp(min=0)


def with_nan(x: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = value
    return x


# --- resume with changed flags (the real CLI, one small checkpoint) ---------------------------
_CHECKPOINT: dict[str, Path] = {}


def resume(tmp_path: Path, *flags: str, command: str = "fit") -> Any:
    if "path" not in _CHECKPOINT:
        _CHECKPOINT["path"] = tiny_checkpoint(tmp_path / "trained")
    return main(
        [command, *tiny_args(tmp_path / "run", 2), f"--ckpt_path={_CHECKPOINT['path']}", *flags]
    )


class SubModule(MetricLearningModule):
    """A user's subclass, given as ``--model`` to resume a MetricLearningModule checkpoint."""


def gather_applied(tmp_path: Path) -> None:
    cli = resume(tmp_path, "--model.gather_across_ranks=false")
    assert cli.model.gather_across_ranks is False  # applied: no state, same result on 1 device


# --- non-finite steps --------------------------------------------------------------------------
def gradient_raises(value: float) -> None:
    model = _gradient_module()
    model.neck[1].forward = lambda x: filled_gradient(x, value)  # every step: the first one raises
    _fit(model, _batches(n=2))


def skip_on_a_clean_run_changes_nothing() -> None:
    plain, checked = _module(), _module(nonfinite="skip")
    _fit(plain, _batches(n=2))
    trainer = _fit(checked, _batches(n=2))
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 0.0
    for name, value in plain.state_dict().items():
        assert torch.equal(value, checked.state_dict()[name]), name


def every_step_skipped_leaves_the_model_as_built() -> None:
    model = _gradient_module(calls=(0, 1, 2), nonfinite="skip")
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="gradient"):
        trainer = _fit(model, _batches(n=3))
    assert model.skipped_nonfinite_steps == 3 and trainer.global_step == 3
    for name, value in before.items():
        assert torch.equal(value, model.state_dict()[name]), name


def gradient_check_equals_brute_force() -> None:
    cases = {
        "huge": torch.full((3,), 3e38),
        "empty": torch.zeros(0),
        "none": None,
        "minus_inf": torch.tensor([1.0, -float("inf")]),
        "nan": torch.tensor([float("nan"), 1.0]),
        "half": torch.tensor([65504.0], dtype=torch.float16),
    }
    params = []
    for name, grad in cases.items():
        dtype = torch.float32 if grad is None else grad.dtype
        p = torch.nn.Parameter(torch.zeros(1 if grad is None else grad.shape, dtype=dtype))
        p.grad = grad
        params.append((name, p))
    brute = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert first_nonfinite_gradient(params) == brute[0] == "minus_inf"
    assert first_nonfinite_gradient(params[:3] + params[5:]) is None  # all finite or absent


# --- re-ranking ----------------------------------------------------------------------------------
def metrics_with_reranker(reranker: Callable[..., Any]) -> None:
    metric = RetrievalMetrics(k=1, rerank=reranker)  # type: ignore[arg-type]
    metric.update(R, LABELS, torch.arange(9))
    metric.compute()


def average_qe() -> None:
    got = alpha_query_expansion(Q, R, k=3, alpha=0.0)  # alpha = 0: plain mean of the top 3
    top = (Q @ R.T).topk(3).indices
    torch.testing.assert_close(got, torch.nn.functional.normalize(Q + R[top].sum(1), dim=1))


def exclude_none_equals_no_exclude() -> None:
    d = D9[:4]
    none = ranking_metrics(d, LABELS[:4], LABELS, k=(1, 2), exclude=torch.full((4,), -1))
    assert none == ranking_metrics(d, LABELS[:4], LABELS, k=(1, 2))


def lambda_one_is_the_original_ranking() -> None:
    got = k_reciprocal_all(D9, 3, 1, 1.0)  # lambda = 1: only the (row-scaled) distance is left
    torch.testing.assert_close(torch.from_numpy(got), D9 / D9.max(1, keepdim=True).values)


# --- sharded heads --------------------------------------------------------------------------------
def sharded(num_classes: int = 6) -> ArcFaceHead:
    return ArcFaceHead(4, num_classes, shard_classes=True)


def load_centres(shape: tuple[int, int], key: str = "head.weight") -> None:
    shard_centres({"state_dict": {key: torch.zeros(shape)}}, sharded(), "head.weight", "ckpt.pt")


Row = tuple[str, Callable[..., Any], Optional[type[Exception]], str]
ROWS: list[Row] = [
    # resume: refused settings name the flag, both values and the way out
    (
        "resume embedding_dim",
        lambda t: resume(t, "--model.embedding_dim=16"),
        CheckpointSettingsError,
        r"--model\.embedding_dim: checkpoint 32, given 16.*without --ckpt_path",
    ),
    (
        "resume head scale",
        lambda t: resume(t, "--model.head.scale=30"),
        CheckpointSettingsError,
        r"head\.init_args\.scale: checkpoint 16\.0, given 30\.0",
    ),
    (
        "resume add lr_scheduler",
        lambda t: resume(
            t,
            "--model.lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--model.lr_scheduler.step_size=1",
        ),
        CheckpointSettingsError,
        r"lr_scheduler\.class_path: checkpoint None, given 'torch\.optim",
    ),
    (
        "resume lr_scheduler_interval",
        lambda t: resume(t, "--model.lr_scheduler_interval=step"),
        CheckpointSettingsError,
        r"lr_scheduler_interval: checkpoint 'epoch', given 'step'",
    ),
    (
        "resume weight_decay",
        lambda t: resume(t, "--model.optimizer.weight_decay=0.5"),
        CheckpointSettingsError,
        r"optimizer\.init_args\.weight_decay: checkpoint 0\.01, given 0\.5",
    ),
    (
        "resume neck",
        lambda t: resume(t, "--model.neck=lightning_metric.necks.EmbeddingNeck"),
        CheckpointSettingsError,
        r"--model\.neck.*checkpoint None",
    ),
    (
        "test with another head",
        lambda t: resume(t, "--model.head.margin=0.1", command="validate"),
        CheckpointSettingsError,
        r"validate --ckpt_path.*margin: checkpoint 0\.3, given 0\.1",
    ),
    (
        "resume with another model class",
        lambda t: resume(t, f"--model={__name__}.SubModule"),
        CheckpointSettingsError,
        r"--model\.class_path: checkpoint 'lightning_metric\.MetricLearningModule', given '.*SubModule'",
    ),
    ("resume gather_across_ranks applied", gather_applied, None, ""),
    # non-finite steps
    (
        "nonfinite unknown",
        lambda: _module(nonfinite="drop"),
        ValueError,
        r"`nonfinite` must be one of \('raise', 'skip'\), got 'drop'",
    ),
    ("nonfinite None", lambda: _module(nonfinite=None), ValueError, r"`nonfinite`.*got None"),
    (
        "NaN gradient, finite loss",
        lambda: gradient_raises(float("nan")),
        NonFiniteError,
        r"global step 0 .*gradient of 'backbone\.features\.0\.0\.weight' holds NaN/Inf",
    ),
    (
        "Inf gradient, finite loss",
        lambda: gradient_raises(float("inf")),
        NonFiniteError,
        r"global step 0 .*gradient of 'backbone\..*' holds NaN/Inf",
    ),
    ("skip on a clean run", skip_on_a_clean_run_changes_nothing, None, ""),
    ("gradient check vs isfinite", gradient_check_equals_brute_force, None, ""),
    ("every step skipped", every_step_skipped_leaves_the_model_as_built, None, ""),
    # re-ranking parameters: refused at construction
    (
        "QE alpha NaN",
        lambda: QueryExpansion(alpha=float("nan")),
        ValueError,
        r"`alpha` must be a finite number >= 0, got nan",
    ),
    ("QE alpha negative", lambda: QueryExpansion(alpha=-1.0), ValueError, r"`alpha`.*got -1\.0"),
    ("QE alpha Inf", lambda: QueryExpansion(alpha=float("inf")), ValueError, r"`alpha`.*got inf"),
    ("QE k zero", lambda: QueryExpansion(k=0), ValueError, r"`k` must be an integer >= 1, got 0"),
    ("QE k float", lambda: QueryExpansion(k=2.5), ArgumentTypeError, r"`k`.*got 2\.5"),
    ("QE dba string", lambda: QueryExpansion(dba="no"), ArgumentTypeError, r"`dba`.*got 'no'"),
    (
        "k-reciprocal lambda NaN",
        lambda: KReciprocal(lambda_value=float("nan")),
        ValueError,
        r"`lambda_value` must be in \[0, 1\], got nan",
    ),
    (
        "k-reciprocal lambda 1.5",
        lambda: KReciprocal(lambda_value=1.5),
        ValueError,
        r"`lambda_value`.*got 1\.5",
    ),
    ("k-reciprocal k2 zero", lambda: KReciprocal(k2=0), ValueError, r"`k2`.*got 0"),
    (
        "alpha-QE alpha NaN",
        lambda: alpha_query_expansion(Q, R, alpha=float("nan")),
        ValueError,
        r"`alpha`.*got nan",
    ),
    ("DBA k negative", lambda: database_side_augmentation(R, k=-2), ValueError, r"`k`.*got -2"),
    # re-ranking inputs
    (
        "alpha-QE NaN query",
        lambda: alpha_query_expansion(with_nan(Q), R),
        ValueError,
        r"`query` has 1 of 4 rows containing NaN or Inf \(first rows: \[1\]\)",
    ),
    (
        "alpha-QE Inf gallery",
        lambda: alpha_query_expansion(Q, with_nan(R, float("inf"))),
        ValueError,
        r"`gallery` has 1 of 9 rows containing NaN or Inf",
    ),
    (
        "alpha-QE dimension",
        lambda: alpha_query_expansion(Q, R[:, :5]),
        ValueError,
        r"`gallery` has dimension 5, but the queries have 6",
    ),
    (
        "alpha-QE 1-D query",
        lambda: alpha_query_expansion(Q[0], R),
        ValueError,
        r"`query` must be a non-empty 2-D tensor \[N, D\], got shape \(6,\)",
    ),
    (
        "alpha-QE empty gallery",
        lambda: alpha_query_expansion(Q, R[:0]),
        ValueError,
        r"`gallery`.*got shape \(0, 6\)",
    ),
    (
        "alpha-QE integer input",
        lambda: alpha_query_expansion(Q.long(), R),
        ArgumentTypeError,
        r"`query` must hold floating-point embeddings, got torch\.int64",
    ),
    (
        "DBA NaN gallery",
        lambda: database_side_augmentation(with_nan(R)),
        ValueError,
        r"`gallery` has 1 of 9 rows",
    ),
    (
        "DBA one vector",
        lambda: database_side_augmentation(R[:1]),
        ValueError,
        r"needs at least 2 gallery vectors",
    ),
    (
        "k-reciprocal NaN embeddings",
        lambda: KReciprocal(k1=3)(with_nan(R), None, "cosine"),
        ValueError,
        r"`query` has 1 of 9 rows containing NaN",
    ),
    (
        "k-reciprocal NaN distance",
        lambda: k_reciprocal_all(with_nan(D9), 3, 2),
        ValueError,
        r"`dist` holds 1 NaN/Inf distances \(first at \[1, 2\]: nan\)",
    ),
    (
        "k-reciprocal num_query > N",
        lambda: k_reciprocal_all(D9, 3, 2, num_query=10),
        ValueError,
        r"`num_query` must be an integer in \[1, 9\], got 10",
    ),
    (
        "k-reciprocal similarities",
        lambda: k_reciprocal(-D9[:2, 2:], D9[:2, :2], D9[2:, 2:]),
        ValueError,
        r"`q_g` holds negative values .*pass distances",
    ),
    (
        "ranking NaN distance",
        lambda: ranking_metrics(with_nan(D9), LABELS, LABELS),
        ValueError,
        r"`distances` returned 1 NaN/Inf distances \(first at \[1, 2\]: nan\)",
    ),
    (
        "ranking shape vs labels",
        lambda: ranking_metrics(D9[:4], LABELS, LABELS),
        ValueError,
        r"shape \(4, 9\); expected \(9, 9\)",
    ),
    (
        "ranking exclude out of range",
        lambda: ranking_metrics(D9, LABELS, LABELS, k=1, exclude=torch.arange(9) + 1),
        ValueError,
        r"`exclude` holds 9: each entry must be a reference row in \[0, 9\) or -1",
    ),
    (
        "ranking exclude length",
        lambda: ranking_metrics(D9, LABELS, LABELS, k=1, exclude=torch.arange(4)),
        ValueError,
        r"`exclude` must have 9 entries, got 4",
    ),
    # re-ranker outputs, as RetrievalMetrics / RecallAtK see them
    (
        "re-ranker NaN output",
        lambda: metrics_with_reranker(lambda q, r, m: torch.full((len(q), len(q)), float("nan"))),
        ValueError,
        r"the re-ranker .* returned 81 NaN/Inf distances",
    ),
    (
        "re-ranker -Inf output",
        lambda: metrics_with_reranker(
            lambda q, r, m: with_nan(torch.zeros(len(q), len(q)), -float("inf"))
        ),
        ValueError,
        r"returned 1 NaN/Inf distances \(first at \[1, 2\]: -inf\)",
    ),
    (
        "re-ranker wrong shape",
        lambda: metrics_with_reranker(lambda q, r, m: torch.zeros(9, 8)),
        ValueError,
        r"returned distances of shape \(9, 8\); expected \(9, 9\)",
    ),
    (
        "re-ranker returns a list",
        lambda: metrics_with_reranker(lambda q, r, m: [[0.0]]),
        ArgumentTypeError,
        r"must return a \[Q, R\] tensor of distances, got list",
    ),
    (
        "re-ranker not callable",
        lambda: RetrievalMetrics(rerank=3),
        ArgumentTypeError,  # type: ignore[arg-type]
        r"`rerank` must be a re-ranker.*got 3",
    ),
    ("average QE (alpha 0)", average_qe, None, ""),
    ("exclude all -1", exclude_none_equals_no_exclude, None, ""),
    ("k-reciprocal lambda 1", lambda_one_is_the_original_ranking, None, ""),
    # sharded heads
    (
        "sharded flag string",
        lambda: ArcFaceHead(4, 6, shard_classes="yes"),
        ShardingError,
        r"`shard_classes` must be a bool, got 'yes'",
    ),
    (
        "shard more ranks than classes",
        lambda: sharded(3).shard(0, 4),
        ShardingError,
        r"num_classes=3.*4 DDP ranks",
    ),
    (
        "shard negative rank",
        lambda: sharded().shard(-1, 2),
        ValueError,
        r"`rank` must be an integer in \[0, 1\], got -1",
    ),
    ("shard rank = world", lambda: sharded().shard(2, 2), ValueError, r"`rank`.*got 2"),
    (
        "shard world 0",
        lambda: sharded().shard(0, 0),
        ValueError,
        r"`world_size` must be an integer >= 1, got 0",
    ),
    (
        "shard centres of other classes",
        lambda: load_centres((5, 4)),
        ShardingError,
        r"ckpt\.pt: `head\.weight` has shape \(5, 4\), expected \(6, 4\)",
    ),
    (
        "shard centres missing",
        lambda: load_centres((6, 4), key="other"),
        ShardingError,
        r"ckpt\.pt holds no class centres `head\.weight`",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [pytest.param(c, e, m, id=n) for n, c, e, m in ROWS]
)
def test_guard_input(
    call: Callable[..., Any], error: Optional[type[Exception]], match: str, tmp_path: Path
) -> None:
    run = partial(call, tmp_path) if call.__code__.co_argcount else call
    if error is None:
        run()  # asserts its own ground truth
        return
    with pytest.raises(error, match=match):
        run()


def test_table_is_large_and_its_ids_unique() -> None:
    names = [row[0] for row in ROWS]
    assert len(names) >= 25 and len(set(names)) == len(names)
    assert sum(row[2] is None for row in ROWS) >= 5  # unusual-but-valid rows, checked
