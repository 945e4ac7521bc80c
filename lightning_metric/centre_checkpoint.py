"""Sharded class centres on disk: every rank writes its own rows through
``torch.distributed.checkpoint`` (DCP), and any world size reads back only the rows it owns.

Layout of a checkpoint ``path`` (what :class:`~lightning_metric.strategies.ShardedCentresDDPStrategy`
writes for a head with ``shard_classes=True``):

* ``path``: Lightning's ordinary checkpoint file (written by rank 0): every weight, optimizer
  and loop state *except* the class centres and their optimizer moments; its
  :data:`~lightning_metric.heads.sharding.CHECKPOINT_KEY` entry says where they are.
  ``torch.load``, ``load_from_checkpoint`` and ``test`` / ``predict`` / ``export --ckpt_path``
  read this file alone, under any strategy: inference never reads the centres.
* ``path.centres/``: one DCP checkpoint holding the centres and their moments in row *pieces*:
  each saving rank's rows cut at multiples of ``block_rows`` (items named ``weight/rows<start>``,
  ``optim<i>.<j>.<name>/rows<start>``). DCP's file reader reads an item whole before narrowing
  it, so a rank loading rows ``[a, b)`` reads them plus at most one piece beyond each end.

Pieces are plain tensors with explicit row offsets (not DTensors): DTensor's ``Shard(0)`` splits
rows as ``torch.chunk`` does (``ceil(R / W)`` per rank), which is not
:func:`~lightning_metric.heads.sharding.shard_bounds` (the first ``C % W`` ranks get one more);
explicit offsets keep one convention.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.optim import Optimizer

from lightning_metric.heads.sharding import (
    CHECKPOINT_KEY,
    ShardingError,
    _optimizer_keys,
    shard_bounds,
)

__all__ = [
    "CENTRES_FORMAT",
    "CentreLayout",
    "PENDING_KEY",
    "centres_directory",
    "convert_checkpoint",
    "default_block_rows",
    "drop_centres",
    "load_centres",
    "save_pieces",
    "split_off_centres",
]

PathLike = Union[str, "os.PathLike[str]"]

CENTRES_FORMAT = "dcp-row-pieces-1"
"""``CHECKPOINT_KEY["format"]`` of a checkpoint whose centres live in ``path.centres/``."""
PENDING_KEY = "lightning_metric_centre_rows"
"""Transient entry: this rank's rows, from ``on_save_checkpoint`` to the strategy's save."""
SAVE_ID_FILE = "save_id"
"""In the directory: the ``save_id`` of the checkpoint file written with it."""
BLOCK_BYTES = 16 * 2**20
"""Default piece size: small next to a rank's share at scale, large enough to read fast."""


