"""`lightning-metric export`, `search` and `benchmark`: ship a trained model and its index, and
compare training recipes under equal conditions.

    lightning-metric export --config CFG --ckpt_path CKPT --output model.onnx   # or model.pt
    lightning-metric search --index DIR --query img.png folder/ --k 5 --output hits.csv
    lightning-metric search --index DIR --config CFG --ckpt_path CKPT --evaluate
    lightning-metric benchmark --config arcface=A.yaml,B.yaml --config ... --num_folds 4 --output DIR

All build the model (and data module) from the same YAML as ``fit``; any further
``--trainer.* / --model.* / --data.*`` flags are passed to that config as overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.batch import split_batch
from lightning_metric.checks import METRICS, check_top_k
from lightning_metric.retrieval.protocol import kept_columns
from lightning_metric.retrieval.relevance import relevant_counts

__all__ = ["COMMANDS", "run_command"]

COMMANDS = ("export", "search", "benchmark")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# ---------------------------------------------------------------------- parsers


def _parser(name: str) -> argparse.ArgumentParser:
    if name == "benchmark":
        return _benchmark_parser()
    if name == "export":
        p = argparse.ArgumentParser(
            prog="lightning-metric export",
            description=(
                "Write the trained model (input -> unit-norm embedding) as ONNX (.onnx) or "
                "TorchScript (.pt), with a dynamic batch axis, and <output>.json beside it: "
                "input shape [C, H, W], dtype, the data module's preprocessing record (colour "
                "mode, resize and centre crop, pixel scale, inversion, mean/std: what "
                "lightning_metric.data.preprocess.Preprocessing.from_dict reads back), "
                "embedding_dim and metric. The exported file is checked against the model."
            ),
        )
        p.add_argument("--config", action="append", required=True, help="YAML (repeatable)")
        p.add_argument("--ckpt_path", required=True, help="checkpoint with the trained weights")
        p.add_argument("--output", required=True, help="model.onnx or model.pt")
        p.add_argument("--metric", default="cosine", choices=METRICS)
        p.add_argument("--opset", type=int, default=17, help="ONNX opset")
        return p
    p = argparse.ArgumentParser(
        prog="lightning-metric search",
        description=(
            "Search a saved index (written by `lightning-metric predict` or "
            "EmbeddingIndex.save): images or folders given with --query are loaded with PIL, "
            "preprocessed as the index records and embedded with the model recorded in the "
            "index manifest (or --config/--ckpt_path); without --query the data module's "
            "loader (--split) gives the queries. Prints or writes (--output .json/.csv) the "
            "top-k ids, labels and scores. --evaluate reports recall@k and MAP@R of the "
            "labelled queries against the index's labels."
        ),
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", nargs="+", help="image files and/or folders of images")
    p.add_argument("--config", action="append", help="YAML for the model and data (repeatable)")
    p.add_argument("--ckpt_path", help="checkpoint (default: the one recorded in the index)")
    p.add_argument("--split", default="test", choices=("predict", "test", "val"))
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--nprobe", type=int, help="IVF lists visited (approximate indexes)")
    p.add_argument("--ef_search", type=int, help="HNSW search depth (approximate indexes)")
    p.add_argument("--output", help="write the results to a .json or .csv file")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="recall@k / MAP@R of the labelled queries (--split) against the index",
    )
    p.add_argument(
        "--allow_other_checkpoint",
        action="store_true",
        help="search although the checkpoint's sha256 differs from the one the index records",
    )
    p.add_argument("--batch_size", type=int, default=256)
    return p


def run_command(argv: Sequence[str]) -> Any:
    """Run ``export`` or ``search``; ``argv[0]`` names the command."""
    name, rest = argv[0], list(argv[1:])
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; expected one of {COMMANDS}")
    parser = _parser(name)
    args, overrides = parser.parse_known_args(rest)
    bad = [a for a in overrides if a.startswith("-") and not _is_config_flag(a)]
    if bad:
        parser.error(
            f"unrecognized arguments: {' '.join(bad)} (config overrides must start with "
            "--trainer., --model., --data. or --seed_everything)"
        )
    if overrides and not args.config:
        overrides = []  # config flags without a config (e.g. a shared smoke-test suffix)
    if name == "benchmark":
        return _benchmark(args, overrides)
    return _export(args, overrides) if name == "export" else _search(args, overrides)


def _is_config_flag(arg: str) -> bool:
    return arg.split("=", 1)[0].startswith(("--trainer.", "--model.", "--data.", "--seed_every"))


def _benchmark_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-metric benchmark",
        description=(
            "Compare training recipes as in Musgrave et al., 'A Metric Learning Reality Check' "
            "(ECCV 2020). Each --config is trained once per class-disjoint fold of the training "
            "classes (--data.init_args.num_folds K --data.init_args.fold i, one subprocess per "
            "fold, in sequence; DDP flags work as in fit), into <output>/<name>/fold_<i>; the "
            "fold's checkpoint with the best val/map@r embeds the held-out test split. Reported "
            "per config: test MAP@R, R-precision and P@1 'separate' (mean over the folds' "
            "models with a 95%% Student-t interval) and 'concatenated' (each test item's fold "
            "embeddings concatenated and L2-normalised, i.e. ranked by the folds' mean cosine), "
            "and the time, in <output>/results.json, results.md, results.png and the configs' "
            "logger. Before anything trains every config is resolved and compared with the "
            "first: only the objective (model.init_args.head / loss / miner / objective_lr) and "
            "output names may differ, unless --allow_difference KEY. Rerunning the same command "
            "resumes (finished folds are not retrained; an interrupted fold restarts, its "
            "files kept aside); other settings into the same --output are refused. Further "
            "--trainer.* / --model.* / --data.* flags apply to every config."
        ),
    )
    p.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="NAME=YAML[,YAML...]",
        help="a config to compare: YAML files merged in order (NAME defaults to the last "
        "file's name without .yaml); repeat for each config",
    )
    p.add_argument(
        "--num_folds", type=int, required=True, help="folds of the training classes (>= 2)"
    )
    p.add_argument("--output", required=True, help="the benchmark's folder")
    p.add_argument(
        "--base", action="append", default=[], help="YAML prepended to every config (repeatable)"
    )
    p.add_argument(
        "--allow_difference",
        action="append",
        default=[],
        metavar="KEY",
        help="accept configs that differ in KEY or below it, e.g. data.init_args.m_per_class "
        "(repeatable; recorded in results.json)",
    )
    p.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: report the configs whose folds have all finished (results so "
        "far of a long or interrupted benchmark)",
    )
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="resolve and check the configs and print the plan (configs, folds, commands); train nothing",
    )
    return p


def _benchmark(args: argparse.Namespace, overrides: list[str]) -> Any:
    from lightning_metric.crossval.configs import BenchmarkError
    from lightning_metric.crossval.run import run_benchmark

    try:
        return run_benchmark(
            args.config, args.num_folds, args.output, args.base, args.allow_difference,
            overrides, args.dry_run, args.report_only,
        )  # fmt: skip
    except BenchmarkError as error:
        raise SystemExit(f"lightning-metric benchmark: {error}") from error


# ---------------------------------------------------------------------- building


def _build(configs: list[str], ckpt_path: str, overrides: list[str]) -> tuple[nn.Module, Any]:
    """The model (weights from ``ckpt_path``) and data module of ``configs``."""
    from lightning_metric.cli import main

    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    argv: list[str] = []
    for config in configs:
        argv += ["--config", config]
    cli = main([*argv, *overrides, "--trainer.logger=false"], run=False)
    assert cli is not None
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cli.model.load_state_dict(state.get("state_dict", state))
    return cli.model.eval(), cli.datamodule


def _model_from_manifest(index: Any, ckpt_path: Optional[str]) -> nn.Module:
    from jsonargparse.typing import import_object

    model_info = index.info.get("model", {})
    ckpt = ckpt_path or model_info.get("checkpoint")
    class_path = model_info.get("class_path")
    if not ckpt or not class_path:
        raise ValueError(
            f"the index manifest in {str(index.directory)!r} records no model checkpoint "
            "(class_path + checkpoint); pass --config and --ckpt_path to embed the queries"
        )
    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"the index was built with checkpoint {ckpt!r}, which does not exist here; pass "
            "--ckpt_path (and --config if it was not trained with the lightning-metric CLI)"
        )
    cls = import_object(class_path)
    return cls.load_from_checkpoint(ckpt, map_location="cpu").eval()  # type: ignore[no-any-return]


def _sample_batch(datamodule: Any, split: str = "predict") -> Any:
    datamodule.setup(split if split != "val" else "validate")
    loader = getattr(datamodule, f"{split}_dataloader")()
    return next(iter(loader))


def _inputs(batch: Any) -> Tensor:
    return split_batch(batch, "lightning-metric")[0]


# ---------------------------------------------------------------------- export


def _export(args: argparse.Namespace, overrides: list[str]) -> Path:
    from lightning_metric.export import describe_input, export, sidecar_path

    model, datamodule = _build(args.config, args.ckpt_path, overrides)
    example = _inputs(_sample_batch(datamodule, "predict"))[:2].float()
    cls = type(model)
    out = export(
        model,
        args.output,
        example,
        input_info=describe_input(datamodule, example),
        metric=args.metric,
        opset=args.opset,
        extra={
            "checkpoint": str(Path(args.ckpt_path).resolve()),
            "model_class_path": f"{cls.__module__}.{cls.__qualname__}",
            "config": [str(Path(c).resolve()) for c in args.config],
        },
    )
    print(f"lightning-metric export: wrote {out} and {sidecar_path(out)}")
    return out


# ---------------------------------------------------------------------- search


def image_paths(queries: Sequence[str]) -> list[Path]:
    """Files as given; folders expanded to their images (recursively, sorted)."""
    paths: list[Path] = []
    for q in queries:
        p = Path(q)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {q!r} holds no images ({sorted(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"query {q!r} is neither an image file nor a folder")
    return paths


def load_images(paths: Sequence[Path], input_info: dict[str, Any]) -> Tensor:
    """``[N, C, H, W]`` float32: the image files read as ``input_info`` (an index manifest's
    or export sidecar's input description) records; see
    :func:`lightning_metric.data.preprocess.load_images`."""
    from lightning_metric.data.preprocess import load_images as load

    return load(paths, input_info)


@torch.no_grad()
def _embed_loader(model: nn.Module, loader: Any) -> tuple[Tensor, Tensor, Tensor]:
    model.eval()
    embeddings, labels, ids = [], [], []
    for batch in loader:
        x, label, index = split_batch(batch, "lightning-metric search")
        with torch.no_grad():  # no autograd graph kept alive across the whole split
            embeddings.append(model(x).float())
        labels.append(label)
        # No dataset index: -1, never an indexed item's id (a per-batch arange would repeat
        # ids across batches and pass queries off as indexed items in --evaluate).
        ids.append(index if index is not None else torch.full((len(label),), -1))
    return torch.cat(embeddings), torch.cat(labels), torch.cat(ids)


def _search(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from lightning_metric.retrieval.index import EmbeddingIndex, embed

    index = EmbeddingIndex.load(args.index)
    if not args.query and not args.config:
        raise SystemExit(
            "lightning-metric search: pass --query (images / folders) or --config with "
            "--ckpt_path (queries from the data module's loader)"
        )
    # Checked before a model is built and the queries embedded: these need only the index.
    check_top_k(args.k, len(index), "indexed items")
    if args.evaluate and args.query:
        raise SystemExit(
            "lightning-metric search --evaluate needs labelled queries: use --config/"
            "--ckpt_path (the data module's --split loader) instead of --query"
        )
    if args.output and Path(args.output).suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--output must end in .json or .csv, got {args.output!r}")
    # Every search of this run, --evaluate's included, uses them; a parameter the index does
    # not have (nprobe on a Flat index) is refused here, before a model is built.
    index.set_search_params(nprobe=args.nprobe, ef_search=args.ef_search)
    ckpt = args.ckpt_path or index.info.get("model", {}).get("checkpoint")
    if ckpt:
        _check_checkpoint(index, ckpt, args.allow_other_checkpoint)
    datamodule = None
    if args.config:
        if not ckpt:
            raise SystemExit("lightning-metric search: --config needs --ckpt_path")
        model, datamodule = _build(args.config, ckpt, overrides)
    else:
        model = _model_from_manifest(index, args.ckpt_path)
    index.attach_model(model)
    query_labels: Optional[Tensor] = None
    own = np.empty(0, dtype=np.int64)
    if args.query:
        paths = image_paths(args.query)
        input_info = index.info.get("input")
        if not input_info:
            raise ValueError(
                f"the index in {args.index!r} records no input preprocessing (written by an "
                "older release); rebuild it with `lightning-metric predict`"
            )
        embeddings = embed(model, load_images(paths, input_info), args.batch_size)
        names = [str(p) for p in paths]
        own = np.full(len(names), -1, dtype=np.int64)  # an image query keeps its duplicates
    else:
        assert datamodule is not None
        embeddings, query_labels, query_ids, dataset = _split_queries(model, datamodule, args.split)
        names = [f"{args.split}[{int(i)}]" for i in query_ids]
        own, matched_by = _own_rows(index, datamodule, args.split, query_ids, dataset)
        print(f"lightning-metric search: {len(names)} queries from the {args.split!r} split; "
              f"{int((own >= 0).sum())} of them are indexed items ({matched_by}), whose own "
              "entries are left out of their neighbour lists")  # fmt: skip
    output: dict[str, Any] = {"index": str(args.index), **_search_description(index, args)}
    output.update(_neighbour_lists(index, embeddings, own, names, args.k))
    if args.evaluate:
        assert query_labels is not None  # --query with --evaluate was refused above
        output["metrics"], output["evaluation"] = _evaluate(index, embeddings, query_labels, own)
    _report(output, args.output)
    return output


def _search_description(index: Any, args: argparse.Namespace) -> dict[str, Any]:
    given = {n for n in ("nprobe", "ef_search") if getattr(args, n) is not None}
    return {
        "factory": index.factory,
        "search_params": dict(index.search_params),
        "search_params_from": {
            n: ("--" + n if n in given else "manifest") for n in index.search_params
        },
    }


def _check_checkpoint(index: Any, ckpt: str, allow: bool) -> None:
    """The checkpoint that embeds the queries must be the one that produced the index
    (compared by sha256): another model's queries score like noise against it."""
    from lightning_metric.provenance import checkpoint_mismatch, checkpoint_record, unverified

    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt!r} does not exist"
            + ("" if ckpt != index.info.get("model", {}).get("checkpoint") else
               " (the index manifest records it; pass --ckpt_path where it is now, and "
               "--config if it was not trained with the lightning-metric CLI)")
        )  # fmt: skip
    recorded = index.info.get("model", {})
    given = checkpoint_record(ckpt, "checkpoint")
    reason = checkpoint_mismatch(recorded, given)
    if reason is None:
        if unverified(recorded, given):
            print(
                f"lightning-metric search: the index records checkpoint {ckpt!r} without a "
                "sha256 (an older release): the file is assumed unchanged",
                file=sys.stderr,
            )
        return
    if not allow:
        raise SystemExit(
            f"lightning-metric search: {reason}. Queries embedded by another model than the "
            "one that built the index score like noise. Search with the index's checkpoint, "
            f"rebuild the index with `lightning-metric predict --ckpt_path {ckpt}`, or pass "
            "--allow_other_checkpoint to search anyway"
        )
    print(f"lightning-metric search: WARNING (--allow_other_checkpoint): {reason}",
          file=sys.stderr)  # fmt: skip


