"""Margin heads: paper formulas (float64 references), PML parity, numerics, streaming, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from lightning_metric.heads import (
    AdaFaceHead,
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    CurricularFaceHead,
    MarginHead,
    NormSoftmaxHead,
    SubCenterArcFaceHead,
    streaming,
)
from lightning_metric.heads.sampling import sample_classes

D, C, B = 16, 23, 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread


ALL_HEADS: list[Callable[..., MarginHead]] = [
    NormSoftmaxHead,
    CosFaceHead,
    ArcFaceHead,
    SubCenterArcFaceHead,
    CombinedMarginHead,
    CurricularFaceHead,
    AdaFaceHead,
]


def _inputs(seed: int = 0, b: int = B, d: int = D, c: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Un-normalised, with norms spread over ~[1, 30] as a neck's output would be (AdaFace).
    x = torch.randn(b, d, generator=g) * torch.empty(b, 1).uniform_(1, 30, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    return x, y


# ---------------------------------------------------------------- float64 paper formulas
def _cos64(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    x64, w64 = x.double().numpy(), w.detach().double().numpy()
    x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    w64 = w64 / np.linalg.norm(w64, axis=1, keepdims=True)
    return x64 @ w64.T


def _arc64(cos: np.ndarray, m: float) -> np.ndarray:
    theta = np.arccos(np.clip(cos, -1, 1))
    return np.where(theta + m <= np.pi, np.cos(theta + m), cos - m * np.sin(m))


def _with_target(cos: np.ndarray, y: torch.Tensor, target: np.ndarray) -> np.ndarray:
    out = cos.copy()
    out[np.arange(len(y)), y.numpy()] = target
    return out


def _reference(head: MarginHead, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The papers' formulas, written independently of lightning_metric.heads.functional."""
    s = head.scale
    cos = _cos64(x, head.weight)
    if isinstance(head, SubCenterArcFaceHead):
        cos = cos.reshape(len(x), head.num_classes, head.sub_centers).max(axis=2)
    ct = cos[np.arange(len(y)), y.numpy()]
    if type(head) is NormSoftmaxHead:
        return s * cos
    if isinstance(head, CosFaceHead):
        return s * _with_target(cos, y, ct - head.margin)
    if isinstance(head, (ArcFaceHead, SubCenterArcFaceHead)):
        return s * _with_target(cos, y, _arc64(ct, head.margin))
    if isinstance(head, CombinedMarginHead):
        theta = np.arccos(ct)
        return s * _with_target(cos, y, np.cos(head.m1 * theta + head.m2) - head.m3)
    if isinstance(head, CurricularFaceHead):
        t_ = _arc64(ct, head.margin)
        hard = cos > t_[:, None]
        neg = np.where(hard, cos * (float(head.t) + cos), cos)
        return s * _with_target(neg, y, t_)
    if isinstance(head, AdaFaceHead):
        norms = np.linalg.norm(x.double().numpy(), axis=1).clip(0.001, 100)
        mu, sd = float(head.norm_mean), float(head.norm_std)
        g = np.clip((norms - mu) / (sd + 1e-3) * head.h, -1, 1)
        theta = np.clip(np.arccos(ct) - head.margin * g, 1e-3, np.pi - 1e-3)
        return s * _with_target(cos, y, np.cos(theta) - head.margin - head.margin * g)
    raise AssertionError(type(head))


def _make(cls: Callable[..., MarginHead], **kw: object) -> MarginHead:
    torch.manual_seed(0)
    head = cls(D, C, **kw)
    if isinstance(head, CurricularFaceHead):
        head.t.fill_(0.3)  # a non-trivial t so the hard-negative branch matters
    if isinstance(head, AdaFaceHead):
        head.norm_mean.fill_(12.0)
        head.norm_std.fill_(6.0)  # so g spans the clip range on these inputs
    return head.eval()


