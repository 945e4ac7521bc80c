"""Streaming (fused) margin-softmax cross-entropy for very many classes.

The dense loss materialises ``[B, C]`` cosines, logits, softmax and their gradients
(PML: ~6 such tensors). Here the classes are visited in chunks: forward keeps only a
log-sum-exp accumulator per row; backward recomputes each chunk's logits, forms
``softmax - target`` for it and pushes it back through the chunk's GEMMs by hand (a head's
elementwise rule for non-target logits, e.g. CurricularFace's, goes through
``torch.autograd.grad``; the margined target through the head's own ``_target_logit``).
Activation memory is O(B x chunk); the weight gradient is written straight into one
``empty_like``/``zeros_like(weight)``. Values and gradients equal the dense path's for every
head (tests/test_heads.py::test_streaming_equals_dense).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_metric.heads.sampling import class_rows

if TYPE_CHECKING:
    from lightning_metric.heads.base import MarginHead

__all__ = ["streaming_margin_cross_entropy"]

# exp() of a float32 overflows past ~88.7; keeping every shifted logit <= _HEADROOM leaves
# room for summing up to e^(88 - 60) ~ 1e12 classes.
_HEADROOM = 60.0


def streaming_margin_cross_entropy(
    head: MarginHead,
    x: Tensor,
    norms: Tensor,
    labels: Tensor,
    local_labels: Tensor,
    class_index: Tensor | None,
    chunk_size: int,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean margin cross-entropy of unit embeddings ``x [B, D]`` (float32).

    ``labels`` are global class ids (they pick the target rows of ``head.weight``);
    ``local_labels`` index into ``class_index`` (the sampled classes, sorted) or equal
    ``labels`` when ``class_index`` is None (all classes).
    """
    return _StreamingMarginCE.apply(
        x, head.weight, head, norms, labels, local_labels, class_index, chunk_size, label_smoothing
    )


class _Plan:
    """Which weight rows each chunk of (sampled) classes reads."""

    def __init__(self, head: MarginHead, class_index: Tensor | None, chunk_size: int) -> None:
        self.k = head.sub_centers
        self.class_index = class_index
        self.n = head.num_classes if class_index is None else class_index.numel()
        self.bounds = [(a, min(a + chunk_size, self.n)) for a in range(0, self.n, chunk_size)]

    def rows(self, weight: Tensor, a: int, b: int) -> tuple[Tensor, Tensor | slice]:
        if self.class_index is None:
            sl = slice(a * self.k, b * self.k)
            return weight[sl], sl  # a view: no copy of the weight
        idx = class_rows(self.class_index[a:b], self.k)
        return weight[idx], idx


def _target_in_chunk(local: Tensor, a: int, b: int) -> tuple[Tensor, Tensor]:
    inside = (local >= a) & (local < b)
    return inside.nonzero().squeeze(1), local[inside] - a


class _StreamingMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        head: MarginHead,
        norms: Tensor,
        labels: Tensor,
        local: Tensor,
        class_index: Tensor | None,
        chunk_size: int,
        smoothing: float,
    ) -> Tensor:
        plan = _Plan(head, class_index, chunk_size)
        target_rows = class_rows(labels, plan.k)
        z_t = head.scale * head._target_logit(head._target_cosine(x, weight[target_rows]), norms)
        target = z_t / head.scale
        # A fixed per-row shift instead of a running max: it rides inside the chunk GEMM.
        # Non-target logits lie in [-s, top], so with this shift every exp() argument is
        # >= -80 (a row never sums to zero) and, for top - 80 + s <= 60 (s <= 70 for plain
        # heads), <= 60 (no overflow); otherwise a chunk that overshoots is rescaled exactly.
        top = head.scale * head.max_negative_cos  # no non-target logit exceeds this
        floor = min(top - _HEADROOM, 80.0 - head.scale)
        # (With a single class there are no negatives to keep the sum above zero.)
        shift = torch.maximum(z_t, z_t.new_tensor(floor)) if plan.n > 1 else z_t.clone()
        may_overflow = floor < top - _HEADROOM
        run_sum = torch.exp(z_t - shift)
        z_sum = z_t.clone() if smoothing > 0 else None
        for a, b in plan.bounds:
            z = head._chunk_logits(x, plan.rows(weight, a, b)[0], target, shift)
            rows_in, cols_in = _target_in_chunk(local, a, b)
            if z_sum is not None:
                z_sum += z.sum(dim=1) + (b - a) * shift
                z_sum[rows_in] -= z[rows_in, cols_in] + shift[rows_in]
            z[rows_in, cols_in] = float("-inf")  # the target enters once, as z_t
            if may_overflow:  # an extra pass over the block, for large scales only
                over = z.amax(dim=1).sub_(_HEADROOM).clamp_min_(0.0)
                if bool(over.any()):
                    z -= over.unsqueeze(1)
                    run_sum *= torch.exp(-over)
                    shift = shift + over
            run_sum += z.exp_().sum(dim=1)
        lse = shift + torch.log(run_sum)
        per_row = lse - (1.0 - smoothing) * z_t
        if z_sum is not None:
            per_row = per_row - smoothing / plan.n * z_sum
        ctx.save_for_backward(x, weight, norms, labels, local, lse, target)
        ctx.plan, ctx.head, ctx.smoothing = plan, head, smoothing
        return per_row.mean()

    @staticmethod
    @once_differentiable  # backward runs its own small autograd graphs, without create_graph
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, norms, labels, local, lse, target = ctx.saved_tensors
        plan: _Plan = ctx.plan
        head: MarginHead = ctx.head
        smoothing: float = ctx.smoothing
        # d loss / d z = g * (softmax - (1 - eps) onehot - eps / n); g is applied to the small
        # [B, D] / [chunk, D] gradients, not to the [B, chunk] block.
        g = float(grad_out) / x.shape[0]
        off = smoothing / plan.n
        need_w = ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x)
        grad_w = None
        if need_w:  # without sampling every row is written below: no memset needed
            grad_w = (
                torch.empty_like(weight) if plan.class_index is None else torch.zeros_like(weight)
            )
        x_leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            for a, b in plan.bounds:
                w_chunk, where = plan.rows(weight, a, b)
                targets = _target_in_chunk(local, a, b)
                gx, gw = _chunk_backward(head, x, w_chunk, target, lse, targets, off, need_w)
                grad_x += gx
                if grad_w is not None and gw is not None:
                    _write_rows(grad_w, where, gw, g)
            target_rows = class_rows(labels, plan.k)
            w_t = weight[target_rows].detach().requires_grad_(need_w)
            z_t = head.scale * head._target_logit(head._target_cosine(x_leaf, w_t), norms)
            dz_t = torch.exp(z_t.detach() - lse) - (1.0 - smoothing) - off
            grads = torch.autograd.grad(z_t, (x_leaf, w_t) if need_w else (x_leaf,), dz_t)
        grad_x = (grad_x + grads[0]).mul_(g)
        if grad_w is not None:
            grad_w.index_add_(0, target_rows, grads[1].to(grad_w.dtype), alpha=g)
        return grad_x, grad_w, None, None, None, None, None, None, None


