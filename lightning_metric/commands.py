"""`lightning-metric export` and `lightning-metric search`: ship a trained model and its index.

    lightning-metric export --config CFG --ckpt_path CKPT --output model.onnx   # or model.pt
    lightning-metric search --index DIR --query img.png folder/ --k 5 --output hits.csv
    lightning-metric search --index DIR --config CFG --ckpt_path CKPT --evaluate

Both build the model (and data module) from the same YAML as ``fit``; any further
``--trainer.* / --model.* / --data.*`` flags are passed to that config as overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.batch import split_batch
from lightning_metric.checks import METRICS

__all__ = ["COMMANDS", "run_command"]

COMMANDS = ("export", "search")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# ---------------------------------------------------------------------- parsers


def _parser(name: str) -> argparse.ArgumentParser:
    if name == "export":
        p = argparse.ArgumentParser(
            prog="lightning-metric export",
            description=(
                "Write the trained model (input -> unit-norm embedding) as ONNX (.onnx) or "
                "TorchScript (.pt), with a dynamic batch axis, and <output>.json beside it: "
                "input shape [C, H, W], dtype, preprocessing (pixel scale, mean/std), "
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
    return _export(args, overrides) if name == "export" else _search(args, overrides)


def _is_config_flag(arg: str) -> bool:
    return arg.split("=", 1)[0].startswith(("--trainer.", "--model.", "--data.", "--seed_every"))


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
    datamodule = None
    if args.config:
        ckpt = args.ckpt_path or index.info.get("model", {}).get("checkpoint")
        if not ckpt:
            raise SystemExit("lightning-metric search: --config needs --ckpt_path")
        model, datamodule = _build(args.config, ckpt, overrides)
    else:
        model = _model_from_manifest(index, args.ckpt_path)
    index.attach_model(model)
    query_labels: Optional[Tensor] = None
    query_ids = torch.empty(0, dtype=torch.int64)
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
    else:
        assert datamodule is not None
        datamodule.setup(args.split if args.split != "val" else "validate")
        loader = getattr(datamodule, f"{args.split}_dataloader")()
        embeddings, query_labels, query_ids = _embed_loader(model, loader)
        names = [f"{args.split}[{int(i)}]" for i in query_ids]
    # Queries read from the split the index was built from are indexed items themselves:
    # like --evaluate, their lists leave out their own entry (always the top hit otherwise).
    own = query_ids.numpy() if _same_split(index, args, query_ids) else None
    extra = 1 if own is not None else 0
    k = min(args.k, len(index) - extra)
    result = index.search(
        embeddings, k=k + extra, inputs=False, nprobe=args.nprobe, ef_search=args.ef_search
    )
    found_ids, found_scores = result.ids, result.scores
    if own is not None:
        # Each row's own id (if found) moves to the end, stably; then the first k are kept.
        order = np.argsort(found_ids == own[:, None], axis=1, kind="stable")[:, :k]
        found_ids = np.take_along_axis(found_ids, order, axis=1)
        found_scores = np.take_along_axis(found_scores, order, axis=1)
    output: dict[str, Any] = {"index": str(args.index), "k": k, "results": []}
    label_of = dict(zip(index.ids.tolist(), index.labels.tolist(), strict=True))
    path_of = dict(zip(index.ids.tolist(), index.paths, strict=True)) if index.paths else {}
    for name, ids, scores in zip(names, found_ids, found_scores, strict=True):
        output["results"].append(
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
    if args.evaluate:
        if query_labels is None:
            raise SystemExit(
                "lightning-metric search --evaluate needs labelled queries: use --config/"
                "--ckpt_path (the data module's --split loader) instead of --query"
            )
        output["metrics"] = _evaluate(index, embeddings, query_labels, query_ids, args.split)
    _report(output, args.output)
    return output


def _same_split(index: Any, args: argparse.Namespace, query_ids: Tensor) -> bool:
    """Whether the queries are items of the index: read from the split it was built from."""
    if args.query or not len(query_ids):
        return False
    same = index.info.get("data", {}).get("predict_split") == args.split
    return bool(same and np.isin(query_ids.numpy(), index.ids).any())


def _evaluate(
    index: Any, embeddings: Tensor, labels: Tensor, query_ids: Tensor, split: str
) -> dict[str, float]:
    """recall@k / MAP@R of the queries against the index. Queries that are indexed items
    themselves (the index holds the same split) never retrieve their own entry."""
    from lightning_metric.retrieval import retrieval_metrics

    same_split = index.info.get("data", {}).get("predict_split") == split
    known = index.labels >= 0
    ref = torch.from_numpy(index.embeddings[known])
    ref_labels = torch.from_numpy(index.labels[known])
    ref_ids = torch.from_numpy(index.ids[known])
    inside = (
        torch.isin(query_ids, ref_ids) if same_split else torch.zeros_like(labels, dtype=torch.bool)
    )
    extra_emb, extra_labels = embeddings[~inside], labels[~inside]
    all_emb = torch.cat([ref, extra_emb])
    all_labels = torch.cat([ref_labels, extra_labels.to(torch.int64)])
    query_mask = torch.cat(
        [torch.isin(ref_ids, query_ids[inside]), torch.ones(len(extra_emb), dtype=torch.bool)]
    )
    reference_mask = torch.cat(
        [torch.ones(len(ref), dtype=torch.bool), torch.zeros(len(extra_emb), dtype=torch.bool)]
    )
    candidates = len(ref) - (1 if bool(inside.any()) else 0)
    return retrieval_metrics(
        all_emb,
        all_labels,
        k=tuple(k for k in (1, 2, 4, 8) if k <= candidates),
        query_mask=query_mask,
        reference_mask=reference_mask,
        metric=index.metric,
    )


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
        line = "  ".join(f"{k}={v:.4f}" for k, v in output["metrics"].items())
        print(f"search/evaluate: {line}")
    sys.stdout.flush()