@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_logits_match_float64_paper_formula(cls: Callable[..., MarginHead]) -> None:
    head = _make(cls)
    x, y = _inputs()
    logits = head(x, y)
    assert logits.dtype == torch.float32 and logits.shape == (B, C)
    ref = _reference(head, x, y)
    np.testing.assert_allclose(logits.detach().numpy(), ref, rtol=0, atol=2e-5 * head.scale)
    # Without labels: plain scaled cosines (inference), the margin nowhere.
    plain = head(x).detach().numpy()
    cos = _cos64(x, head.weight)
    if isinstance(head, SubCenterArcFaceHead):
        cos = cos.reshape(B, C, head.sub_centers).max(axis=2)
    np.testing.assert_allclose(plain, head.scale * cos, rtol=0, atol=2e-5 * head.scale)


def test_curricular_hard_negatives_exercised() -> None:
    # Guard the reference test above against passing vacuously.
    head = _make(CurricularFaceHead)
    x, y = _inputs()
    cos = _cos64(x, head.weight)
    ct = _arc64(cos[np.arange(B), y.numpy()], head.margin)
    assert (cos > ct[:, None]).sum() > B


@pytest.mark.parametrize("m", [0.2, 0.5, 1.2])
def test_arcface_fallback_beyond_pi(m: float) -> None:
    head = ArcFaceHead(D, C, margin=m).eval()
    torch.manual_seed(1)
    y = torch.arange(B) % C
    # Embeddings nearly opposite their centre: theta + m > pi, the fallback branch.
    x = -head.weight.detach()[y] + 1e-4 * torch.randn(B, D)
    logits = head(x, y).detach().numpy()
    ref = _reference(head, x, y)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=2e-5 * head.scale)
    ct = _cos64(x, head.weight)[np.arange(B), y.numpy()]
    assert (np.arccos(ct) + m > np.pi).all()
    # Monotonic: the target logit never exceeds cos(pi) = -1 there (the cosine does not turn up).
    assert (logits[np.arange(B), y.numpy()] / head.scale < -1).all()


def test_combined_margin_special_cases_equal_arcface_and_cosface() -> None:
    x, y = _inputs(3)
    arc, cosf = _make(ArcFaceHead, margin=0.4), _make(CosFaceHead, margin=0.3)
    comb_a = _make(CombinedMarginHead, m1=1.0, m2=0.4, m3=0.0)
    comb_c = _make(CombinedMarginHead, m1=1.0, m2=0.0, m3=0.3)
    torch.testing.assert_close(comb_a(x, y), arc(x, y))
    torch.testing.assert_close(comb_c(x, y), cosf(x, y), atol=1e-4, rtol=0)


def test_combined_margin_non_unit_m1_matches_formula() -> None:
    head = _make(CombinedMarginHead, m1=0.9, m2=0.4, m3=0.15)
    x, y = _inputs(4)
    np.testing.assert_allclose(
        head(x, y).detach().numpy(), _reference(head, x, y), rtol=0, atol=2e-5 * head.scale
    )


def test_adaface_margin_depends_on_feature_norm() -> None:
    head = _make(AdaFaceHead)
    x, y = _inputs(5)
    x = x / x.norm(dim=1, keepdim=True)
    a = head(8 * x, y)
    b = head(20 * x, y)  # same directions, larger norms: only the target logit moves
    target = torch.zeros(B, C, dtype=torch.bool)
    target[torch.arange(B), y] = True
    torch.testing.assert_close(a[~target], b[~target])
    assert (a[target] - b[target]).abs().max() > 1.0


# ------------------------------------------------------------------------ PML parity
def _pml_pair(name: str) -> tuple[MarginHead, torch.nn.Module]:
    torch.manual_seed(0)
    if name == "arcface":
        head: MarginHead = ArcFaceHead(D, C, margin=0.5, scale=64)
        pml = pml_losses.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=64)
    elif name == "cosface":
        head = CosFaceHead(D, C, margin=0.35, scale=64)
        pml = pml_losses.CosFaceLoss(num_classes=C, embedding_size=D, margin=0.35, scale=64)
    else:
        head = SubCenterArcFaceHead(D, C, margin=0.5, scale=64, sub_centers=3)
        pml = pml_losses.SubCenterArcFaceLoss(
            num_classes=C, embedding_size=D, margin=math.degrees(0.5), scale=64, sub_centers=3
        )
    with torch.no_grad():
        pml.W.copy_(head.weight.T)  # PML stores W as [D, C * K]
    return head, pml


