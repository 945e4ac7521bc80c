"""A table of bad or unusual inputs to `search`, `search --evaluate` and `predict`'s index
writer: each bad one raises where it enters with a message naming the value; each unusual
but valid one is checked against a count by hand.

No row trains a model: indexes are built from arrays, checkpoints are files whose hash is
all that is compared, and the refusals come before a model is built.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from repo_paths import CONFIGS

from lightning_metric.callbacks import EmbeddingIndexWriter
from lightning_metric.cli.console import main
from lightning_metric.cli.search_evaluate import evaluate as _evaluate
from lightning_metric.cli.search_queries import own_rows as _own_rows
from lightning_metric.cli.search_queries import split_queries as _split_queries
from lightning_metric.data import DigitsDataModule
from lightning_metric.provenance import checkpoint_record
from lightning_metric.retrieval import neighbour_list_metrics, retrieval_metrics
from lightning_metric.retrieval.index import EmbeddingIndex

CONFIG = str(CONFIGS / "digits_arcface.yaml")
G = torch.Generator().manual_seed(0)
X = torch.nn.functional.normalize(torch.randn(12, 4, generator=G))
Y = torch.arange(12) % 3
NONE = np.full(12, -1, dtype=np.int64)


def _checkpoint(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _index(tmp_path: Path, info: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    directory = tmp_path / f"index{len(list(tmp_path.glob('index*')))}"
    return EmbeddingIndex(X, labels=Y, info=info, **kwargs).save(directory)


def _recorded(tmp_path: Path) -> Path:
    """An index whose manifest records checkpoint a.ckpt (its sha256) and the digits test split."""
    ckpt = _checkpoint(tmp_path, "a.ckpt", b"weights of model a")
    data = {"class_path": "lightning_metric.data.digits.DigitsDataModule", "predict_split": "test"}
    return _index(tmp_path, {"model": checkpoint_record(ckpt, "checkpoint"), "data": data})


def search(tmp_path: Path, *argv: str) -> Any:
    return main(["search", "--index", str(_recorded(tmp_path)), *argv])


def argparse_error(*argv: str) -> None:
    """argparse prints its error and exits 2: the printed text becomes the message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exit_:
            raise SystemExit(f"exit {exit_.code}: {err.getvalue()}") from None


def other_checkpoint(tmp_path: Path) -> None:
    directory = _recorded(tmp_path)
    other = _checkpoint(tmp_path, "b.ckpt", b"weights of model b")
    main(["search", "--index", str(directory), "--config", CONFIG, "--ckpt_path", str(other),
          "--evaluate"])  # fmt: skip


def recorded_file_rewritten(tmp_path: Path) -> None:
    directory = _recorded(tmp_path)
    (tmp_path / "a.ckpt").write_bytes(b"a newer run wrote best.ckpt here")
    main(["search", "--index", str(directory), "--query", str(tmp_path)])


def no_provenance_with_checkpoint(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "a.ckpt", b"weights")
    main(["search", "--index", str(_index(tmp_path)), "--config", CONFIG, "--ckpt_path",
          str(ckpt)])  # fmt: skip


def old_release_other_path(tmp_path: Path) -> None:
    old = _checkpoint(tmp_path, "old.ckpt", b"weights")
    info = {"model": {"class_path": "x.Y", "checkpoint": str(old)}}  # no sha256, no weights
    new = _checkpoint(tmp_path, "new.ckpt", b"weights")
    main(["search", "--index", str(_index(tmp_path, info)), "--query", str(tmp_path),
          "--ckpt_path", str(new)])  # fmt: skip


def empty_split() -> None:
    class Empty:
        def setup(self, stage: str) -> None:
            pass

        def test_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0)))

    _split_queries(torch.nn.Identity(), Empty(), "test")


def missing_loader() -> None:
    _split_queries(torch.nn.Identity(), SimpleNamespace(setup=lambda stage: None), "predict")


def dataset_size_differs() -> None:
    index = EmbeddingIndex(X, labels=Y)
    index.info = {
        "data": {
            "class_path": "lightning_metric.data.digits.DigitsDataModule",
            "predict_split": "test",
            "dataset_size": 999,
        }
    }
    _own_rows(index, DigitsDataModule(), "test", torch.arange(5), list(range(5)))