def default_block_rows(dim: int, element_size: int = 4) -> int:
    """Rows per piece: :data:`BLOCK_BYTES` of one tensor of width ``dim``.

    >>> default_block_rows(128)
    32768
    """
    return max(1, BLOCK_BYTES // (dim * element_size))


def centres_directory(checkpoint_path: PathLike) -> Path:
    """The DCP directory beside a checkpoint file: ``<path>.centres``."""
    path = Path(checkpoint_path)
    return path.with_name(path.name + ".centres")


@dataclass(frozen=True)
class CentreLayout:
    """Which rows each saving rank held and how they were cut into pieces."""

    rows: int
    dim: int
    row_bounds: tuple[tuple[int, int], ...]  # per saving rank, in rows (classes x sub-centres)
    block_rows: int

    def pieces(self) -> list[tuple[int, int]]:
        """Every saved piece ``(start, stop)``: each rank's rows cut at multiples of
        ``block_rows``.

        >>> CentreLayout(10, 4, ((0, 4), (4, 7), (7, 10)), 3).pieces()
        [(0, 3), (3, 4), (4, 6), (6, 7), (7, 9), (9, 10)]
        """
        out = []
        for start, stop in self.row_bounds:
            a = start
            while a < stop:
                b = min(stop, (a // self.block_rows + 1) * self.block_rows)
                out.append((a, b))
                a = b
        return out

    def pieces_of(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The pieces overlapping rows ``[start, stop)``."""
        return [(a, b) for a, b in self.pieces() if a < stop and b > start]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "dim": self.dim,
            "row_bounds": [list(b) for b in self.row_bounds],
            "block_rows": self.block_rows,
        }

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> CentreLayout:
        return cls(
            int(meta["rows"]),
            int(meta["dim"]),
            tuple((int(a), int(b)) for a, b in meta["row_bounds"]),
            int(meta["block_rows"]),
        )


def _piece_key(name: str, start: int) -> str:
    return f"{name}/rows{start}"


def _moment_name(i: int, j: int, state: str) -> str:
    return f"optim{i}.{j}.{state}"


# --- the checkpoint dict: what leaves it on save, what comes back on load -----------------


def split_off_centres(
    checkpoint: dict[str, Any],
    head: Any,
    key: str,
    optimizers: Sequence[Optimizer],
    block_rows: int | None,
) -> None:
    """``on_save_checkpoint`` (every rank): move this rank's centres and their optimizer
    moments out of ``checkpoint`` into ``checkpoint[PENDING_KEY]`` (the strategy writes them
    through DCP) and describe the layout in ``checkpoint[CHECKPOINT_KEY]``. No collective."""
    k = head.sub_centers
    rows, dim = head.num_classes * k, head.embedding_dim
    shard = head.class_shard
    world = 1 if shard is None else shard.world_size
    bounds = tuple((a * k, b * k) for a, b in shard_bounds(head.num_classes, world))
    start, stop = (0, rows) if shard is None else (shard.start * k, shard.stop * k)
    layout = CentreLayout(rows, dim, bounds, block_rows or default_block_rows(dim))
    tensors = {"weight": checkpoint["state_dict"].pop(key).detach()}
    moments: dict[str, list[str]] = {}
    states = checkpoint.get("optimizer_states", [])
    for i, j in _optimizer_keys(head.weight, optimizers):
        state = states[i]["state"].get(j) if i < len(states) else None
        if not state:
            continue
        kept = {}
        for name, t in state.items():
            if isinstance(t, Tensor) and tuple(t.shape) == (stop - start, dim):
                tensors[_moment_name(i, j, name)] = t.detach()
                moments.setdefault(f"{i}.{j}", []).append(name)
            else:
                kept[name] = t
        states[i]["state"][j] = kept  # a new dict: the live optimizer's state is untouched
    checkpoint[CHECKPOINT_KEY] = {
        "format": CENTRES_FORMAT,
        "key": key,
        "shape": [rows, dim],
        "saved_by_world_size": world,
        "optimizer_state": [list(x) for x in _optimizer_keys(head.weight, optimizers)],
        "moments": moments,
        "layout": layout.to_dict(),
        # Rank 0's is the one in the file; the directory gets the same: a file and a
        # directory of two different saves are told apart however alike their shapes.
        "save_id": uuid.uuid4().hex,
    }
    checkpoint[PENDING_KEY] = {"start": start, "stop": stop, "tensors": tensors}


def is_sharded_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint's centres live in a DCP directory beside its file."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    return isinstance(meta, dict) and meta.get("format") == CENTRES_FORMAT


def _tensor_names(meta: dict[str, Any]) -> list[str]:
    names = ["weight"]
    for ij, states in meta.get("moments", {}).items():
        i, j = (int(x) for x in ij.split("."))
        names += [_moment_name(i, j, s) for s in states]
    return names


def check_shape(
    meta: dict[str, Any], expected: tuple[int, int], describe: str, source: str
) -> None:
    """The saved centres' shape against the head's (``describe`` says what the head is)."""
    shape = tuple(meta["shape"])
    if shape != expected:
        raise ShardingError(
            f"{source}: its class centres have shape {shape}, expected {expected} ({describe}), "
            f"saved by {meta.get('saved_by_world_size')} rank(s): a checkpoint of another "
            "num_classes or embedding size"
        )


def drop_centres(checkpoint: dict[str, Any], head: Any, key: str) -> None:
    """Inference from a sharded checkpoint: the centres are not read (embedding does not use
    them); the head keeps an empty ``[0, D]`` matrix and refuses ``forward``/``loss``."""
    head.drop_centres()
    checkpoint["state_dict"][key] = head.weight.detach()


def load_centres(
    checkpoint: dict[str, Any],
    head: Any,
    key: str,
    checkpoint_path: PathLike,
    source: str,
) -> None:
    """``on_load_checkpoint`` when resuming: read this rank's rows of the centres and their
    moments from ``checkpoint_path``'s DCP directory into ``checkpoint`` (each rank alone, no
    collective), reading only the pieces that overlap them."""
    meta = checkpoint[CHECKPOINT_KEY]
    k = head.sub_centers
    expected = (head.num_classes * k, head.embedding_dim)
    check_shape(
        meta,
        expected,
        f"num_classes={head.num_classes} x sub_centers={k}, embedding_dim={head.embedding_dim}",
        source,
    )
    shard = head.class_shard
    start, stop = (0, expected[0]) if shard is None else (shard.start * k, shard.stop * k)
    directory = centres_directory(checkpoint_path)
    # Read straight into the head's own rows (built at setup): no second copy of them while
    # Lightning loads the state dict (which then copies the parameter onto itself).
    weight = head.weight.detach()
    into = {"weight": weight} if not weight.is_meta else {}
    _place_rows(checkpoint, key, meta, read_rows(directory, meta, start, stop, source, into))


def _place_rows(
    checkpoint: dict[str, Any], key: str, meta: dict[str, Any], rows: dict[str, Tensor]
) -> None:
    """Put the centre rows read by :func:`read_rows` where Lightning loads them from: the
    weight into the state dict under ``key``, each saved moment into its optimizer's state."""
    checkpoint["state_dict"][key] = rows["weight"]
    states = checkpoint.get("optimizer_states", [])
    for ij, names in meta.get("moments", {}).items():
        i, j = (int(x) for x in ij.split("."))
        state = dict(states[i]["state"].get(j, {}))
        state.update({n: rows[_moment_name(i, j, n)] for n in names})
        states[i]["state"][j] = state


# --- the DCP directory ---------------------------------------------------------------------


def save_pieces(directory: PathLike, pending: dict[str, Any], meta: dict[str, Any]) -> None:
    """Every rank at once (a DCP collective when a process group is up): write this rank's
    rows ``pending`` into ``directory``, cut into the pieces of ``meta`` (the checkpoint's
    ``CHECKPOINT_KEY`` entry). The directory is replaced only once every rank has written (a
    half-written save never replaces a whole one)."""
    layout = meta["layout"]
    final = Path(directory)
    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if grouped else 0
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if grouped:
        dist.barrier()
    plan = CentreLayout.from_dict(layout)
    start, stop = pending["start"], pending["stop"]
    state = {
        _piece_key(name, a): _own_storage(t[a - start : b - start])
        for name, t in pending["tensors"].items()
        for a, b in plan.pieces_of(start, stop)
    }
    with _quiet_single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(partial)), no_dist=not grouped)
    if rank == 0:
        (partial / SAVE_ID_FILE).write_text(meta["save_id"])
    if grouped:
        dist.barrier()
    if rank == 0:
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex}")
        if final.exists():
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if grouped:
        dist.barrier()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns when it works in one process: intended here (no_dist: each rank reads alone).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _own_storage(rows: Tensor) -> Tensor:
    """``rows`` (a slice of a larger CPU tensor) as a tensor whose storage is exactly its own
    bytes, sharing the memory. DCP's file writer clones a tensor whose storage is larger than
    itself and keeps every clone until the file is written: slices as they are would cost a
    second copy of all of this rank's rows."""
    rows = rows.detach().contiguous()
    if rows.device.type != "cpu" or rows.numel() == 0:
        return rows
    raw = torch.from_numpy(rows.view(torch.uint8).numpy())  # numpy knows no bfloat16
    return raw.view(rows.dtype)


