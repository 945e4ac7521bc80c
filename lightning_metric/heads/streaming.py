"""Streaming (fused) margin-softmax cross-entropy for very many classes.

The dense loss materialises ``[B, C]`` cosines, logits, softmax and their gradients
(PML: ~6 such tensors). Here the classes are visited in chunks: forward keeps only a
log-sum-exp accumulator per row; backward recomputes each chunk's logits, forms
``softmax - target`` for it and pushes it back through the chunk's GEMMs by hand (a head's
elementwise rule for non-target logits, e.g. CurricularFace's, goes through
``torch.autograd.grad``; the margined target through the head's own ``target_logit``).
Activation memory is O(B x chunk); the weight gradient is written straight into one
``empty_like``/``zeros_like(weight)``. Values and gradients equal the dense path's for every
head (tests/heads/test_heads.py::test_streaming_equals_dense).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_metric.distributed import all_reduce_sum
from lightning_metric.heads.functional import l2_normalize
from lightning_metric.heads.sampling import class_rows
from lightning_metric.heads.sharding import ClassShard, logsumexp_across_ranks

__all__ = ["StreamingHead", "chunk_logits", "plain_negatives", "streaming_margin_cross_entropy"]

# exp() of a float32 overflows past ~88.7; keeping every shifted logit <= _HEADROOM leaves
# room for summing up to e^(88 - 60) ~ 1e12 classes.
_HEADROOM = 60.0


class StreamingHead(Protocol):
    """What the streaming loss reads of a head (``MarginHead`` provides all of it)."""

    @property
    def weight(self) -> Tensor: ...
    @property
    def scale(self) -> float: ...
    @property
    def sub_centers(self) -> int: ...
    @property
    def max_negative_cos(self) -> float: ...
    @property
    def reweights_negatives(self) -> bool: ...
    def class_cosine(self, x: Tensor, rows: Tensor) -> Tensor: ...
    def target_cosine(self, x: Tensor, target_rows: Tensor) -> Tensor: ...
    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor: ...
    def negative_logits(self, cos: Tensor, target: Tensor) -> Tensor: ...


def plain_negatives(head: StreamingHead) -> bool:
    """True when non-target logits are just ``scale * cos`` (one centre, no re-weighting)."""
    return head.sub_centers == 1 and not head.reweights_negatives


def chunk_logits(
    head: StreamingHead, x: Tensor, rows: Tensor, target: Tensor, shift: Tensor
) -> Tensor:
    """Non-target logits ``[B, n]`` of one class chunk (weight ``rows``) minus a per-row
    ``shift [B]``; the target column is not special here.

    For heads that leave negatives alone the scale and shift ride inside one ``addmm``: two
    fewer passes over the ``[B, chunk]`` block, which dominate on CPU.
    """
    if plain_negatives(head):
        w = l2_normalize(rows)[0]
        return torch.addmm(shift.neg().unsqueeze(1), x, w.T, alpha=head.scale)
    cos = head.class_cosine(x, rows)
    return head.scale * head.negative_logits(cos, target) - shift.unsqueeze(1)


def streaming_margin_cross_entropy(
    head: StreamingHead,
    x: Tensor,
    norms: Tensor,
    target_class: Tensor,
    local_labels: Tensor,
    class_index: Tensor | None,
    chunk_size: int,
    label_smoothing: float = 0.0,
    shard: ClassShard | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Mean margin cross-entropy of unit embeddings ``x [B, D]`` (float32).

    ``target_class [B]`` is each row's class as held by ``head.weight`` (row ``c * K + k`` is
    sub-centre ``k`` of class ``c``); ``local_labels [B]`` is the target's column among the
    classes in the softmax (its position in ``class_index``, the sampled classes, sorted; or
    ``target_class`` itself when ``class_index`` is None: all classes).

    With a ``shard`` the head holds only some classes and every rank calls this on the same
    (gathered) rows: a row whose class lives on another rank has ``-1`` in both. The target
    logit comes from the rank that owns it, the log-sum-exp is combined over ranks, and the
    gradient of ``x`` is this rank's part (``distributed.gather_with_grad`` sums the parts).

    ``weight`` replaces ``head.weight`` as the class centres (same rows; a Matryoshka prefix
    passes ``head.weight[:, :d]`` with ``x`` of width ``d``); its gradient flows back to
    whatever it is a view of.
    """
    return _StreamingMarginCE.apply(
        x,
        head.weight if weight is None else weight,
        head,
        norms,
        target_class,
        local_labels,
        class_index,
        chunk_size,
        label_smoothing,
        shard,
    )


class _Plan:
    """Which weight rows each chunk of (sampled) classes reads."""

    def __init__(
        self, head: StreamingHead, weight: Tensor, class_index: Tensor | None, chunk_size: int
    ) -> None:
        self.k = head.sub_centers
        self.class_index = class_index
        self.n = weight.shape[0] // self.k if class_index is None else class_index.numel()
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


def _target_logits(
    head: StreamingHead, x: Tensor, weight: Tensor, norms: Tensor, target_class: Tensor
) -> Tensor:
    """Scaled margined target logits of the rows whose ``target_class`` is held here."""
    rows = class_rows(target_class, head.sub_centers)
    return head.scale * head.target_logit(head.target_cosine(x, weight[rows]), norms)


