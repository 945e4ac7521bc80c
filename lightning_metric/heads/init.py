"""The class centres' initial values: a pure function of a seed and the row range.

Rows are drawn in fixed blocks of :data:`INIT_BLOCK_ROWS` rows, each block from its own
generator seeded by ``(seed, block)``, so any row range (a DDP rank's shard) is computed on its
own, and the shards of any world size put together equal the whole matrix drawn in one
process, bit for bit. A rank builds its rows without ever holding the whole matrix: the most
it draws beyond its own rows is one partial block at each end.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INIT_BLOCK_ROWS", "INIT_STD", "draw_seed", "seeded_rows"]

INIT_BLOCK_ROWS = 8192
"""Rows per generator block (a property of the values: changing it changes every init)."""
INIT_STD = 0.01
"""insightface's init; the scale of W is irrelevant to cosines, only its directions."""

# Odd 64-bit constant (golden ratio) spreading block indices over the seed space.
_SPREAD = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def draw_seed() -> int:
    """A seed for :func:`seeded_rows` from torch's global generator (so ``seed_everything``
    fixes the centres), always on the CPU (also inside ``torch.device("meta")``)."""
    return int(torch.randint(0, 2**62, (), device="cpu", dtype=torch.int64))


def seeded_rows(
    seed: int,
    start: int,
    stop: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """Rows ``[start, stop)`` of the centre matrix of width ``dim`` drawn with ``seed``
    (written into ``out`` when given, block by block: no second copy of the rows).

    >>> whole = seeded_rows(7, 0, 10, 4)
    >>> parts = [seeded_rows(7, a, b, 4) for a, b in [(0, 4), (4, 7), (7, 10)]]
    >>> bool(torch.equal(torch.cat(parts), whole))
    True
    """
    if not 0 <= start <= stop:
        raise ValueError(f"row range [{start}, {stop}) must satisfy 0 <= start <= stop")
    if out is None:
        out = torch.empty(stop - start, dim, dtype=dtype)
    elif tuple(out.shape) != (stop - start, dim):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(stop - start, dim)}")
    generator = torch.Generator()
    first, last = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS
    for block in range(first, last + 1 if stop > start else first):
        generator.manual_seed((seed + block * _SPREAD) & _MASK)
        lo = block * INIT_BLOCK_ROWS
        rows = torch.empty(INIT_BLOCK_ROWS, dim, dtype=torch.float32)
        rows.normal_(0.0, INIT_STD, generator=generator)
        a, b = max(start, lo), min(stop, lo + INIT_BLOCK_ROWS)
        out[a - start : b - start] = rows[a - lo : b - lo]
    return out