def _split_queries(
    model: nn.Module, datamodule: Any, split: str
) -> tuple[Tensor, Tensor, Tensor, Any]:
    """Embeddings, labels and dataset ids of the ``split`` loader, and its dataset."""
    datamodule.setup(split if split != "val" else "validate")
    loader_fn = getattr(datamodule, f"{split}_dataloader", None)
    loader = loader_fn() if callable(loader_fn) else None
    if loader is None:
        raise SystemExit(
            f"lightning-metric search: {type(datamodule).__name__} has no {split!r} loader; "
            "pick another --split"
        )
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise SystemExit(
            f"lightning-metric search: the {split!r} split of {type(datamodule).__name__} "
            "holds no items: there is nothing to query"
        )
    embeddings, labels, ids = _embed_loader(model, loader)
    return embeddings, labels, ids, dataset


def _own_rows(
    index: Any, datamodule: Any, split: str, query_ids: Tensor, dataset: Any
) -> tuple[np.ndarray, str]:
    """The index row of each query that is itself an indexed item (-1 elsewhere), and how
    they were matched: by source path when both sides have paths, else by dataset id when
    the index records the same data module class and split (ids of another split or data
    set name other items)."""
    none = np.full(len(query_ids), -1, dtype=np.int64)
    ids = query_ids.numpy()
    paths = getattr(dataset, "paths", None)
    if index.paths is not None and paths is not None and (ids >= 0).all():
        where = {_norm(p): row for row, p in enumerate(index.paths)}
        found = [where.get(_norm(str(paths[i])), -1) for i in ids.tolist()]
        return np.asarray(found, dtype=np.int64), "matched by source path"
    data = index.info.get("data") or {}
    cls = type(datamodule)
    resolved = getattr(datamodule, "predict_split", None) if split == "predict" else split
    same_data = data.get("class_path") == f"{cls.__module__}.{cls.__qualname__}"
    if not data or not same_data or data.get("predict_split") != resolved:
        recorded = f"{data.get('class_path')} split {data.get('predict_split')!r}"
        return none, (
            f"none: the index records {recorded}" if data
            else "none: the index records no data module, so none can be matched"
        )  # fmt: skip
    size = data.get("dataset_size")
    if size is not None and dataset is not None and size != len(dataset):
        raise SystemExit(
            f"lightning-metric search: the index was built from {size} items of the "
            f"{resolved!r} split, the config's has {len(dataset)}: its ids name other items. "
            "Use the data configuration the index was built with"
        )
    differ = _item_settings_differ(data.get("hparams"), datamodule)
    if differ:
        # The same size by chance (another seed, fold or fraction): the ids still name other
        # items, and queries that are indexed items would find themselves unmatched.
        raise SystemExit(
            f"lightning-metric search: the index was built from the {resolved!r} split of a "
            f"data module with other item settings ({differ}): its ids name other items. "
            "Use the data configuration the index was built with"
        )
    rows = _rows_of(index, np.where(ids >= 0, ids, -1))
    return rows, "matched by dataset id"