class _StreamingMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        head: StreamingHead,
        norms: Tensor,
        target_class: Tensor,
        local: Tensor,
        class_index: Tensor | None,
        chunk_size: int,
        smoothing: float,
        shard: ClassShard | None,
    ) -> Tensor:
        plan = _Plan(head, weight, class_index, chunk_size)
        # Classes in the softmax over all ranks; None when sharded without label smoothing, the
        # one use of the exact count (which costs a collective and a host sync per step): a
        # sharded softmax always has several classes, every rank holding at least one.
        n_total: int | None = plan.n
        if shard is None:
            owned = None
            z_t = _target_logits(head, x, weight, norms, target_class)
        else:
            owned = (target_class >= 0).nonzero().squeeze(1)
            z_t = x.new_zeros(x.shape[0])
            z_t[owned] = _target_logits(head, x[owned], weight, norms[owned], target_class[owned])
            z_t = all_reduce_sum(z_t)
            n_total = None
            if smoothing > 0:
                n_total = int(all_reduce_sum(torch.tensor(plan.n, device=x.device)))
        target = z_t / head.scale
        # A fixed per-row shift instead of a running max: it rides inside the chunk GEMM.
        # Non-target logits lie in [-s, top], so with this shift every exp() argument is
        # <= 60 for top - 80 + s <= 60 (s <= 70 for plain heads): no overflow; otherwise a
        # chunk that overshoots is rescaled exactly. Terms far below the shift may underflow
        # to 0, which is their value to float precision next to the target's.
        top = head.scale * head.max_negative_cos  # no non-target logit exceeds this
        floor = min(top - _HEADROOM, 80.0 - head.scale)
        # (With a single class there are no negatives to keep the sum above zero.)
        several = n_total is None or n_total > 1
        shift = torch.maximum(z_t, z_t.new_tensor(floor)) if several else z_t.clone()
        may_overflow = floor < top - _HEADROOM
        run_sum = torch.zeros_like(z_t)
        z_sum = torch.zeros_like(z_t) if smoothing > 0 else None
        for a, b in plan.bounds:
            z = chunk_logits(head, x, plan.rows(weight, a, b)[0], target, shift)
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
        lse_negatives = shift + torch.log(run_sum)  # -inf where no negative is here
        if shard is not None:
            lse_negatives = logsumexp_across_ranks(lse_negatives)
            if z_sum is not None:
                z_sum = all_reduce_sum(z_sum)
        lse = torch.logaddexp(lse_negatives, z_t)
        per_row = lse - (1.0 - smoothing) * z_t
        off = smoothing / n_total if n_total else 0.0  # label smoothing's uniform part
        if z_sum is not None:
            per_row = per_row - off * (z_sum + z_t)
        ctx.save_for_backward(x, weight, norms, target_class, local, lse, target)
        ctx.plan, ctx.head, ctx.smoothing = plan, head, smoothing
        ctx.owned, ctx.off = owned, off
        return per_row.mean()

    @staticmethod
    @once_differentiable  # backward runs its own small autograd graphs, without create_graph
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, norms, target_class, local, lse, target = ctx.saved_tensors
        plan: _Plan = ctx.plan
        head: StreamingHead = ctx.head
        smoothing: float = ctx.smoothing
        owned: Tensor | None = ctx.owned
        # d loss / d z = g * (softmax - (1 - eps) onehot - eps / n); g is applied to the small
        # [B, D] / [chunk, D] gradients, not to the [B, chunk] block.
        g = float(grad_out) / x.shape[0]
        off: float = ctx.off
        need_w = ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x)
        grad_w = None
        if need_w:  # without sampling every row is written below: no memset needed
            grad_w = (
                torch.empty_like(weight) if plan.class_index is None else torch.zeros_like(weight)
            )
        with torch.enable_grad():  # a re-weighting head's rule goes through autograd
            for a, b in plan.bounds:
                w_chunk, where = plan.rows(weight, a, b)
                targets = _target_in_chunk(local, a, b)
                gx, gw = _chunk_backward(head, x, w_chunk, target, lse, targets, off, need_w)
                grad_x += gx
                if grad_w is not None and gw is not None:
                    _write_rows(grad_w, where, gw, g)
        mine = torch.arange(x.shape[0], device=x.device) if owned is None else owned
        if mine.numel():  # the target logits of the rows whose class is held here
            x_leaf = x.detach().requires_grad_()
            target_rows = class_rows(target_class[mine], plan.k)
            with torch.enable_grad():
                w_t = weight[target_rows].detach().requires_grad_(need_w)
                z_t = head.scale * head.target_logit(
                    head.target_cosine(x_leaf[mine], w_t), norms[mine]
                )
                dz_t = torch.exp(z_t.detach() - lse[mine]) - (1.0 - smoothing) - off
                grads = torch.autograd.grad(z_t, (x_leaf, w_t) if need_w else (x_leaf,), dz_t)
            grad_x += grads[0]
            if grad_w is not None:
                grad_w.index_add_(0, target_rows, grads[1].to(grad_w.dtype), alpha=g)
        grad_x.mul_(g)
        return grad_x, grad_w, None, None, None, None, None, None, None, None


def _chunk_backward(
    head: StreamingHead,
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
    ``[chunk, D]`` temporaries); only a head's elementwise ``negative_logits`` goes through
    autograd, on the ``[B, chunk]`` cosine block.
    """
    w = w_chunk.detach().float()
    norms = torch.linalg.vector_norm(w, dim=1).clamp_min_(1e-12)
    w_hat = w / norms.unsqueeze(1)
    x = x.detach()  # backward runs under enable_grad: keep the hand-written part graph-free
    s, k, rows = head.scale, head.sub_centers, x.shape[0]
    if plain_negatives(head):  # z - lse straight out of one GEMM
        dcos = torch.addmm(lse.neg().unsqueeze(1), x, w_hat.T, alpha=s).exp_()
        _softmax_to_dz(dcos, targets, off)
    else:
        cos_all = torch.mm(x, w_hat.T)
        cos, which = cos_all.view(rows, -1, k).max(dim=2) if k > 1 else (cos_all, None)
        if head.reweights_negatives:
            leaf = cos.requires_grad_()
            neg = head.negative_logits(leaf, target)
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