def overwrite_another_model(tmp_path: Path) -> None:
    directory = _recorded(tmp_path)
    writer = EmbeddingIndexWriter(str(directory), overwrite="same_checkpoint")
    other = _checkpoint(tmp_path, "b.ckpt", b"weights of model b")
    writer._weights = checkpoint_record(other, "checkpoint")
    writer._check_overwrite(directory / "manifest.json")


def overwrite_from_untrained(tmp_path: Path) -> None:
    directory = _recorded(tmp_path)
    writer = EmbeddingIndexWriter(str(directory), overwrite="same_checkpoint")
    writer._weights = checkpoint_record(None, "as given, no checkpoint (allow_untrained)")
    writer._check_overwrite(directory / "manifest.json")


def predict_untrained(tmp_path: Path) -> None:
    main(["predict", "--config", CONFIG, "--trainer.logger=false",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_predict_batches=1"])  # fmt: skip


def evaluate(labels: torch.Tensor, own: np.ndarray = NONE, index: Any = None) -> Any:
    return _evaluate(index or EmbeddingIndex(X, labels=Y), X, labels, own)


# (id, call, exception, message regex); a call taking an argument gets pytest's tmp_path.
BAD: list[tuple[str, Callable[..., Any], type[BaseException], str]] = [
    ("k zero", lambda t: search(t, "--query", "a.png", "--k", "0"), ValueError,
     r"`k` must be an integer >= 1, got 0"),
    ("k larger than the index", lambda t: search(t, "--query", "a.png", "--k", "13"),
     ValueError, r"k=13 is larger than the number of indexed items \(12\)"),
    ("nprobe on a Flat index", lambda t: search(t, "--query", "a.png", "--nprobe", "4"),
     ValueError, r"`nprobe`=4 applies to IVF indexes .*'Flat'"),
    ("ef_search on an IVF index",
     lambda t: main(["search", "--index", str(_index(t, factory="IVF2,Flat")), "--query", "a",
                     "--ef_search", "8"]),
     ValueError, r"`ef_search`=8 applies to HNSW indexes.*'IVF2,Flat'"),
    ("ef_search zero",
     lambda t: main(["search", "--index", str(_index(t, factory="HNSW4")), "--query", "a",
                     "--ef_search", "0"]),
     ValueError, r"`ef_search` must be an integer >= 1, got 0"),
    ("output of another type", lambda t: search(t, "--query", "a.png", "--output", "hits.txt"),
     ValueError, r"--output must end in \.json or \.csv, got 'hits\.txt'"),
    ("split train", lambda: argparse_error("search", "--index", "x", "--split", "train"),
     SystemExit, r"(?s)exit 2: .*--split: invalid choice: 'train'"),
    ("neither query nor config", lambda t: search(t), SystemExit, r"pass --query .* or --config"),
    ("missing checkpoint file",
     lambda t: search(t, "--config", CONFIG, "--ckpt_path", str(t / "gone.ckpt")),
     FileNotFoundError, r"checkpoint '.*gone\.ckpt' does not exist"),
    ("checkpoint of another model", other_checkpoint, SystemExit,
     r"a\.ckpt' \(sha256 [0-9a-f]{12}\.\.\.\), but checkpoint '.*b\.ckpt' has sha256 "
     r"[0-9a-f]{12}.*--allow_other_checkpoint"),
    ("recorded checkpoint rewritten since", recorded_file_rewritten, SystemExit,
     r"a\.ckpt' \(sha256 .*another model"),
    ("manifest without provenance, given a checkpoint", no_provenance_with_checkpoint,
     SystemExit, r"records no checkpoint \(no provenance recorded \(an older release\?\)\)"),
    ("manifest without provenance, no checkpoint",
     lambda t: main(["search", "--index", str(_index(t)), "--query", str(t)]),
     ValueError, r"records no model checkpoint .*pass --config and --ckpt_path"),
    ("older manifest, another checkpoint path", old_release_other_path, SystemExit,
     r"old\.ckpt' \(no sha256 recorded\) and the checkpoint given is '.*new\.ckpt'"),
    ("evaluate image queries", lambda t: search(t, "--query", str(t), "--evaluate"),
     SystemExit, r"--evaluate needs labelled queries: use --config/--ckpt_path"),
    ("all queries unlabelled", lambda: evaluate(torch.full((12,), -1)), SystemExit,
     r"none of the 12 queries has a label"),
    ("one-item index, query inside",
     lambda: _evaluate(EmbeddingIndex(X[:1], labels=Y[:1]), X[:1], Y[:1], np.array([0])),
     SystemExit, r"index holds 1 item\(s\) and a query never retrieves itself"),
    ("empty split", empty_split, SystemExit, r"the 'test' split of Empty holds no items"),
    ("split without a loader", missing_loader, SystemExit,
     r"SimpleNamespace has no 'predict' loader; pick another --split"),
    ("data of another size than the index's", dataset_size_differs, SystemExit,
     r"built from 999 items of the 'test' split, the config's has 5"),
    ("neighbour labels float",
     lambda: neighbour_list_metrics(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1, 1])),
     ValueError, r"must be an integer \[num_queries, L\] array, got dtype torch\.float32"),
    ("neighbour lists too short",
     lambda: neighbour_list_metrics(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]),
                                    torch.tensor([1, 1]), k=8),
     ValueError, r"holds 2 neighbours per query, but 8 are needed \(max k = 8"),
    ("neighbour lists shorter than R",
     lambda: neighbour_list_metrics(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]),
                                    torch.tensor([5, 1]), k=1),
     ValueError, r"but 5 are needed \(max k = 1, largest R = 5"),
    ("query label negative",
     lambda: neighbour_list_metrics(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, -1]),
                                    torch.tensor([1, 1]), k=1),
     ValueError, r"`query_labels` must be >= 0 .*got -1"),
    ("query labels of another length",
     lambda: neighbour_list_metrics(torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 1]),
                                    torch.tensor([1, 1, 1]), k=1),
     ValueError, r"`query_labels` must have 3 entries, got 2"),
    ("relevant count negative",
     lambda: neighbour_list_metrics(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]),
                                    torch.tensor([-2]), k=1),
     ValueError, r"`relevant_counts` must be >= 0, got -2"),
    ("writer overwrite word", lambda: EmbeddingIndexWriter("out", overwrite="yes"), ValueError,
     r"overwrite must be True, False or 'same_checkpoint', got 'yes'"),
    ("writer allow_untrained string", lambda: EmbeddingIndexWriter("out", allow_untrained="no"),
     ValueError, r"allow_untrained must be True or False, got 'no'"),
    ("default index of another checkpoint", overwrite_another_model, FileExistsError,
     r"another model.*a\.ckpt' \(sha256 .*b\.ckpt' has sha256 .*overwrite=true"),
    ("default index, untrained weights", overwrite_from_untrained, FileExistsError,
     r"come from no checkpoint \(as given, no checkpoint \(allow_untrained\)\)"),
    ("predict without a checkpoint", predict_untrained, ValueError,
     r"global_step 0.*untrained model.*--ckpt_path CKPT.*allow_untrained=true"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"), [pytest.param(c, e, m, id=n) for n, c, e, m in BAD]
)
def test_bad_input(
    call: Callable[..., Any], error: type[BaseException], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path) if call.__code__.co_argcount else call()