# Data-module settings that change how items are loaded, not which items a split holds.
_LOADER_SETTINGS = frozenset(
    {"batch_size", "eval_batch_size", "num_workers", "augment", "m_per_class", "predict_split"}
)


def _item_settings_differ(recorded: Any, datamodule: Any) -> str:
    """The settings (seed, folds, fractions, ...) on which the recorded data module and the
    config's differ, as ``key: index value != config value``; empty when they agree. Dataset
    ids name the same items only when these agree."""
    if not isinstance(recorded, dict):
        return ""
    current = json.loads(json.dumps(dict(getattr(datamodule, "hparams", {})), default=str))
    keys = sorted((set(recorded) | set(current)) - _LOADER_SETTINGS)
    return ", ".join(
        f"{key}: {recorded.get(key)!r} != {current.get(key)!r}"
        for key in keys
        if recorded.get(key) != current.get(key)
    )


def _rows_of(index: Any, ids: np.ndarray) -> np.ndarray:
    """The row of each id in the index, -1 for an id it does not hold (a -1 of FAISS)."""
    if not len(index):
        return np.full(ids.shape, -1, dtype=np.int64)
    sorter = np.argsort(index.ids, kind="stable")
    pos = np.clip(np.searchsorted(index.ids, ids, sorter=sorter), 0, len(index) - 1)
    rows = sorter[pos]
    return np.where(index.ids[rows] == ids, rows, -1).astype(np.int64)


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _neighbour_lists(
    index: Any, embeddings: Tensor, own: np.ndarray, names: list[str], k: int
) -> dict[str, Any]:
    # Queries that are indexed items never list themselves: one more is searched.
    extra = 1 if (own >= 0).any() else 0
    k = check_top_k(k, len(index) - extra, "indexed items a query can retrieve")
    result = index.search(embeddings, k=k + extra, inputs=False)
    found_ids, found_scores = _without_own(index, result.ids, result.scores, own, k)
    label_of = dict(zip(index.ids.tolist(), index.labels.tolist(), strict=True))
    path_of = dict(zip(index.ids.tolist(), index.paths, strict=True)) if index.paths else {}
    results = []
    for name, ids, scores in zip(names, found_ids, found_scores, strict=True):
        results.append(
            {
                "query": name,
                "neighbours": [
                    {
                        "id": int(i),
                        "label": int(label_of.get(int(i), -1)),
                        "score": float(s),
                        **({"path": path_of[int(i)]} if int(i) in path_of else {}),
                    }
                    for i, s in zip(ids, scores, strict=True)
                ],
            }
        )
    return {"k": k, "results": results}


