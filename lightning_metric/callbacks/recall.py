"""RecallAtK: retrieval metrics of the validation / test embeddings, logged every epoch."""

from __future__ import annotations

import re
import warnings
from typing import Any, cast

import lightning.pytorch as pl

from lightning_metric.batch import step_embeddings
from lightning_metric.callbacks.collect import (
    EvaluationCallback,
    Stage,
    Step,
    dataset_size,
    flat_loaders,
    stage_loaders,
)
from lightning_metric.checks import check_int
from lightning_metric.retrieval.torchmetric import RetrievalMetrics

__all__ = ["RecallAtK"]


class RecallAtK(EvaluationCallback):
    """Logs ``val/recall@k`` (``test/recall@k`` when testing) and related retrieval metrics.

    Embeddings come from what ``validation_step`` / ``test_step`` return
    (``{"embeddings", "labels", "index"}``); if the step returns nothing usable, the callback
    embeds ``batch["x"]`` (or ``batch[0]``) with ``pl_module(x)`` itself. The embeddings
    stay on the device they were produced on (exact search by chunked matmul on GPU, FAISS
    on CPU) unless ``offload_to_cpu`` is set. Under DDP the embeddings of all ranks are
    gathered, DistributedSampler padding is removed by dataset index, and every rank logs
    the same values. With ``shard_reference=True`` nothing is gathered: each rank keeps the
    rows it embedded and searches them for every rank's queries (same values, about ``1/W``
    of the embedding memory per rank; see
    :class:`~lightning_metric.retrieval.RetrievalMetrics`).

    Logged (with prefix ``val/`` or ``test/``): ``recall@k`` for every ``k``, ``map@r``,
    ``r_precision``, ``mrr`` and ``precision@k`` when enabled, ``nmi``/``ami`` when
    ``clustering``, and ``unscorable_queries`` (queries whose class has no other item; left
    out of the means). The steps' labels may be ``[B]`` class ids, a ``[B, L]`` bool
    multi-hot matrix (relevant = a shared label) or ``[B, levels]`` hierarchical ids with
    ``label_kind="hierarchical"`` (every name logged per level: ``val/recall@1/level0``).

    With ``dims=[32, 64, 128]`` and/or ``precisions=["float32", "int8", "binary",
    "binary_rescore"]`` the same metrics are also logged for every Matryoshka prefix x
    precision, from the one set of collected embeddings: ``val/d64/int8/recall@1``,
    ``val/d64/int8/map@r``, ... and ``val/d64/int8/bytes_per_vector`` (see
    :class:`~lightning_metric.retrieval.RetrievalMetrics`); the plain keys are unchanged.

    Args:
        **metric_args: ``k``, ``metric``, ``map_at_r``, ``mrr``, ``precision``,
            ``clustering``, ``average``, ``fast``, ``rerank``, ``label_kind``,
            ``level_names``, ``dims``, ``precisions``, ``rescore_multiplier``,
            ``shard_reference``: passed to
            :class:`~lightning_metric.retrieval.RetrievalMetrics` (``.metrics`` is that
            object; each evaluated set gets a copy): ``k`` larger than the evaluation set
            allows is clamped with a warning; ``precision`` logs ``precision@k``;
            ``clustering`` logs ``nmi`` / ``ami`` (k-means; slower).
        query_dataloader_idx, reference_dataloader_idx: for a query/gallery protocol, the
            dataloaders holding the queries and the gallery (both or neither). Without them,
            each dataloader is evaluated leave-one-out on its own; with several dataloaders
            the names get a ``/dataloader_idx_{i}`` suffix. The two must differ, and must
            exist (checked when the loop starts). Two loaders that yield the same items are
            evaluated leave-one-out, with a warning, so no query retrieves its own copy.
        offload_to_cpu: keep collected embeddings in CPU memory (``compute_on_cpu`` of
            :class:`~lightning_metric.retrieval.RetrievalMetrics`).
        on_validation, on_test: which loops to evaluate.
        prog_bar: show ``recall@k`` in the progress bar.

    With ``rerank`` the metrics after re-ranking are logged too, as ``val/rerank/recall@1``
    ...; a :class:`~lightning_metric.retrieval.rerank.Reranker` such as
    ``KReciprocal(k1=20, k2=6, lambda_value=0.3)`` or ``QueryExpansion(k=2,
    alpha=3.0)``. In YAML::

        rerank:
          class_path: lightning_metric.retrieval.rerank.KReciprocal
          init_args: {k1: 20, k2: 6, lambda_value: 0.3}
    """

    def __init__(
        self,
        query_dataloader_idx: int | None = None,
        reference_dataloader_idx: int | None = None,
        offload_to_cpu: bool = False,
        on_validation: bool = True,
        on_test: bool = True,
        prog_bar: bool = True,
        **metric_args: Any,
    ) -> None:
        super().__init__()
        # The metric arguments are RetrievalMetrics' own (jsonargparse follows **metric_args
        # into that call, so YAML and --help list them with their types and defaults). It
        # checks them once; each evaluated set gets a clone.
        self.metrics = RetrievalMetrics(compute_on_cpu=offload_to_cpu, **metric_args)
        for name, idx in (
            ("query_dataloader_idx", query_dataloader_idx),
            ("reference_dataloader_idx", reference_dataloader_idx),
        ):
            if idx is not None:
                check_int(name, idx, minimum=0)
        if (query_dataloader_idx is None) != (reference_dataloader_idx is None):
            raise ValueError(
                "set both query_dataloader_idx and reference_dataloader_idx or neither, got "
                f"query_dataloader_idx={query_dataloader_idx}, "
                f"reference_dataloader_idx={reference_dataloader_idx}"
            )
        if query_dataloader_idx is not None and query_dataloader_idx == reference_dataloader_idx:
            raise ValueError(
                f"query and reference dataloaders must differ, both are {query_dataloader_idx}: "
                "leave query_dataloader_idx and reference_dataloader_idx unset to evaluate a "
                "loader leave-one-out (a query never retrieving itself)"
            )
        self.query_dataloader_idx = query_dataloader_idx
        self.reference_dataloader_idx = reference_dataloader_idx
        self.on_validation = on_validation
        self.on_test = on_test
        self.prog_bar = prog_bar
        self._running: dict[int, RetrievalMetrics] = {}
        self._sizes: dict[int, int | None] = {}

    @property
    def stages(self) -> tuple[Stage, ...]:  # type: ignore[override]
        stages: list[Stage] = []
        if self.on_validation:
            stages.append("val")
        if self.on_test:
            stages.append("test")
        return tuple(stages)

    @property
    def k(self) -> tuple[int, ...]:
        return self.metrics.k

    @property
    def _split(self) -> bool:
        return self.query_dataloader_idx is not None

    def _collect(
        self, pl_module: pl.LightningModule, outputs: Any, batch: Any, dataloader_idx: int
    ) -> None:
        if self._split:
            if dataloader_idx == self.query_dataloader_idx:
                role = "query"
            elif dataloader_idx == self.reference_dataloader_idx:
                role = "reference"
            else:
                return
            key = 0
        else:
            role, key = "both", dataloader_idx
        embeddings, labels, index = step_embeddings(pl_module, outputs, batch, "RecallAtK")
        if key not in self._running:
            self._running[key] = cast(RetrievalMetrics, self.metrics.clone())
        self._running[key].update(
            embeddings,
            labels,
            index,
            role=role,  # type: ignore[arg-type]
            dataset_size=self._sizes.get(dataloader_idx),
        )

    def _log(self, pl_module: pl.LightningModule, stage: Stage, num_dataloaders: int) -> None:
        metrics, self._running = self._running, {}
        for key, metric in sorted(metrics.items()):
            # Several independent loaders: name them the way Lightning does.
            suffix = f"/dataloader_idx_{key}" if num_dataloaders > 1 and not self._split else ""
            values = metric.compute()
            for name, value in values.items():
                logged = f"{stage}/{name}{suffix}"
                # Under DDP Lightning advises sync_dist=True for every epoch-level value, at
                # epoch end; these are computed on the gathered set and already identical on
                # every rank (a mean over ranks could move them by an ulp). Silenced for
                # exactly these keys, so the advice still reaches the user's own logs.
                warnings.filterwarnings(
                    "ignore",
                    message=rf"It is recommended to use `self\.log\('{re.escape(logged)}',",
                )
                pl_module.log(
                    logged,
                    value.item(),
                    prog_bar=self.prog_bar and name.startswith("recall@"),
                    sync_dist=False,
                    add_dataloader_idx=False,
                )
            metric.reset()

    # ------------------------------------------------------------------ hooks

    def epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self._running = {}
        flat = flat_loaders(stage_loaders(trainer, stage))
        if self._split and flat:
            for name in ("query_dataloader_idx", "reference_dataloader_idx"):
                idx = getattr(self, name)
                if idx >= len(flat):
                    raise ValueError(
                        f"RecallAtK: {name}={idx}, but there are only {len(flat)} {stage} "
                        f"dataloader(s) (valid indices 0..{len(flat) - 1})"
                    )
        # len(dataset) per loader: under DDP it tells exactly which rows are padding.
        self._sizes = {i: dataset_size(flat, i) for i in range(len(flat))}

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Step) -> None:
        self._collect(pl_module, step.outputs, step.batch, step.dataloader_idx)

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if self._running:
            batches = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
            self._log(pl_module, stage, _num_loaders(batches))


def _num_loaders(num_batches: Any) -> int:
    return len(num_batches) if isinstance(num_batches, list | tuple) else 1
