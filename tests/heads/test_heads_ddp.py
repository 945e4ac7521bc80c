"""Running statistics of CurricularFace / AdaFace are averaged over DDP ranks (2 CPU, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_harness import run_ranks

from lightning_metric.heads import AdaFaceHead, CurricularFaceHead

pytestmark = pytest.mark.ddp

WORLD, D, C, B = 2, 8, 11, 6


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    # Ranks see very different norms and directions, so a local-only update would differ.
    return torch.randn(B, D, generator=g) * (3.0 + 20.0 * rank), torch.randint(
        0, C, (B,), generator=g
    )


def _heads() -> tuple[CurricularFaceHead, AdaFaceHead]:
    torch.manual_seed(0)
    return CurricularFaceHead(D, C), AdaFaceHead(D, C, chunk_size=4)


def _worker(rank: int, folder: str) -> None:
    curricular, ada = _heads()
    x, y = _batch(rank)
    curricular.loss(x, y)
    ada.loss(x, y)  # the streaming path updates the statistics too
    torch.save({**curricular.state_dict(), **ada.state_dict()}, Path(folder) / f"{rank}.pt")


def test_statistics_are_rank_averaged(tmp_path: Path) -> None:
    run_ranks(_worker, WORLD, tmp_path, args=(str(tmp_path),))
    states = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    curricular, _ = _heads()
    cos_means, norm_means, norm_stds = [], [], []
    for r in range(WORLD):
        x, y = _batch(r)
        w = torch.nn.functional.normalize(curricular.weight.detach()[y], dim=1)
        cos_means.append((torch.nn.functional.normalize(x, dim=1) * w).sum(1).mean())
        norm_means.append(x.norm(dim=1).mean())
        norm_stds.append(x.norm(dim=1).std())
    expected_t = 0.01 * torch.stack(cos_means).mean()
    expected_mean = 0.99 * 20 + 0.01 * torch.stack(norm_means).mean()
    expected_std = 0.99 * 100 + 0.01 * torch.stack(norm_stds).mean()
    for state in states:  # identical on both ranks, and equal to the cross-rank average
        torch.testing.assert_close(state["t"], expected_t, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["norm_mean"], expected_mean)
        torch.testing.assert_close(state["norm_std"], expected_std)