def _read_metadata(directory: Path, source: str) -> Metadata:
    if not directory.is_dir():
        raise ShardingError(
            f"{source}: its class centres are in the directory {directory}, which does not "
            "exist (a sharded checkpoint is the file plus this directory: copy both)"
        )
    path = directory / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = pickle.load(f)
    except FileNotFoundError:
        raise ShardingError(
            f"{source}: {path} is missing: expected the DCP metadata of the class centres"
        ) from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise ShardingError(
            f"{source}: {path} is not readable DCP metadata ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(metadata, Metadata):
        raise ShardingError(f"{source}: {path} is not DCP metadata (got {type(metadata)})")
    return metadata


def check_directory(directory: Path, meta: dict[str, Any], source: str) -> Metadata:
    """Every piece the checkpoint's metadata promises is in ``directory`` with its shape, and
    every file holding one exists and is long enough; checked for all pieces (not only this
    rank's) so that every rank fails alike."""
    metadata = _read_metadata(directory, source)
    id_file = directory / SAVE_ID_FILE
    saved_id = id_file.read_text().strip() if id_file.is_file() else None
    if saved_id != meta.get("save_id"):
        raise ShardingError(
            f"{source}: {directory} was written by another save than this checkpoint file "
            f"({id_file} holds {saved_id!r}, the file expects {meta.get('save_id')!r}): keep "
            "each checkpoint file with its own .centres directory"
        )
    layout = CentreLayout.from_dict(meta["layout"])
    for name in _tensor_names(meta):
        for a, b in layout.pieces():
            key = _piece_key(name, a)
            item = metadata.state_dict_metadata.get(key)
            if not isinstance(item, TensorStorageMetadata) or tuple(item.size) != (
                b - a,
                layout.dim,
            ):
                got = tuple(item.size) if isinstance(item, TensorStorageMetadata) else "nothing"
                raise ShardingError(
                    f"{source}: {directory} holds {got} as `{key}`, expected rows [{a}, {b}) of "
                    f"width {layout.dim}: the directory belongs to another checkpoint"
                )
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    for relative, needed in sorted(sizes.items()):
        path = directory / relative
        if not path.is_file():
            raise ShardingError(
                f"{source}: the class-centre shard file {path} is missing (expected "
                f"{needed} bytes, written by one of the {len(layout.row_bounds)} saving ranks)"
            )
        if path.stat().st_size < needed:
            raise ShardingError(
                f"{source}: the class-centre shard file {path} is truncated: "
                f"{path.stat().st_size} bytes, expected at least {needed}"
            )
    return metadata


def read_rows(
    directory: PathLike,
    meta: dict[str, Any],
    start: int,
    stop: int,
    source: str,
    into: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Rows ``[start, stop)`` of every saved tensor (centres and moments), reading only the
    pieces that overlap them. Pieces inside the range are read straight into the result;
    ``into`` gives the result tensor of some names (filled in place)."""
    directory = Path(directory)
    metadata = check_directory(directory, meta, source)
    layout = CentreLayout.from_dict(meta["layout"])
    out: dict[str, Tensor] = {}
    request: dict[str, Tensor] = {}
    partial: list[tuple[str, Tensor, int, int, int]] = []
    for name in _tensor_names(meta):
        pieces = layout.pieces_of(start, stop)
        item = metadata.state_dict_metadata[_piece_key(name, pieces[0][0])]
        assert isinstance(item, TensorStorageMetadata)
        given = (into or {}).get(name)
        if given is not None and tuple(given.shape) == (stop - start, layout.dim):
            result = given
        else:
            result = torch.empty(stop - start, layout.dim, dtype=item.properties.dtype)
        out[name] = result
        for a, b in pieces:
            if a >= start and b <= stop:
                request[_piece_key(name, a)] = result[a - start : b - start]
            else:  # straddles the range's edge: read whole, keep the overlap
                buffer = torch.empty(b - a, layout.dim, dtype=item.properties.dtype)
                request[_piece_key(name, a)] = buffer
                partial.append((name, buffer, a, max(a, start), min(b, stop)))
    try:
        with _quiet_single_process():
            reader = dcp.FileSystemReader(str(directory))
            dcp.load(request, storage_reader=reader, no_dist=True)
    # DCP reports a failed read as a CheckpointException, a BaseException holding the trace.
    except (Exception, CheckpointException) as err:
        files = sorted({info.relative_path for info in metadata.storage_data.values()})
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise ShardingError(
            f"{source}: could not read rows [{start}, {stop}) of the class centres from "
            f"{directory} (files {', '.join(files)}): a corrupt shard file "
            f"({lines[-1].strip() if lines else type(err).__name__})"
        ) from err
    for name, buffer, a, lo, hi in partial:
        out[name][lo - start : hi - start] = buffer[lo - a : hi - a]
    return out


# --- one file ------------------------------------------------------------------------------


def convert_checkpoint(source: PathLike, target: PathLike) -> Path:
    """Write the sharded checkpoint ``source`` (file + ``source.centres/``) as one
    single-file checkpoint ``target`` with every centre and moment, in the format a
    consolidating save writes (it loads in any world size, with any strategy). One process;
    it holds the whole centre state (16 x C x D bytes with AdamW). Refuses an existing
    ``target``; nothing is written there unless the conversion succeeded.

    A checkpoint that is already one file is refused too (nothing to convert)."""
    source, target = Path(source), Path(target)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} exists: convert_checkpoint never overwrites a file")
    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a checkpoint file")
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if not is_sharded_checkpoint(checkpoint):
        raise ShardingError(
            f"{source} holds its class centres itself (not a sharded checkpoint): nothing to "
            "convert"
        )
    meta = checkpoint[CHECKPOINT_KEY]
    rows = read_rows(centres_directory(source), meta, 0, int(meta["shape"][0]), str(source))
    _place_rows(checkpoint, meta["key"], meta, rows)
    checkpoint[CHECKPOINT_KEY] = {
        "shape": list(meta["shape"]),
        "saved_by_world_size": meta["saved_by_world_size"],
        "optimizer_state": meta["optimizer_state"],
    }
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        torch.save(checkpoint, partial)
        os.link(partial, target)  # fails, rather than overwrites, if target appeared meanwhile
    finally:
        partial.unlink(missing_ok=True)
    return target
