"""A table of bad inputs: each raises where it enters, with a message naming the value.

Every row is ``(call, exception type, message regex)``. ``ArgumentTypeError`` (wrong type) is
both a ``TypeError`` and a ``ValueError``; rows assert the most specific type promised.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, miners
from tiny_retrieval import DictDataset, Tiny, clustered, trainer
from torch.utils.data import DataLoader

from lightning_metric import MetricLearningModule
from lightning_metric.backbones import SmallCNN
from lightning_metric.callbacks import RecallAtK
from lightning_metric.checks import ArgumentTypeError
from lightning_metric.data import ImageFolderDataModule
from lightning_metric.heads import ArcFaceHead, CosFaceHead
from lightning_metric.retrieval import (
    RetrievalMetrics,
    knn,
    retrieval_metrics,
    verification_metrics,
)
from lightning_metric.retrieval.index import EmbeddingIndex, IndexFormatError
from lightning_metric.retrieval.rerank import KReciprocal

G = torch.Generator().manual_seed(0)
X = torch.randn(10, 4, generator=G)
Y = torch.arange(10) % 3
NAN3 = X.clone()
NAN3[[1, 4, 7], 2] = float("nan")
PAIRS = torch.tensor([[0, 1], [2, 3], [4, 5]])


def index() -> EmbeddingIndex:
    return EmbeddingIndex(X.numpy(), labels=Y.numpy())


def validate_with_reference_idx(reference_dataloader_idx: int) -> None:
    x, labels = clustered(12, 3)
    loaders = [DataLoader(DictDataset(x, labels), batch_size=4) for _ in range(2)]
    cb = RecallAtK(k=1, query_dataloader_idx=0, reference_dataloader_idx=reference_dataloader_idx)
    trainer(cb).validate(Tiny(), loaders, verbose=False)


def load_with_nan_row(tmp_path: Path) -> None:
    directory = index().save(tmp_path / "index")
    emb = np.load(directory / "embeddings.npy")
    emb[3] = np.nan
    np.save(directory / "embeddings.npy", emb)
    EmbeddingIndex.load(directory, verify=False)


def load_with_bad_manifest_dim(tmp_path: Path) -> None:
    import json

    directory = index().save(tmp_path / "index")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["embedding_dim"] = 0
    (directory / "manifest.json").write_text(json.dumps(manifest))
    EmbeddingIndex.load(directory)


def load_with_mixed_files(tmp_path: Path) -> None:
    directory = index().save(tmp_path / "index")
    other = EmbeddingIndex((X + 1).numpy(), labels=Y.numpy()).save(tmp_path / "other")
    (directory / "embeddings.npy").write_bytes((other / "embeddings.npy").read_bytes())
    EmbeddingIndex.load(directory, verify=False)


def load_with_faiss_of_other_size(tmp_path: Path) -> None:
    directory = index().save(tmp_path / "index")
    other = EmbeddingIndex(X[:4].numpy()).save(tmp_path / "other")
    (directory / "index.faiss").write_bytes((other / "index.faiss").read_bytes())
    EmbeddingIndex.load(directory, verify=False)


# (id, call, exception, message regex); a call taking an argument gets pytest's tmp_path.
RETRIEVAL_CASES: list[tuple[str, Callable[..., Any], type[Exception], str]] = [
    # k, wherever it enters
    (
        "k float",
        lambda: retrieval_metrics(X, Y, k=1.0),
        ArgumentTypeError,
        r"`k` must be an integer >= 1 or a sequence of them, got 1\.0",
    ),
    (
        "k str in list",
        lambda: retrieval_metrics(X, Y, k=[1, "2"]),
        ArgumentTypeError,
        r"`k` values must be integers, got '2' of type str",
    ),
    ("k zero", lambda: retrieval_metrics(X, Y, k=0), ValueError, r"`k` values must be >= 1, got 0"),
    (
        "k negative",
        lambda: RetrievalMetrics(k=(1, -2)),
        ValueError,
        r"`k` values must be >= 1, got -2",
    ),
    ("k empty", lambda: RecallAtK(k=[]), ValueError, r"`k` must contain at least one value"),
    (
        "k bool",
        lambda: RecallAtK(k=True),
        ArgumentTypeError,
        r"`k` must be an integer >= 1 .*got True",
    ),
    (
        "knn k float",
        lambda: knn(X, k=1.0),
        ArgumentTypeError,
        r"`k` must be an integer >= 1, got 1\.0 of type float",
    ),
    ("knn k zero", lambda: knn(X, k=0), ValueError, r"`k` must be an integer >= 1, got 0"),
    (
        "index search k float",
        lambda: index().search(X[:2], k=2.0),
        ArgumentTypeError,
        r"`k` must be an integer >= 1, got 2\.0",
    ),
    # labels
    (
        "string labels",
        lambda: retrieval_metrics(X, np.array(list("abcabcabca"))),
        ArgumentTypeError,
        r"`labels` must hold integer class ids, got dtype <U1.*strings",
    ),
    (
        "float labels",
        lambda: retrieval_metrics(X, Y.float()),
        ArgumentTypeError,
        r"`labels` must hold integer class ids, got dtype torch\.float32",
    ),
    (
        "list labels",
        lambda: retrieval_metrics(X, [0, 1] * 5),
        ArgumentTypeError,
        r"`labels` must be a torch\.Tensor or numpy array .*got list",
    ),
    (
        "reference labels float",
        lambda: retrieval_metrics(
            X, Y, 1, reference_embeddings=X[:5] + 1, reference_labels=Y[:5].double()
        ),
        ArgumentTypeError,
        r"`reference_labels` must hold integer class ids",
    ),
    (
        "verification string labels",
        lambda: verification_metrics(X, np.array(list("abcabcabca"))),
        ArgumentTypeError,
        r"`labels` must hold integer class ids",
    ),
    # verification pairs
    (
        "is_same float",
        lambda: verification_metrics(X, pairs=PAIRS, is_same=torch.tensor([0.9, 0.1, 0.7])),
        ArgumentTypeError,
        r"`is_same` must be booleans \(or integers 0/1\).*float32",
    ),
    (
        "is_same int 2",
        lambda: verification_metrics(X, pairs=PAIRS, is_same=torch.tensor([1, 0, 2])),
        ValueError,
        r"`is_same` must be booleans \(or integers 0/1\), got value 2",
    ),
    (
        "pairs float",
        lambda: verification_metrics(
            X, pairs=PAIRS.float(), is_same=torch.tensor([True, False, True])
        ),
        ArgumentTypeError,
        r"`pairs` must hold integer item indices",
    ),
    # knn exclude
    (
        "exclude float",
        lambda: knn(X, X[:5] + 1, k=1, exclude=torch.zeros(10)),
        ArgumentTypeError,
        r"`exclude` must hold integer reference row numbers, got dtype torch\.float32",
    ),
    (
        "exclude too large",
        lambda: knn(X, X[:5] + 1, k=1, exclude=torch.full((10,), 5)),
        ValueError,
        r"`exclude` values must be reference rows in \[0, 5\) or -1 for none, got 5",
    ),
    (
        "exclude below -1",
        lambda: knn(X, X[:5] + 1, k=1, exclude=torch.full((10,), -2)),
        ValueError,
        r"`exclude` values .*got -2",
    ),
    # sizes
    (
        "one item leave-one-out",
        lambda: retrieval_metrics(X[:1], Y[:1], k=1),
        ValueError,
        r"only 1 item to search .*at least 2 items",
    ),
    (
        "one item knn",
        lambda: knn(X[:1], k=1),
        ValueError,
        r"`query` has only 1 item: .*at least 2 items",
    ),
    (
        "query of wrong dimension",
        lambda: index().search(np.zeros((2, 3), np.float32), k=1),
        ValueError,
        r"queries have dimension 3, but the index holds 4-d",
    ),
    # non-finite rows
    (
        "NaN rows retrieval_metrics",
        lambda: retrieval_metrics(NAN3, Y),
        ValueError,
        r"`embeddings` has 3 of 10 rows containing NaN or Inf",
    ),
    (
        "NaN rows knn reference",
        lambda: knn(X, NAN3, k=1),
        ValueError,
        r"`reference` has 3 of 10 rows containing NaN",
    ),
    (
        "NaN rows index",
        lambda: EmbeddingIndex(NAN3),
        ValueError,
        r"`embeddings` has 3 of 10 rows containing NaN or Inf",
    ),
    # choices
    (
        "metric",
        lambda: knn(X, k=1, metric="dot"),
        ValueError,
        r"`metric` must be one of \('cosine', 'ip', 'l2'\), got 'dot'",
    ),
    (
        "average",
        lambda: retrieval_metrics(X, Y, average="weighted"),
        ValueError,
        r"`average` must be one of \('micro', 'macro'\), got 'weighted'",
    ),
    (
        "sharded reference with re-ranking",
        lambda: RecallAtK(shard_reference=True, rerank=KReciprocal()),
        ValueError,
        r"RetrievalMetrics\(shard_reference=True\) cannot use `rerank`: re-ranking needs",
    ),
    (
        "sharded reference with hierarchical labels",
        lambda: RetrievalMetrics(shard_reference=True, label_kind="hierarchical"),
        ValueError,
        r"takes single class ids, got label_kind='hierarchical'",
    ),
    (
        "role",
        lambda: RetrievalMetrics().update(X, Y, role="gallery"),
        ValueError,
        r"`role` must be one of \('query', 'reference', 'both'\), got 'gallery'",
    ),
    # callback dataloader indices
    (
        "dataloader idx float",
        lambda: RecallAtK(query_dataloader_idx=0, reference_dataloader_idx=1.0),
        ArgumentTypeError,
        r"`reference_dataloader_idx` must be an integer >= 0, got 1\.0",
    ),
    (
        "same dataloader idx",
        lambda: RecallAtK(query_dataloader_idx=1, reference_dataloader_idx=1),
        ValueError,
        r"must differ, both are 1.*leave-one-out",
    ),
    (
        "reference loader past the last",
        lambda: validate_with_reference_idx(2),
        ValueError,
        r"reference_dataloader_idx=2, but there are only 2 val dataloader\(s\) \(valid indices 0\.\.1\)",
    ),
    (
        "dataset_size zero",
        lambda: RetrievalMetrics().update(X, Y, dataset_size=0),
        ValueError,
        r"`dataset_size` must be an integer >= 1, got 0",
    ),
    (
        "metric update float labels",
        lambda: RetrievalMetrics().update(X, Y + 0.5),
        ArgumentTypeError,
        r"`labels` must hold integer class ids, got dtype torch\.float32",
    ),
    (
        "metric update float indexes",
        lambda: RetrievalMetrics().update(X, Y, torch.arange(10.0)),
        ArgumentTypeError,
        r"`indexes` must hold integer dataset indices, got dtype torch\.float32",
    ),
    # data
    (
        "ImageFolder val_classes=[]",
        lambda: ImageFolderDataModule("no/such/dir", val_classes=[]),
        ValueError,
        r"val_classes=\[\] names no class",
    ),
    # the same integer check as every other count: a pixel size is no exception
    (
        "ImageFolder image_size=0",
        lambda: ImageFolderDataModule("no/such/dir", image_size=0),
        ValueError,
        "`image_size` must be an integer >= 1, got 0",
    ),
    (
        "ImageFolder resize_size=True",
        lambda: ImageFolderDataModule("no/such/dir", resize_size=True),
        ArgumentTypeError,
        "`resize_size` must be an integer >= 1, got True of type bool",
    ),
    (
        "ImageFolder transforms",
        lambda: ImageFolderDataModule("no/such/dir", transforms="crop"),
        ValueError,
        r"`transforms` must be one of \('standard', 'resize'\), got 'crop'",
    ),
    (
        "ImageFolder unknown argument",
        lambda: ImageFolderDataModule("no/such/dir", batchsize=8),
        TypeError,
        "unexpected keyword argument 'batchsize'",
    ),
    # index directories
    (
        "index NaN row on load",
        load_with_nan_row,
        IndexFormatError,
        r"embeddings\.npy' has 1 of 10 rows with NaN",
    ),
    (
        "index manifest dim 0",
        load_with_bad_manifest_dim,
        IndexFormatError,
        r"manifest\.json.*'embedding_dim' is 0, must be >= 1",
    ),
    (
        "index files of two saves",
        load_with_mixed_files,
        IndexFormatError,
        r"index\.faiss' holds other vectors than embeddings\.npy",
    ),
    (
        "index faiss of other size",
        load_with_faiss_of_other_size,
        IndexFormatError,
        r"index\.faiss' holds 4 vectors of dimension 4.*10 vectors",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(call, error, match, id=name) for name, call, error, match in RETRIEVAL_CASES],
)
def test_retrieval_bad_input(
    call: Callable[..., Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match) as info:
        call(tmp_path) if call.__code__.co_argcount else call()
    # Whatever the type, callers catching ValueError or TypeError (type errors) get it.
    assert isinstance(info.value, ValueError | TypeError)


def test_retrieval_table_is_large_and_its_ids_unique() -> None:
    names = [row[0] for row in RETRIEVAL_CASES]
    assert len(names) >= 25
    assert len(set(names)) == len(names)


# --- training-side cases (module, heads, PML) ---


def tiny(**kwargs: Any) -> MetricLearningModule:
    args: dict[str, Any] = dict(backbone=SmallCNN(in_channels=1, width=4), embedding_dim=8)
    args.update(kwargs)
    return MetricLearningModule(**args)


def load_python_checkpoint(tmp_path: Path, **kwargs: Any) -> MetricLearningModule:
    """A checkpoint of a module built in Python (no config), loaded with ``kwargs``."""
    model = tiny(head=ArcFaceHead, num_classes=3)
    path = tmp_path / "python.ckpt"
    checkpoint = {
        "state_dict": model.state_dict(),
        "pytorch-lightning_version": pl.__version__,
        "hyper_parameters": dict(model.hparams),
    }
    torch.save(checkpoint, path)
    return MetricLearningModule.load_from_checkpoint(path, **kwargs)


def pml_label_beyond_its_classes() -> Any:
    model = tiny(loss=losses.ArcFaceLoss(num_classes=3, embedding_size=8), num_classes=3)
    return model.training_step((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 7])), 0)


# (name, call, exception type, literal message fragment)
TRAINING_CASES: list[tuple[str, Callable[..., Any], type[Exception], str]] = [
    # one class: the loss would be exactly 0 with zero gradients
    (
        "head one class",
        lambda: ArcFaceHead(8, 1),
        ValueError,
        "`num_classes` must be an integer >= 2, got 1",
    ),
    (
        "module one class",
        lambda: tiny(head=ArcFaceHead, num_classes=1),
        ValueError,
        "`num_classes` must be an integer >= 2, got 1",
    ),
    # types and ranges of numbers
    (
        "num_classes str",
        lambda: tiny(head=ArcFaceHead, num_classes="10"),
        ArgumentTypeError,
        "`num_classes` must be an integer, got '10'",
    ),
    (
        "num_classes 10.5",
        lambda: tiny(head=ArcFaceHead, num_classes=10.5),
        ArgumentTypeError,
        "`num_classes` must be an integer, got 10.5",
    ),
    (
        "head num_classes str",
        lambda: CosFaceHead(8, "10"),
        ArgumentTypeError,
        "`num_classes` must be an integer, got '10'",
    ),
    (
        "head scale str",
        lambda: ArcFaceHead(8, 10, scale="64"),
        ArgumentTypeError,
        "`scale` must be a real number, got '64'",
    ),
    (
        "embedding_dim 0",
        lambda: tiny(head=ArcFaceHead, num_classes=3, embedding_dim=0),
        ValueError,
        "`embedding_dim` must be an integer >= 1, got 0",
    ),
    (
        "objective_lr negative",
        lambda: tiny(head=ArcFaceHead, num_classes=3, objective_lr=-1.0),
        ValueError,
        "`objective_lr` must be a finite number > 0, got -1.0",
    ),
    (
        "nonfinite choice",
        lambda: tiny(head=ArcFaceHead, num_classes=3, nonfinite="drop"),
        ValueError,
        "`nonfinite` must be one of ('raise', 'skip'), got 'drop'",
    ),
    # arguments in the wrong place or form
    (
        "loss= a margin head",
        lambda: tiny(loss=ArcFaceHead(8, 3)),
        ArgumentTypeError,
        "loss=ArcFaceHead is a margin head",
    ),
    (
        "loss= a head partial",
        lambda: tiny(loss=partial(CosFaceHead, margin=0.2)),
        ArgumentTypeError,
        "pass it as head=CosFaceHead",
    ),
    (
        "head= a PML loss",
        lambda: tiny(head=losses.ArcFaceLoss(3, 8), num_classes=3),
        ArgumentTypeError,
        "head=ArcFaceLoss is a pytorch-metric-learning loss",
    ),
    (
        "head= a PML loss class",
        lambda: tiny(head=losses.ProxyAnchorLoss, num_classes=3),
        ArgumentTypeError,
        "pass it as loss=ProxyAnchorLoss(...)",
    ),
    (
        "head= a string",
        lambda: tiny(head="ArcFaceHead", num_classes=3),
        ArgumentTypeError,
        "head must be a margin head class",
    ),
    (
        "backbone= a model name",
        lambda: tiny(backbone="resnet50", head=ArcFaceHead, num_classes=3),
        ArgumentTypeError,
        "backbone=TimmBackbone(name='resnet50')",
    ),
    (
        "backbone None",
        lambda: tiny(backbone=None, head=ArcFaceHead, num_classes=3),
        ArgumentTypeError,
        "backbone must be an nn.Module",
    ),
    (
        "neck an int",
        lambda: tiny(neck=128, head=ArcFaceHead, num_classes=3),
        ArgumentTypeError,
        "neck must be an nn.Module",
    ),
    (
        "loss a class",
        lambda: tiny(loss=losses.TripletMarginLoss),
        ArgumentTypeError,
        "pass an instance, e.g. loss=TripletMarginLoss()",
    ),
    (
        "miner a class",
        lambda: tiny(loss=losses.TripletMarginLoss(), miner=miners.BatchHardMiner),
        ArgumentTypeError,
        "miner=BatchHardMiner()",
    ),
    # PML class centres vs the model and the data
    (
        "PML embedding_size",
        lambda: tiny(loss=losses.ArcFaceLoss(num_classes=3, embedding_size=64)),
        ValueError,
        "embedding_size=64 but the model's embeddings have embedding_dim=8",
    ),
    (
        "PML num_classes",
        lambda: tiny(loss=losses.ArcFaceLoss(num_classes=3, embedding_size=8), num_classes=5),
        ValueError,
        "has num_classes=3 but num_classes=5",
    ),
    (
        "PML label past its classes",
        pml_label_beyond_its_classes,
        ValueError,
        "(num_classes=3), got label 7",
    ),
    # a head's loss
    (
        "head empty batch",
        lambda: ArcFaceHead(8, 3).loss(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
        ValueError,
        "empty batch",
    ),
    (
        "head label past num_classes",
        lambda: ArcFaceHead(8, 3).loss(torch.randn(2, 8), torch.tensor([0, 3])),
        ValueError,
        "(num_classes=3), got label 3",
    ),
    (
        "head float labels",
        lambda: ArcFaceHead(8, 3).loss(torch.randn(2, 8), torch.tensor([0.0, 1.0])),
        ArgumentTypeError,
        "must hold integer class ids",
    ),
    # checkpoints of a module built in Python
    (
        "load without modules",
        lambda tmp_path: load_python_checkpoint(tmp_path),
        TypeError,
        "load_from_checkpoint(path, backbone=SmallCNN(...), head=ArcFaceHead(...))",
    ),
    (
        "load without head",
        lambda tmp_path: load_python_checkpoint(tmp_path, backbone=SmallCNN(1, 4)),
        TypeError,
        "missing now: head",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [pytest.param(call, error, frag, id=name) for name, call, error, frag in TRAINING_CASES],
)
def test_training_bad_input(
    call: Callable[..., Any], error: type[Exception], fragment: str, tmp_path: Path
) -> None:
    with pytest.raises(error) as info:
        call(tmp_path) if call.__code__.co_argcount else call()
    assert fragment in str(info.value), str(info.value)


def test_training_table_is_large_and_its_ids_unique() -> None:
    names = [row[0] for row in TRAINING_CASES]
    assert len(names) >= 15
    assert len(set(names)) == len(names)
