"""EmbeddingIndexWriter: ``lightning-metric predict`` -> a searchable index directory."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_metric.callbacks.collect import EmbeddingCollector, EvaluationCallback, Stage, Step
from lightning_metric.checks import check_factory_string, check_int, check_metric
from lightning_metric.distributed import world_size
from lightning_metric.provenance import checkpoint_mismatch, checkpoint_record
from lightning_metric.retrieval.index import MANIFEST, EmbeddingIndex
from lightning_metric.retrieval.index.compact import check_index_options
from lightning_metric.retrieval.index.core import IndexPrecision
from lightning_metric.retrieval.index.files import _swap_in
from lightning_metric.retrieval.index.shards import Shard, shard_name, write_manifest, write_shard
from lightning_metric.retrieval.knn import Similarity

__all__ = ["EmbeddingIndexWriter"]

Overwrite = Union[bool, Literal["same_checkpoint"]]


class EmbeddingIndexWriter(EvaluationCallback):
    """Writes the predicted embeddings as an index directory that
    :meth:`lightning_metric.retrieval.EmbeddingIndex.load` reads.

    ``output_dir`` gets ``embeddings.npy``, ``ids.npy`` (the dataset index of each item),
    ``labels.npy``, ``index.faiss``, ``paths.txt`` (when the data set has file paths) and
    ``manifest.json`` (model class, checkpoint path and sha256, embedding size, metric, count,
    data module class, split and size).
    Under DDP the embeddings of all ranks are gathered and DistributedSampler padding removed;
    rank 0 writes. With ``shard=True`` nothing is gathered: each rank writes its own rows
    (padding dropped) as one shard folder, and rank 0 the manifest
    (:mod:`~lightning_metric.retrieval.index.shards`; every rank must see the same
    filesystem); :meth:`~lightning_metric.retrieval.EmbeddingIndex.load` merges the shards
    into the index one process would have built. With several predict dataloaders, each is
    written to ``output_dir/dataloader_idx_{i}``.

    In YAML::

        trainer:
          callbacks:
            - class_path: lightning_metric.callbacks.EmbeddingIndexWriter
              init_args: {output_dir: outputs/index}

    Args:
        output_dir: directory to write.
        metric: how the index compares embeddings: ``"cosine"``, ``"ip"`` or ``"l2"``.
        overwrite: ``True`` replaces an existing index in ``output_dir``;
            ``"same_checkpoint"`` replaces it only when its manifest records the checkpoint
            being predicted (same sha256), so another model's embeddings never replace it
            unasked (``lightning-metric predict``'s own ``<default_root_dir>/index`` writer);
            ``False``: never. A refused overwrite stops predict before computing anything.
        allow_untrained: write an index although no checkpoint was loaded
            (``ckpt_path``) and this Trainer has not trained the model. Off, such a predict
            stops at its start: it is how ``lightning-metric predict`` without
            ``--ckpt_path`` would index a freshly initialised model. After ``trainer.fit``
            the same Trainer's predict is allowed (its ``global_step`` is the training);
            weights trained by another Trainer or loaded by hand need ``True``. The manifest
            says which (``info["model"]["weights"]``).
        factory: FAISS index-factory string (``"Flat"`` exact; ``"HNSW32"``,
            ``"IVF1024,Flat"``, ``"IVF1024,PQ16"``, ... approximate, trained on the predicted
            embeddings); see :class:`~lightning_metric.retrieval.EmbeddingIndex`.
        nprobe, ef_search: search parameters stored with an IVF / HNSW index.
        dim, precision, rescore_multiplier: index the Matryoshka prefix of size ``dim`` as
            ``"float32"``, ``"int8"`` (ranges calibrated on the predicted embeddings) or
            ``"binary"`` codes, re-ranking ``rescore_multiplier * k`` code candidates by the
            float vectors; see :class:`~lightning_metric.retrieval.EmbeddingIndex`.
        shard: under DDP, write one shard per rank instead of gathering every embedding to
            rank 0 (no effect in one process). The FAISS index is built when the directory
            is loaded (from all shards' rows, so int8 ranges and IVF / PQ training are global,
            never per shard); ``EmbeddingIndex.load(dir).save(other)`` stores it built.
    """

    stages: tuple[Stage, ...] = ("predict",)

    def __init__(
        self,
        output_dir: str,
        metric: Similarity = "cosine",
        overwrite: Overwrite = False,
        factory: str = "Flat",
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        allow_untrained: bool = False,
        dim: Optional[int] = None,
        precision: IndexPrecision = "float32",
        rescore_multiplier: Optional[int] = None,
        shard: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(shard, bool):
            raise ValueError(f"shard must be True or False, got {shard!r}")
        self.shard = shard
        if not isinstance(output_dir, str | Path) or not str(output_dir):
            raise ValueError(f"output_dir must be a directory path, got {output_dir!r}")
        check_metric(metric)
        self.output_dir = Path(output_dir)
        self.metric: Similarity = metric
        if not isinstance(overwrite, bool) and overwrite != "same_checkpoint":
            raise ValueError(
                f"overwrite must be True, False or 'same_checkpoint', got {overwrite!r}"
            )
        if not isinstance(allow_untrained, bool):
            raise ValueError(f"allow_untrained must be True or False, got {allow_untrained!r}")
        self.overwrite: Overwrite = overwrite
        self.allow_untrained = allow_untrained
        self.factory = check_factory_string(factory)  # PQ's M checked once D is known
        # Checked here, not after a predict pass: all but dim's upper bound (the model's D).
        self.precision, _, self.rescore_multiplier, _ = check_index_options(
            precision, None, 1, rescore_multiplier, self.factory
        )
        self.dim = None if dim is None else check_int("dim", dim, minimum=1)
        self.nprobe = None if nprobe is None else check_int("nprobe", nprobe, minimum=1)
        self.ef_search = None if ef_search is None else check_int("ef_search", ef_search, minimum=1)
        self._collectors: dict[int, EmbeddingCollector] = {}
        self._examples: dict[int, Tensor] = {}
        self.written: list[Path] = []
        self._weights: dict[str, Any] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Decided on every rank from the same files, so all ranks stop together.
        existing = self._existing_manifests()
        if self.overwrite is False and existing:
            raise FileExistsError(
                f"{str(existing[0].parent)!r} already holds an index ({MANIFEST}); "
                f"{self._overwrite_hint()}"
            )
        self._weights = self._weights_record(trainer)
        for manifest in existing:
            self._check_overwrite(manifest)

    def _weights_record(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Where the predicted weights come from; refuses an untrained model unless allowed.

        A checkpoint (``trainer.ckpt_path``) is hashed. Without one, a positive
        ``global_step`` means this Trainer trained the model (``trainer.fit`` then
        ``trainer.predict(model)`` in one process); a fresh Trainer with no checkpoint is
        what ``lightning-metric predict`` without ``--ckpt_path`` runs: initial weights.
        """
        if trainer.ckpt_path:
            return checkpoint_record(trainer.ckpt_path, "checkpoint")
        if trainer.global_step > 0:
            return checkpoint_record(
                None, f"trained by this Trainer ({trainer.global_step} steps), no checkpoint"
            )
        if self.allow_untrained:
            return checkpoint_record(None, "as given, no checkpoint (allow_untrained)")
        raise ValueError(
            f"EmbeddingIndexWriter: no checkpoint was loaded (ckpt_path is None) and this "
            "Trainer has not trained the model (global_step 0), so the index in "
            f"{str(self.output_dir)!r} would hold the embeddings of an untrained model. Pass "
            "the trained weights (`lightning-metric predict --ckpt_path CKPT`, "
            "`trainer.predict(model, ckpt_path=CKPT)`), or, if these weights are intended "
            "(trained by another Trainer, loaded by hand), set allow_untrained: true on "
            "EmbeddingIndexWriter (CLI: --trainer.callbacks+=lightning_metric.callbacks."
            "EmbeddingIndexWriter --trainer.callbacks.output_dir=DIR "
            "--trainer.callbacks.allow_untrained=true)"
        )

    def _existing_manifests(self) -> list[Path]:
        found = [self.output_dir / MANIFEST]
        found += sorted(self.output_dir.glob(f"dataloader_idx_*/{MANIFEST}"))
        return [m for m in found if m.is_file()]

    def _overwrite_hint(self) -> str:
        return (
            "choose another output_dir, delete it, or set overwrite: true on "
            "EmbeddingIndexWriter (CLI: --trainer.callbacks+=lightning_metric.callbacks."
            f"EmbeddingIndexWriter --trainer.callbacks.output_dir={self.output_dir} "
            "--trainer.callbacks.overwrite=true)"
        )

    def _check_overwrite(self, manifest: Path) -> None:
        """``overwrite="same_checkpoint"``: the existing index must come from the checkpoint
        being predicted."""
        if self.overwrite is True:
            return
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))["info"]["model"]
        except (ValueError, KeyError, TypeError):
            recorded = {}
        reason = checkpoint_mismatch(recorded, self._weights)
        if reason is not None:
            raise FileExistsError(
                f"{str(manifest.parent)!r} already holds an index of another model, and it is "
                f"only replaced by embeddings of the same checkpoint: {reason}. To replace it, "
                f"{self._overwrite_hint()}"
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
            target = self.output_dir / f"dataloader_idx_{idx}" if several else self.output_dir
            if self.shard and world_size() > 1:
                self._write_shards(trainer, pl_module, idx, collector, target)
                continue
            index, embeddings, labels, dataset = collector.collected(trainer, pl_module, stage, idx)
            if not trainer.is_global_zero:
                continue
            all_paths = getattr(dataset, "paths", None)
            paths = [str(all_paths[i]) for i in index.tolist()] if all_paths is not None else None
            built = EmbeddingIndex(
                embeddings,
                ids=index,
                labels=labels,
                metric=self.metric,
                paths=paths,
                info=_describe(
                    trainer, pl_module, idx, self._examples.get(idx), self._weights, dataset
                ),
                show_progress=True,
                factory=self.factory,
                nprobe=self.nprobe,
                ef_search=self.ef_search,
                dim=self.dim,
                precision=self.precision,  # type: ignore[arg-type]
                rescore_multiplier=self.rescore_multiplier,
            )
            built.save(target)
            self.written.append(target)
            rank_zero_info(
                f"EmbeddingIndexWriter: wrote {len(built)} embeddings of dimension {built.dim} "
                f"({self.metric}, {built.factory}, {built.precision}, dim {built.index_dim}) to {target} in {time.perf_counter() - self._start:.1f} s"
            )
        self._collectors = {}

    def _write_shards(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        idx: int,
        collector: EmbeddingCollector,
        target: Path,
    ) -> None:
        """Each rank's rows to its shard folder in a staging folder beside ``target``; rank 0
        adds the manifest and swaps the folder in (an existing index stays whole until then)."""
        position, (index, embeddings, labels, dataset) = collector.local(
            trainer, pl_module, "predict", idx
        )
        width = embeddings.shape[1]
        if self.dim is not None and self.dim > width:
            raise ValueError(
                f"EmbeddingIndexWriter(dim={self.dim}) asks for a prefix of {self.dim} "
                f"dimensions, but the embeddings have {width}: use dim <= {width}"
            )
        check_factory_string(self.factory, self.dim or width)
        world, rank = world_size(), trainer.global_rank
        name = [f".{target.name}.saving-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        staging = target.parent / str(name[0])
        all_paths = getattr(dataset, "paths", None)
        paths = [str(all_paths[i]) for i in index.tolist()] if all_paths is not None else None
        rows = Shard(embeddings.numpy(), index.numpy(), labels.numpy(), position.numpy(), paths)
        device = pl_module.device  # NCCL reduces device tensors only
        failed: BaseException | None = None
        for step in ("folder", "shard"):
            try:
                if step == "folder" and rank == 0:
                    staging.mkdir(parents=True)
                elif step == "shard":
                    write_shard(staging / shard_name(rank, world), rows, self.metric)
            except Exception as err:  # every rank must learn of it, or the others wait
                failed = err
            if not _all_ranks_ok(failed is None, device):  # also the barrier between steps
                if rank == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                if failed is not None:
                    raise failed
                raise RuntimeError(f"EmbeddingIndexWriter: another rank failed writing {target}")
        if rank == 0:
            settings = {
                "metric": self.metric,
                "factory": self.factory,
                "search_params": {
                    k: v
                    for k, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search))
                    if v is not None
                },
                "dim": self.dim,
                "precision": self.precision,
                "rescore_multiplier": self.rescore_multiplier,
                "info": _describe(
                    trainer, pl_module, idx, self._examples.get(idx), self._weights, dataset
                ),
            }
            try:
                write_manifest(staging, world, settings)
                _swap_in(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self.written.append(target)
            rank_zero_info(
                f"EmbeddingIndexWriter: wrote {world} shards of {width}-d embeddings to {target} "
                f"in {time.perf_counter() - self._start:.1f} s"
            )
        trainer.strategy.barrier()


def _all_ranks_ok(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _describe(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    dataloader_idx: int,
    example: Optional[Tensor] = None,
    weights: Optional[dict[str, Any]] = None,
    dataset: Any = None,
) -> dict:
    from lightning_metric import __version__
    from lightning_metric.export import describe_input

    datamodule = getattr(trainer, "datamodule", None)
    model_cls = type(pl_module)
    info: dict[str, Any] = {
        "lightning_metric_version": __version__,
        "model": {
            "class_path": f"{model_cls.__module__}.{model_cls.__qualname__}",
            **(weights or checkpoint_record(trainer.ckpt_path, "checkpoint")),
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
            # the split's size: the index may hold fewer (limit_predict_batches)
            "dataset_size": len(dataset) if hasattr(dataset, "__len__") else None,
            "hparams": dict(getattr(datamodule, "hparams", {})),
        }
    return info