# -- unusual but valid: checked against a count by hand ---------------------------------------


def test_unlabelled_queries_are_left_out_and_counted() -> None:
    labels = Y.clone()
    labels[[0, 5]] = -1
    metrics, details = evaluate(labels)
    keep = labels >= 0
    expected = retrieval_metrics(X[keep], labels[keep], reference_embeddings=X,
                                 reference_labels=Y, k=(1, 2, 4, 8))  # fmt: skip
    assert details["labelled_queries"] == 10 and details["queries"] == 12
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_queries_of_a_class_the_index_lacks_are_unscorable() -> None:
    labels = Y.clone()
    labels[:4] = 7  # no indexed item has label 7
    metrics, _ = evaluate(labels, np.arange(12))  # the queries are the indexed items
    assert metrics["unscorable_queries"] == 4.0
    hand = []
    for q in range(4, 12):
        order = [i for i in torch.argsort(X @ X[q], descending=True, stable=True) if i != q]
        hand.append(float(Y[order[0]] == labels[q]))
    assert metrics["recall@1"] == pytest.approx(np.mean(hand), abs=1e-12)


def test_unlabelled_indexed_items_are_never_relevant() -> None:
    index_labels = Y.clone()
    index_labels[1::3] = -1  # class 1 unknown in the index: its queries are unscorable
    index = EmbeddingIndex(X, labels=index_labels)
    metrics, _ = evaluate(Y, np.arange(12), index)
    assert metrics["unscorable_queries"] == 4.0
    expected = retrieval_metrics(X, index_labels.clamp(min=0) + 10 * (index_labels < 0),
                                 query_mask=index_labels >= 0, k=(1, 2, 4, 8))  # fmt: skip
    for key in ("recall@1", "map@r"):
        # an unknown item is another class (10) for every labelled query
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key


