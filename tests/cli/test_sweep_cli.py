"""A table of bad and unusual inputs to the command line's plumbing: the one embed helper
(``embed``, ``embed_loader``), the protocol's tie order and own-row removal that ``search
--evaluate`` uses, and the argparse command dispatch.

Each row is ``(name, call, exception type, message regex)``: the call raises where the value
enters, with a message naming it; or, for an unusual but valid input, ``(name, call, None,
None)`` where the call itself asserts its result against ground truth (brute force, the
model run by hand)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_metric.checks import ArgumentTypeError
from lightning_metric.cli.commands import run_command
from lightning_metric.retrieval.index import EmbeddingIndex, embed, embed_loader
from lightning_metric.retrieval.protocol import kept_columns, order_ties, without_excluded

G = torch.Generator().manual_seed(0)
X = torch.randn(7, 3, generator=G)
LINEAR = nn.Linear(3, 2)


class Returns(nn.Module):
    """A model whose forward returns ``make(x)``: a tuple, a dict, a list, ..."""

    def __init__(self, make: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.make = make
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Any:
        return self.make(x)


class RecordsMode(nn.Linear):
    """Linear that records whether it ran in training mode and with autograd on."""

    def __init__(self) -> None:
        super().__init__(3, 2)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return super().forward(x)


def _by_hand(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).float()


# ------------------------------------------------------------------ valid rows (ground truth)


def embed_in_batches_equals_one_call() -> None:
    for batch_size in (1, 2, 7, 100):
        torch.testing.assert_close(embed(LINEAR, X, batch_size), _by_hand(LINEAR, X))


def embed_of_an_empty_tensor_is_empty_with_the_model_width() -> None:
    out = embed(LINEAR, X[:0], batch_size=4)
    assert out.shape == (0, 2) and out.dtype == torch.float32


def embed_of_numpy_float64_is_float32() -> None:
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    out = embed(nn.Flatten(), x, batch_size=3)  # no parameters: nothing to move to
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), x.astype(np.float32))


def embed_runs_in_eval_mode_without_grad_and_restores_the_mode() -> None:
    model = RecordsMode().train()
    out = embed(model, X, batch_size=3)
    assert model.seen == [(False, False)] * 3 and model.training
    assert out.grad_fn is None and not out.requires_grad
    model.eval()
    embed(model, X)
    assert not model.training


def embed_restores_the_mode_when_the_model_fails() -> None:
    model = Returns(lambda x: 1 / 0).train()
    with pytest.raises(ZeroDivisionError):
        embed(model, X)
    assert model.training


def embed_loader_gives_ids_or_minus_one_per_batch() -> None:
    y = torch.arange(7) % 3
    loader = [
        {"x": X[:3], "label": y[:3], "index": torch.tensor([10, 11, 12])},
        (X[3:5], y[3:5]),  # no index: -1, never a made-up id
        (X[5:], y[5:], torch.tensor([40, 41])),
    ]
    emb, labels, ids = embed_loader(LINEAR, loader)
    torch.testing.assert_close(emb, _by_hand(LINEAR, X))
    assert labels.tolist() == y.tolist()
    assert ids.tolist() == [10, 11, 12, -1, -1, 40, 41]


def embed_loader_equals_embed() -> None:
    loader = [(X[i : i + 2], torch.zeros(len(X[i : i + 2]))) for i in range(0, 7, 2)]
    torch.testing.assert_close(embed_loader(LINEAR, loader)[0], embed(LINEAR, X))


def order_ties_matches_a_brute_force_sort() -> None:
    rng = random.Random(0)
    for descending in (True, False):
        for _ in range(20):
            values = torch.tensor([[float(rng.randint(0, 3)) for _ in range(6)] for _ in range(4)])
            indices = torch.stack([torch.randperm(9, generator=G)[:6] for _ in range(4)])
            got_v, got_i = order_ties(values, indices, descending)
            for row in range(4):
                pairs = list(zip(values[row].tolist(), indices[row].tolist(), strict=True))
                sign = -1 if descending else 1
                want = sorted(pairs, key=lambda p: (sign * p[0], p[1]))
                assert list(zip(got_v[row].tolist(), got_i[row].tolist(), strict=True)) == want


def order_ties_puts_not_found_last() -> None:
    # FAISS fills missing neighbours with id -1 and the worst possible score.
    worst = torch.finfo(torch.float32).max
    values = torch.tensor([[-worst, 0.5, -worst, 0.5]])
    v, i = order_ties(values, torch.tensor([[-1, 8, -1, 3]]), descending=True)
    assert i.tolist() == [[3, 8, -1, -1]]
    v, i = order_ties(torch.tensor([[worst, 0.2, 0.2]]), torch.tensor([[-1, 5, 1]]), False)
    assert i.tolist() == [[1, 5, -1]]


def without_excluded_matches_list_removal() -> None:
    for _ in range(30):
        indices = torch.stack([torch.randperm(12, generator=G)[:5] for _ in range(6)])
        indices[torch.rand(indices.shape, generator=G) < 0.15] = -1  # not found
        exclude = torch.randint(-1, 12, (6,), generator=G)
        got = without_excluded(indices, exclude).tolist()
        for row, own, out in zip(indices.tolist(), exclude.tolist(), got, strict=True):
            kept = [i for i in row if own < 0 or i != own]
            assert out == kept + [-1] * (len(row) - len(kept))


def without_excluded_with_no_exclusion_is_the_identity() -> None:
    indices = torch.tensor([[4, 1, -1], [0, 2, 3]])
    assert torch.equal(without_excluded(indices, None), indices)
    assert torch.equal(without_excluded(indices, torch.tensor([-1, -1])), indices)


# ------------------------------------------------------------------ bad inputs


def _index(tmp_path: Path) -> str:
    emb = torch.nn.functional.normalize(torch.randn(12, 3, generator=G))
    return str(EmbeddingIndex(emb, labels=torch.arange(12) % 2).save(tmp_path / "index"))


def search(tmp_path: Path, *argv: str) -> Any:
    return run_command(["search", "--index", _index(tmp_path), *argv])


CASES: list[tuple[str, Callable[..., Any], type[BaseException] | None, str | None]] = [
    (
        "embed batch_size 0",
        lambda: embed(LINEAR, X, 0),
        ValueError,
        r"`batch_size` must be an integer >= 1, got 0",
    ),
    (
        "embed batch_size float",
        lambda: embed(LINEAR, X, 2.0),
        ArgumentTypeError,
        r"`batch_size` must be an integer >= 1, got 2\.0 of type float",
    ),
    (
        "embed batch_size str",
        lambda: embed(LINEAR, X, "4"),
        ArgumentTypeError,
        r"`batch_size` .* got '4' of type str",
    ),
    (
        "embed model returns a tuple",
        lambda: embed(Returns(lambda x: (x, x)), X),
        ValueError,
        r"the model must return an embeddings tensor \[batch, dim\], got tuple",
    ),
    (
        "embed model returns a dict",
        lambda: embed(Returns(lambda x: {"e": x}), X, 2),
        ValueError,
        r"must return an embeddings tensor.*got dict",
    ),
    (
        "embed_loader model returns a list",
        lambda: embed_loader(Returns(lambda x: [x]), [(X, torch.zeros(7))]),
        ValueError,
        r"must return an embeddings tensor.*got list",
    ),
    (
        "embed_loader of no batches",
        lambda: embed_loader(LINEAR, []),
        ValueError,
        r"the loader held no batches: nothing to embed",
    ),
    (
        "embed_loader batch without label",
        lambda: embed_loader(LINEAR, [{"x": X}], "lightning-metric search"),
        ValueError,
        r"lightning-metric search: a batch dict needs keys 'x' and 'label'.*missing \['label'\]",
    ),
    (
        "embed_loader batch of four",
        lambda: embed_loader(LINEAR, [(X, X, X, X)]),
        ValueError,
        r"embed_loader: expected a batch .* got tuple",
    ),
    (
        "embed_loader bare tensor batch",
        lambda: embed_loader(LINEAR, [X]),
        ValueError,
        r"expected a batch .* got Tensor",
    ),
    (
        "order_ties shapes differ",
        lambda: order_ties(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.long), True),
        ValueError,
        r"values and indices must be .* same shape, got \[2, 4\] and \[2, 3\]",
    ),
    (
        "order_ties 1-d",
        lambda: order_ties(torch.zeros(4), torch.arange(4), True),
        ValueError,
        r"\[queries, neighbours\] .* got \[4\] and \[4\]",
    ),
    (
        "without_excluded one exclude for two rows",
        lambda: without_excluded(torch.tensor([[1, 2], [2, 1]]), torch.tensor([2])),
        ValueError,
        r"exclude must hold one reference row per query, shape \[2\], got shape \[1\]",
    ),
    (
        "kept_columns exclude too long",
        lambda: kept_columns(torch.tensor([[1, 2, 3]]), torch.tensor([2, 3]), 2),
        ValueError,
        r"shape \[1\], got shape \[2\] for indices of shape \[1, 3\]",
    ),
    (
        "unknown command",
        lambda: run_command(["serve"]),
        ValueError,
        r"unknown command 'serve'; expected one of \('export', 'search', 'benchmark', 'convert-checkpoint'\)",
    ),
    (
        "export missing checkpoint",
        lambda t: run_command(
            [
                "export",
                "--config",
                "c.yaml",
                "--ckpt_path",
                str(t / "no.ckpt"),
                "--output",
                str(t / "m.onnx"),
            ]
        ),
        FileNotFoundError,
        r"checkpoint '.*no\.ckpt' does not exist",
    ),
    (
        "search without queries",
        lambda t: search(t),
        SystemExit,
        r"pass --query \(images / folders\) or --config with --ckpt_path",
    ),
    (
        "search k 0",
        lambda t: search(t, "--query", "x.png", "--k", "0"),
        ValueError,
        r"`k` must be an integer >= 1, got 0",
    ),
    (
        "search k beyond the index",
        lambda t: search(t, "--query", "x.png", "--k", "13"),
        ValueError,
        r"k=13 is larger than the number of indexed items \(12\); use k <= 12",
    ),
    (
        "search evaluate with images",
        lambda t: search(t, "--query", "x.png", "--evaluate"),
        SystemExit,
        r"--evaluate needs labelled queries: use --config/--ckpt_path",
    ),
    (
        "search output txt",
        lambda t: search(t, "--query", "x.png", "--output", "hits.txt"),
        ValueError,
        r"--output must end in \.json or \.csv, got 'hits\.txt'",
    ),
    (
        "search nprobe on a flat index",
        lambda t: search(t, "--query", "x.png", "--nprobe", "4"),
        ValueError,
        r"`nprobe`=4 applies to IVF indexes .* this index is 'Flat'",
    ),
    (
        "search config without checkpoint",
        lambda t: search(t, "--config", "c.yaml"),
        SystemExit,
        r"lightning-metric search: --config needs --ckpt_path",
    ),
    (
        "benchmark of one fold",
        lambda t: run_command(
            ["benchmark", "--config", "a=a.yaml", "--num_folds", "1", "--output", str(t)]
        ),
        SystemExit,
        r"lightning-metric benchmark: --num_folds must be an integer >= 2 .* got 1",
    ),
]
VALID = [
    embed_in_batches_equals_one_call,
    embed_of_an_empty_tensor_is_empty_with_the_model_width,
    embed_of_numpy_float64_is_float32,
    embed_runs_in_eval_mode_without_grad_and_restores_the_mode,
    embed_restores_the_mode_when_the_model_fails,
    embed_loader_gives_ids_or_minus_one_per_batch,
    embed_loader_equals_embed,
    order_ties_matches_a_brute_force_sort,
    order_ties_puts_not_found_last,
    without_excluded_matches_list_removal,
    without_excluded_with_no_exclusion_is_the_identity,
]
ROWS = CASES + [(f.__name__, f, None, None) for f in VALID]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(call, error, match, id=name) for name, call, error, match in ROWS],
)
def test_cli_plumbing_input(
    call: Callable[..., Any], error: type[BaseException] | None, match: str | None, tmp_path: Path
) -> None:
    def run() -> Any:
        return call(tmp_path) if call.__code__.co_argcount else call()

    if error is None:
        run()
        return
    with pytest.raises(error, match=match):
        run()


def test_unrecognised_flags_are_refused_with_the_flag_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as info:
        search(tmp_path, "--query", "x.png", "--bogus", "1")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "--trainer., --model., --data." in err


def test_the_table_is_large_and_its_names_unique() -> None:
    names = [row[0] for row in ROWS]
    assert len(CASES) >= 20 and len(names) >= 30
    assert len(set(names)) == len(names)
