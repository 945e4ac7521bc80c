"""`lightning-metric search`: query a saved index with image files or a data module's split,
print or write the neighbour lists, and (``--evaluate``) score them. The queries come from
:mod:`.search_queries`, the scores from :mod:`.search_evaluate`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.checks import check_top_k
from lightning_metric.cli.build import build
from lightning_metric.cli.search_evaluate import evaluate
from lightning_metric.cli.search_queries import image_paths, own_rows, rows_of, split_queries
from lightning_metric.retrieval.protocol import kept_columns

__all__ = ["neighbour_lists", "parser", "run"]


def parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--rescore_multiplier",
        type=int,
        help="int8 / binary indexes: re-rank this many times k code candidates by the float "
        "vectors (default: the index's own setting)",
    )
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


def run(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Search (and with ``--evaluate`` score) as ``args`` ask; returns what it printed or
    wrote: the index's search settings, the neighbour lists, and the metrics."""
    from lightning_metric.data.preprocess import load_images
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
    if args.rescore_multiplier is not None:
        index.set_rescore_multiplier(args.rescore_multiplier)
    ckpt = args.ckpt_path or index.info.get("model", {}).get("checkpoint")
    if ckpt:
        _check_checkpoint(index, ckpt, args.allow_other_checkpoint)
    datamodule = None
    if args.config:
        if not ckpt:
            raise SystemExit("lightning-metric search: --config needs --ckpt_path")
        model, datamodule = build(args.config, ckpt, overrides)
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
        embeddings, query_labels, query_ids, dataset = split_queries(model, datamodule, args.split)
        names = [f"{args.split}[{int(i)}]" for i in query_ids]
        own, matched_by = own_rows(index, datamodule, args.split, query_ids, dataset)
        print(f"lightning-metric search: {len(names)} queries from the {args.split!r} split; "
              f"{int((own >= 0).sum())} of them are indexed items ({matched_by}), whose own "
              "entries are left out of their neighbour lists")  # fmt: skip
    output: dict[str, Any] = {"index": str(args.index), **_search_description(index, args)}
    output.update(neighbour_lists(index, embeddings, own, names, args.k))
    if args.evaluate:
        assert query_labels is not None  # --query with --evaluate was refused above
        output["metrics"], output["evaluation"] = evaluate(index, embeddings, query_labels, own)
    _report(output, args.output)
    return output


def _search_description(index: Any, args: argparse.Namespace) -> dict[str, Any]:
    given = {n for n in ("nprobe", "ef_search") if getattr(args, n) is not None}
    return {
        "factory": index.factory,
        "precision": index.precision,
        "dim": index.index_dim,
        "rescore_multiplier": index.rescore_multiplier,
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


def neighbour_lists(
    index: Any, embeddings: Tensor, own: np.ndarray, names: list[str], k: int
) -> dict[str, Any]:
    """``{"k", "results"}``: each query's ``k`` nearest indexed items (id, label, score and
    path when the index has paths), its own entry (``own``, -1 for none) left out."""
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
    rows = torch.from_numpy(rows_of(index, ids))
    cols = kept_columns(rows, torch.from_numpy(own), k).numpy()
    return np.take_along_axis(ids, cols, axis=1), np.take_along_axis(scores, cols, axis=1)


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