@pytest.mark.parametrize("name", ["arcface", "cosface", "subcenter"])
@pytest.mark.parametrize("chunk", [None, 5])
def test_loss_equals_pml(name: str, chunk: int | None) -> None:
    head, pml = _pml_pair(name)
    head.chunk_size = chunk
    x, y = _inputs(6, b=32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = head.loss(x1, y), pml(x2, y)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in [(x1.grad, x2.grad), (head.weight.grad, pml.W.grad.T)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_pml_arcface_gradient_is_nan_at_cos_one_ours_is_finite() -> None:
    """PML is wrong here (PML issue #209): acos without eps -> inf * 0 = NaN at |cos| = 1."""
    head, pml = _pml_pair("arcface")
    y = torch.arange(4)
    with torch.no_grad():
        w = torch.zeros(C, D)
        w[torch.arange(C), torch.arange(C) % D] = 1.0  # axis-aligned centres: cos is exactly 1
        head.weight.copy_(w)
        pml.W.copy_(w.T)
    x1 = w[y].clone().requires_grad_()
    x2 = w[y].clone().requires_grad_()
    head.loss(x1, y).backward()
    pml(x2, y).backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(head.weight.grad).all()
    assert not torch.isfinite(x2.grad).all() or not torch.isfinite(pml.W.grad).all()


def test_pml_casts_its_weight_to_the_embedding_dtype_ours_keeps_it() -> None:
    """PML is wrong here: `cast_types` rewrites `W.data` to the embeddings' dtype, so one bf16
    batch (autocast output) silently turns the fp32 class centres into bf16 for good."""
    head, pml = _pml_pair("arcface")
    x, y = _inputs(7)
    pml(x.bfloat16(), y)
    assert pml.W.dtype == torch.bfloat16
    head.loss(x.bfloat16(), y)
    assert head.weight.dtype == torch.float32


# ------------------------------------------------------------------- 16-bit numerics
@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_bf16_autocast_training_on_class_centres_stays_finite(
    cls: Callable[..., MarginHead],
) -> None:
    torch.manual_seed(0)
    head = cls(8, 10, chunk_size=3, sample_rate=0.7).train()
    y = torch.arange(20) % 10
    # Embeddings exactly on their class centres (angle 0: where acos / sqrt(1 - cos^2) blow up).
    emb = torch.nn.Parameter(head.weight.detach()[head.sub_centers * y].clone() * 10)
    proj = torch.nn.Linear(8, 8)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(8))
        proj.bias.zero_()
    opt = torch.optim.SGD([emb, *proj.parameters(), *head.parameters()], lr=0.05)
    for step in range(200):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = proj(emb)
            assert z.dtype == torch.bfloat16
            loss = head.loss(z, y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), step
        opt.zero_grad()
        loss.backward()
        for p in (emb, head.weight, proj.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all(), step
        opt.step()
    assert head.weight.dtype == torch.float32


def test_forward_float32_under_autocast_and_bf16_parameters_keep_dtype() -> None:
    x, y = _inputs(8)
    head = ArcFaceHead(D, C).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.bfloat16(), y)
    assert out.dtype == torch.float32
    head.chunk_size = 4
    head.loss(x, y).backward()
    assert head.weight.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.bfloat16


# --------------------------------------------------------------- streaming and sampling
def _loss_and_grads(
    head: MarginHead, x: torch.Tensor, y: torch.Tensor, chunk: int | None
) -> list[torch.Tensor]:
    head.chunk_size = chunk
    x = x.clone().requires_grad_()
    head.weight.grad = None
    torch.manual_seed(123)  # same class sample on both paths
    loss = head.loss(x, y)
    loss.backward()
    return [loss.detach(), x.grad, head.weight.grad]


@pytest.mark.parametrize("cls", ALL_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
def test_streaming_equals_dense(cls: Callable[..., MarginHead], sample_rate: float) -> None:
    torch.manual_seed(0)
    head = cls(D, 101, sample_rate=sample_rate, label_smoothing=0.1).train()
    x, y = _inputs(9, b=24, c=101)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    dense = _loss_and_grads(head, x, y, None)
    head.load_state_dict(state)  # running statistics update on each training call
    streamed = _loss_and_grads(head, x, y, 16)  # 101 classes: the last chunk is partial
    for a, b in zip(streamed, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_streaming_survives_extreme_logits() -> None:
    # Curricular negatives reach 2s; targets far below: exercises the overflow rescale path.
    head = CurricularFaceHead(D, 50, scale=64.0, chunk_size=7).train()
    head.t.fill_(1.0)
    y = torch.zeros(6, dtype=torch.long)
    x = head.weight.detach()[1:7].clone()  # each sample sits on a *wrong* centre
    state = {k: v.clone() for k, v in head.state_dict().items()}
    streamed = _loss_and_grads(head, x, y, 7)
    head.load_state_dict(state)
    dense = _loss_and_grads(head, x, y, None)
    assert torch.isfinite(streamed[0]) and streamed[0] > 100
    for a, b in zip(streamed, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_sample_classes_keeps_positives_and_remaps_labels() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([5, 17, 5, 999, 0])
    index, local = sample_classes(labels, 1000, 0.1)
    assert index.numel() == 100
    assert torch.equal(index, index.unique())  # sorted, no repeats
    assert torch.equal(index[local], labels)
    # More positives than the sample size: every positive still kept.
    index, local = sample_classes(torch.arange(50), 100, 0.1)
    assert torch.equal(index, torch.arange(50)) and torch.equal(local, torch.arange(50))


def test_sampling_draws_negatives_uniformly() -> None:
    torch.manual_seed(0)
    counts = torch.zeros(200)
    for _ in range(400):
        index, _ = sample_classes(torch.tensor([0]), 200, 0.25)
        counts[index] += 1
    assert counts[0] == 400
    rate = counts[1:] / 400  # expected (50 - 1) / 199 ~ 0.246
    assert abs(float(rate.mean()) - 49 / 199) < 1e-6 and float(rate.std()) < 0.04


def test_sampling_only_in_training_and_forward_is_full() -> None:
    head = ArcFaceHead(D, 1000, sample_rate=0.01)
    x, y = _inputs(10, c=1000)
    assert head(x, y).shape == (B, 1000)
    head.eval()
    dense = torch.nn.functional.cross_entropy(head(x, y), y)
    torch.testing.assert_close(head.loss(x, y), dense)
    head.train()
    assert head.loss(x, y) < dense  # ~10 negatives instead of 999


# ------------------------------------------------------------------ stateful heads
def test_curricular_t_is_an_ema_buffer_updated_only_in_training() -> None:
    head = CurricularFaceHead(D, C)
    assert "t" in head.state_dict()
    x, y = _inputs(11)
    cos_t = torch.from_numpy(_cos64(x, head.weight)[np.arange(B), y.numpy()]).float()
    head.loss(x, y)
    torch.testing.assert_close(head.t, 0.01 * cos_t.mean(), rtol=1e-4, atol=1e-7)
    head.eval()
    before = head.t.clone()
    head.loss(x, y)
    assert torch.equal(head.t, before)


def test_adaface_norm_statistics_update() -> None:
    head = AdaFaceHead(D, C)
    x, y = _inputs(12)
    norms = x.norm(dim=1)
    head.loss(x, y)
    torch.testing.assert_close(head.norm_mean, 0.99 * 20 + 0.01 * norms.mean())
    torch.testing.assert_close(head.norm_std, 0.99 * 100 + 0.01 * norms.std())
    assert {"norm_mean", "norm_std"} <= set(head.state_dict())


def test_subcenter_find_outliers() -> None:
    head = SubCenterArcFaceHead(4, 2, sub_centers=2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4))  # class 0: e0, e1; class 1: e2, e3
    x = torch.tensor(
        [[1.0, 0.05, 0, 0], [1.0, 0, 0.1, 0], [0.1, 1.0, 0, 0], [0, 0, 0.2, 1.0], [0, 0, 0, 2.0]]
    )
    y = torch.tensor([0, 0, 0, 1, 1])
    found = head.find_outliers(x, y, threshold_degrees=45.0)
    assert found.dominant_index.tolist() == [0, 1]
    torch.testing.assert_close(found.dominant_centers, torch.eye(4)[[0, 3]])
    assert found.outlier_indices.tolist() == [2]  # sits on class 0's minority sub-centre


# ----------------------------------------------------------------------- bad input
def test_bad_labels_raise() -> None:
    head = ArcFaceHead(D, C)
    x, _ = _inputs()
    with pytest.raises(ValueError, match=rf"num_classes={C}\), got label {C}"):
        head(x, torch.full((B,), C))
    with pytest.raises(ValueError, match=rf"num_classes={C}\), got label -1"):
        head.loss(x, torch.full((B,), -1))
    with pytest.raises(ValueError, match="integer"):
        head.loss(x, torch.zeros(B))
    with pytest.raises(ValueError, match=f"must have {B} entries"):
        head.loss(x, torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs labels"):
        head.loss(x, None)


def test_bad_embedding_width_names_both() -> None:
    head = CosFaceHead(D, C)
    with pytest.raises(ValueError, match=rf"embedding_dim={D}.*width {D + 1}"):
        head(torch.randn(B, D + 1))


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (ArcFaceHead, {"sample_rate": 0.0}, "sample_rate"),
        (ArcFaceHead, {"sample_rate": 1.5}, "sample_rate"),
        (ArcFaceHead, {"margin": math.pi / 2}, "margin"),
        (ArcFaceHead, {"scale": 0.0}, "scale"),
        (CosFaceHead, {"margin": -0.1}, "margin"),
        (SubCenterArcFaceHead, {"sub_centers": 0}, "sub_centers"),
        (CombinedMarginHead, {"m1": 1.5, "m2": 1.0}, "m1"),
        (CurricularFaceHead, {"margin": 2.0}, "margin"),
        (AdaFaceHead, {"h": -1.0}, "h"),
        (NormSoftmaxHead, {"chunk_size": 0}, "chunk_size"),
        (NormSoftmaxHead, {"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_hyper_parameters_raise(
    cls: Callable[..., MarginHead], kwargs: dict[str, float], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        cls(D, C, **kwargs)


def test_every_head_builds_from_class_path() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(MarginHead, "head")
    for cls in ALL_HEADS:
        cfg = parser.parse_object(
            {
                "head": {
                    "class_path": f"lightning_metric.heads.{cls.__name__}",
                    "init_args": {"embedding_dim": 8, "num_classes": 5, "sample_rate": 0.5},
                }
            }
        )
        head = parser.instantiate_classes(cfg).head
        assert type(head) is cls and head.weight.shape == (5 * head.sub_centers, 8)


@pytest.mark.parametrize("chunk", [None, 64])
def test_sampled_loss_never_builds_full_logits(
    chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    widths: list[int] = []
    # The two places a [B, n] block of class logits is built: the dense path's cosines and
    # the streaming kernel's chunks.
    for owner, name in ((MarginHead, "class_cosine"), (streaming, "chunk_logits")):
        original = getattr(owner, name)

        def spy(*args: object, _f: Callable = original) -> torch.Tensor:
            out = _f(*args)
            widths.append(out.shape[1])
            return out

        monkeypatch.setattr(owner, name, spy)
    head = ArcFaceHead(D, 20_000, sample_rate=0.01, chunk_size=chunk)
    x, y = _inputs(13, c=20_000)
    head.loss(x.requires_grad_(), y).backward()
    assert widths and max(widths) <= (200 if chunk is None else 64)
    assert torch.isfinite(head.weight.grad).all()