def test_approximate_index_misses_count_as_non_relevant() -> None:
    x = torch.nn.functional.normalize(torch.randn(40, 4, generator=G))
    labels = torch.arange(40) % 2
    index = EmbeddingIndex(x, labels=labels, factory="IVF8,Flat", nprobe=1)
    metrics, details = _evaluate(index, x, labels, np.arange(40))
    depth = details["depth"]
    found = index.search(x, k=depth)
    assert details["not_found"] == int((found.ids < 0).sum()) > 0
    aps = []
    for q in range(40):
        row = [
            int(i)
            for _, i in sorted(zip((-found.scores[q]).tolist(), found.ids[q].tolist(), strict=True))
        ]
        hits = [i >= 0 and int(labels[i]) == int(labels[q]) for i in row if i != q]
        r = 19
        aps.append(sum(sum(hits[:n]) / n for n in range(1, r + 1) if hits[n - 1]) / r)
    assert metrics["map@r"] == pytest.approx(np.mean(aps), abs=1e-12)


def test_another_split_of_the_same_data_is_not_matched_by_id() -> None:
    index = EmbeddingIndex(X, labels=Y)
    index.info = {"data": {"class_path": "lightning_metric.data.digits.DigitsDataModule",
                           "predict_split": "val"}}  # fmt: skip
    rows, how = _own_rows(index, DigitsDataModule(), "test", torch.arange(12), list(range(12)))
    assert (rows == -1).all() and "split 'val'" in how
    same, how = _own_rows(index, DigitsDataModule(), "val", torch.arange(3), list(range(12)))
    assert same.tolist() == [0, 1, 2] and how == "matched by dataset id"


def test_another_fold_or_seed_of_the_same_split_is_not_matched_by_id() -> None:
    """Ids of fold 0's val split name other digits than fold 1's (or another seed's): the
    index's recorded data settings must agree before ids are matched, else search refuses
    (queries that are indexed items would otherwise find themselves)."""
    index = EmbeddingIndex(X, labels=Y)
    recorded = DigitsDataModule(num_folds=2, fold=0)
    hparams = json.loads(json.dumps(dict(recorded.hparams), default=str))
    index.info = {"data": {"class_path": "lightning_metric.data.digits.DigitsDataModule",
                           "predict_split": "val", "hparams": hparams}}  # fmt: skip
    for other, differ in (
        (DigitsDataModule(num_folds=2, fold=1), r"fold: 0 != 1"),
        (DigitsDataModule(num_folds=2, fold=0, seed=1), r"seed: 0 != 1"),
    ):
        with pytest.raises(SystemExit, match=rf"other item settings \({differ}\)"):
            _own_rows(index, other, "val", torch.arange(3), list(range(12)))
    loader_only = DigitsDataModule(num_folds=2, fold=0, batch_size=7, num_workers=1)
    same, how = _own_rows(index, loader_only, "val", torch.arange(3), list(range(12)))
    assert same.tolist() == [0, 1, 2] and how == "matched by dataset id"


def test_k_equal_to_the_index_size_with_indexed_queries_is_refused_later(tmp_path: Path) -> None:
    """k = len(index) passes the early check, but a query that is an indexed item can list
    only the others: the message says so, not FAISS."""
    from lightning_metric.cli.search import neighbour_lists as _neighbour_lists

    index = EmbeddingIndex(X, labels=Y)
    with pytest.raises(ValueError, match=r"k=12 is larger than .*indexed items a query can "):
        _neighbour_lists(index, X, np.arange(12), [str(i) for i in range(12)], 12)
    out = _neighbour_lists(index, X, np.arange(12), [str(i) for i in range(12)], 11)
    ids = np.array([[n["id"] for n in r["neighbours"]] for r in out["results"]])
    assert sorted(ids[3].tolist()) == [i for i in range(12) if i != 3]


def test_manifest_json_is_what_search_reads(tmp_path: Path) -> None:
    """The provenance is plain JSON in the manifest (no pickles): what the refusals read."""
    directory = _recorded(tmp_path)
    model = json.loads((directory / "manifest.json").read_text())["info"]["model"]
    import hashlib

    assert model["checkpoint_sha256"] == hashlib.sha256(b"weights of model a").hexdigest()