def _chunk_backward(
    head: MarginHead,
    x: Tensor,
    w_chunk: Tensor,
    target: Tensor,
    lse: Tensor,
    targets: tuple[Tensor, Tensor],
    off: float,
    need_w: bool,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``sum((softmax - off) * z)`` over one chunk (target column excluded)
    with respect to the unit embeddings and the chunk's weight rows.

    The chunk's forward is recomputed here. The two GEMMs and the row normalisation's
    Jacobian are written out by hand (applied in place: autograd would keep ~4 extra
    ``[chunk, D]`` temporaries); only a head's elementwise ``_negative_logits`` goes through
    autograd, on the ``[B, chunk]`` cosine block.
    """
    w = w_chunk.detach().float()
    norms = torch.linalg.vector_norm(w, dim=1).clamp_min_(1e-12)
    w_hat = w / norms.unsqueeze(1)
    x = x.detach()  # backward runs under enable_grad: keep the hand-written part graph-free
    s, k, rows = head.scale, head.sub_centers, x.shape[0]
    if head._plain_negatives:  # z - lse straight out of one GEMM
        dcos = torch.addmm(lse.neg().unsqueeze(1), x, w_hat.T, alpha=s).exp_()
        _softmax_to_dz(dcos, targets, off)
    else:
        cos_all = torch.mm(x, w_hat.T)
        cos, which = cos_all.view(rows, -1, k).max(dim=2) if k > 1 else (cos_all, None)
        if head._reweights_negatives:
            leaf = cos.requires_grad_()
            neg = head._negative_logits(leaf, target)
            p = neg.detach().mul(s).sub_(lse.unsqueeze(1)).exp_()
            _softmax_to_dz(p, targets, off)
            (dcos,) = torch.autograd.grad(neg, leaf, p)
        else:
            dcos = cos.mul_(s).sub_(lse.unsqueeze(1)).exp_()
            _softmax_to_dz(dcos, targets, off)
        if which is not None:  # the gradient goes to the sub-centre that won the max
            dcos = (
                cos_all.view(rows, -1, k).zero_().scatter_(2, which.unsqueeze(2), dcos.unsqueeze(2))
            )
            dcos = dcos.view(rows, -1)
    gx = torch.mm(dcos, w_hat).mul_(s)
    if not need_w:
        return gx, None
    gw_hat = torch.mm(dcos.T, x)
    radial = torch.einsum("ij,ij->i", gw_hat, w_hat).unsqueeze(1)
    gw = gw_hat.addcmul_(w_hat, radial, value=-1.0).mul_((s / norms).unsqueeze(1))
    return gx, gw


def _softmax_to_dz(p: Tensor, targets: tuple[Tensor, Tensor], off: float) -> None:
    if off:
        p.sub_(off)  # label smoothing's uniform part
    p[targets] = 0.0  # the target's gradient comes from its own pass


def _write_rows(grad_w: Tensor, where: Tensor | slice, gw: Tensor, g: float) -> None:
    if isinstance(where, slice):  # chunks are disjoint and cover every row: plain writes
        torch.mul(gw, g, out=grad_w[where])
    else:
        grad_w.index_add_(0, where, gw.to(grad_w.dtype), alpha=g)
