"""EmbeddingIndexWriter: ``lightning-metric predict`` -> a searchable index directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_metric.callbacks.collect import EmbeddingCollector, EvaluationCallback, Stage, Step
from lightning_metric.checks import check_factory_string, check_int, check_metric
from lightning_metric.retrieval.index import MANIFEST, EmbeddingIndex
from lightning_metric.retrieval.knn import Metric

__all__ = ["EmbeddingIndexWriter"]


class EmbeddingIndexWriter(EvaluationCallback):
    """Writes the predicted embeddings as an index directory that
    :meth:`lightning_metric.retrieval.EmbeddingIndex.load` reads.

    ``output_dir`` gets ``embeddings.npy``, ``ids.npy`` (the dataset index of each item),
    ``labels.npy``, ``index.faiss``, ``paths.txt`` (when the data set has file paths) and
    ``manifest.json`` (model class, checkpoint, embedding size, metric, count, data module).
    Under DDP the embeddings of all ranks are gathered and DistributedSampler padding removed;
    rank 0 writes. With several predict dataloaders, each is written to
    ``output_dir/dataloader_idx_{i}``.

    In YAML::

        trainer:
          callbacks:
            - class_path: lightning_metric.callbacks.EmbeddingIndexWriter
              init_args: {output_dir: outputs/index}

    Args:
        output_dir: directory to write.
        metric: how the index compares embeddings: ``"cosine"``, ``"ip"`` or ``"l2"``.
        overwrite: replace an existing index in ``output_dir``; otherwise predict stops with
            an error before computing anything.
        factory: FAISS index-factory string (``"Flat"`` exact; ``"HNSW32"``,
            ``"IVF1024,Flat"``, ``"IVF1024,PQ16"``, ... approximate, trained on the predicted
            embeddings); see :class:`~lightning_metric.retrieval.EmbeddingIndex`.
        nprobe, ef_search: search parameters stored with an IVF / HNSW index.
    """

    stages: tuple[Stage, ...] = ("predict",)

    def __init__(
        self,
        output_dir: str,
        metric: Metric = "cosine",
        overwrite: bool = False,
        factory: str = "Flat",
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(output_dir, str | Path) or not str(output_dir):
            raise ValueError(f"output_dir must be a directory path, got {output_dir!r}")
        check_metric(metric)
        self.output_dir = Path(output_dir)
        self.metric: Metric = metric
        self.overwrite = overwrite
        self.factory = check_factory_string(factory)  # PQ's M checked once D is known
        self.nprobe = None if nprobe is None else check_int("nprobe", nprobe, minimum=1)
        self.ef_search = None if ef_search is None else check_int("ef_search", ef_search, minimum=1)
        self._collectors: dict[int, EmbeddingCollector] = {}
        self._examples: dict[int, Tensor] = {}
        self.written: list[Path] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.output_dir / MANIFEST).exists() and not self.overwrite:
            raise FileExistsError(
                f"{str(self.output_dir)!r} already holds an index ({MANIFEST}); choose another "
                "output_dir or set overwrite: true on EmbeddingIndexWriter"
            )

    def epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self._collectors = {}
        self._examples = {}
        self._start = time.perf_counter()

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Step) -> None:
        idx, batch = step.dataloader_idx, step.batch
        collector = self._collectors.setdefault(idx, EmbeddingCollector(type(self).__name__))
        collector.update(pl_module, step.outputs, batch)
        if idx not in self._examples:
            x = batch.get("x") if isinstance(batch, dict) else None
            if isinstance(x, Tensor):
                self._examples[idx] = x[:1].detach().cpu()

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        several = len(self._collectors) > 1
        self.written = []
        for idx, collector in sorted(self._collectors.items()):
            index, embeddings, labels, dataset = collector.collected(trainer, pl_module, stage, idx)
            if not trainer.is_global_zero:
                continue
            target = self.output_dir / f"dataloader_idx_{idx}" if several else self.output_dir
            all_paths = getattr(dataset, "paths", None)
            paths = [str(all_paths[i]) for i in index.tolist()] if all_paths is not None else None
            built = EmbeddingIndex(
                embeddings,
                ids=index,
                labels=labels,
                metric=self.metric,
                paths=paths,
                info=_describe(trainer, pl_module, idx, self._examples.get(idx)),
                show_progress=True,
                factory=self.factory,
                nprobe=self.nprobe,
                ef_search=self.ef_search,
            )
            built.save(target)
            self.written.append(target)
            rank_zero_info(
                f"EmbeddingIndexWriter: wrote {len(built)} embeddings of dimension {built.dim} "
                f"({self.metric}, {self.factory}) to {target} in {time.perf_counter() - self._start:.1f} s"
            )
        self._collectors = {}


def _describe(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    dataloader_idx: int,
    example: Optional[Tensor] = None,
) -> dict:
    from lightning_metric import __version__
    from lightning_metric.export import describe_input

    datamodule = getattr(trainer, "datamodule", None)
    model_cls = type(pl_module)
    info: dict[str, Any] = {
        "lightning_metric_version": __version__,
        "model": {
            "class_path": f"{model_cls.__module__}.{model_cls.__qualname__}",
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "embedding_dim": getattr(pl_module, "embedding_dim", None),
            "backbone": type(getattr(pl_module, "backbone", None)).__name__,
            "hparams": dict(pl_module.hparams),
        },
        "dataloader_idx": dataloader_idx,
    }
    if example is not None:  # what `lightning-metric search --query image.png` applies
        info["input"] = describe_input(getattr(trainer, "datamodule", None), example)
    if datamodule is not None:
        data_cls = type(datamodule)
        info["data"] = {
            "class_path": f"{data_cls.__module__}.{data_cls.__qualname__}",
            "predict_split": getattr(datamodule, "predict_split", None),
            "hparams": dict(getattr(datamodule, "hparams", {})),
        }
    return info