def _without_own(
    index: Any, ids: np.ndarray, scores: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's own entry (if found) moved to the end, stably; then the first k kept."""
    rows = torch.from_numpy(_rows_of(index, ids))
    cols = kept_columns(rows, torch.from_numpy(own), k).numpy()
    return np.take_along_axis(ids, cols, axis=1), np.take_along_axis(scores, cols, axis=1)


def _evaluate(
    index: Any, embeddings: Tensor, labels: Tensor, own: np.ndarray
) -> tuple[dict[str, float], dict[str, Any]]:
    """recall@k / MAP@R of the labelled queries, from the neighbour lists ``index.search``
    returns with its current search parameters (an approximate index is scored as it
    searches), deep enough for every query's ``R``. ``own`` is each query's own row in the
    index (-1 if it is no item of it): that entry counts neither in its list nor in its
    ``R``. Ids of -1 (not found) and unlabelled indexed items are never relevant. Also
    returns how it searched."""
    from lightning_metric.retrieval.ranking import neighbour_list_metrics

    all_labels = labels.numpy().astype(np.int64)
    labelled = all_labels >= 0
    if not labelled.any():
        raise SystemExit(
            f"lightning-metric search --evaluate: none of the {len(all_labels)} queries has a "
            "label (all are -1): there is nothing to score"
        )
    q, lab, own = embeddings[torch.from_numpy(labelled)], all_labels[labelled], own[labelled]
    inside = own >= 0
    relevant = relevant_counts(
        torch.from_numpy(lab), torch.from_numpy(index.labels), torch.from_numpy(own)
    ).numpy()
    extra = 1 if inside.any() else 0
    ks = tuple(k for k in (1, 2, 4, 8) if k <= len(index) - extra)
    if not ks:
        raise SystemExit(
            f"lightning-metric search --evaluate: the index holds {len(index)} item(s) and a "
            "query never retrieves itself: nothing to rank"
        )
    scored = relevant > 0
    need = max(ks[-1], int(relevant[scored].max()) if scored.any() else 0)
    depth = min(len(index), need + extra)
    result = index.search(q, k=depth, inputs=False)
    found = result.ids
    rows = _rows_of(index, found)
    # Equal scores in the order exact search gives them (lower row first): an IVF or HNSW
    # index lists ties in its own order, which would move hits across the k cut-offs.
    best_first = result.scores if index.metric == "l2" else -result.scores
    rows = np.take_along_axis(rows, np.lexsort((rows, best_first), axis=-1), axis=1)
    # The own entry leaves the list (the rest move up) and the freed last place is empty.
    is_own = (rows == own[:, None]) & inside[:, None]
    rows = np.take_along_axis(rows, np.argsort(is_own, axis=1, kind="stable"), axis=1)
    rows[np.sort(is_own, axis=1)] = -1
    neighbour_labels = np.where(rows >= 0, index.labels[np.maximum(rows, 0)], -1)
    metrics = neighbour_list_metrics(
        torch.from_numpy(neighbour_labels), torch.from_numpy(lab), torch.from_numpy(relevant), ks
    )
    details = {
        "factory": index.factory,
        "search_params": dict(index.search_params),
        "depth": depth,
        "queries": len(all_labels),
        "labelled_queries": int(labelled.sum()),
        "queries_in_index": int(inside.sum()),
        "not_found": int((found < 0).sum()),
    }
    return metrics, details


def _report(output: dict[str, Any], destination: Optional[str]) -> None:
    if destination:
        path = Path(destination)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
        elif path.suffix.lower() == ".csv":
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["query", "rank", "id", "label", "score", "path"])
                for r in output["results"]:
                    for rank, n in enumerate(r["neighbours"], start=1):
                        row = [r["query"], rank, n["id"], n["label"], n["score"]]
                        writer.writerow([*row, n.get("path", "")])
        else:
            raise ValueError(f"--output must end in .json or .csv, got {destination!r}")
        print(f"lightning-metric search: wrote {len(output['results'])} queries to {path}")
    else:
        shown = output["results"][:20]
        for r in shown:
            hits = "  ".join(
                f"{n['id']}(label {n['label']}, {n['score']:.3f})" for n in r["neighbours"]
            )
            print(f"{r['query']}: {hits}")
        if len(output["results"]) > len(shown):
            print(f"... {len(output['results']) - len(shown)} more queries (use --output)")
    if "metrics" in output:
        e = output["evaluation"]
        params = ", ".join(
            f"{n}={v} ({output['search_params_from'][n]})" for n, v in e["search_params"].items()
        )
        print(
            f"search/evaluate: searched index {e['factory']!r}"
            f"{' with ' + params if params else ''}, {e['depth']} neighbours deep, for "
            f"{e['labelled_queries']} labelled queries of {e['queries']} "
            f"({e['queries_in_index']} are indexed items, their own entries left out; "
            f"{e['not_found']} neighbour slots not found)"
        )
        if e["not_found"]:
            print(
                "search/evaluate: the index returned fewer neighbours than asked; the missing "
                "ones count as misses (raise --nprobe for IVF, --ef_search for HNSW)"
            )
        line = "  ".join(f"{k}={v:.4f}" for k, v in output["metrics"].items())
        print(f"search/evaluate: {line}")
    sys.stdout.flush()
