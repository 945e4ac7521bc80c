"""`MarginHead`: the one pipeline every margin-softmax head shares.

normalise -> cosine -> (class-centre sampling) -> margin on the target -> scale -> CE.
Subclasses supply only the margin (:meth:`MarginHead.target_logit`) and, rarely, a rule for
the non-target cosines (:meth:`MarginHead.negative_logits`) or a running statistic
(:meth:`MarginHead.update_statistics`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metric.checks import (
    check_dims,
    check_int,
    check_labels,
    check_num_classes,
    check_range,
)
from lightning_metric.distributed import (
    all_reduce_sum,
    gather_uneven,
    gather_with_grad,
    sync_mean,
)
from lightning_metric.heads.functional import l2_normalize, normalize_embeddings
from lightning_metric.heads.init import INIT_STD, draw_seed, seeded_rows
from lightning_metric.heads.sampling import class_rows, sample_classes
from lightning_metric.heads.sharding import ClassShard, ShardingError, shard_bounds
from lightning_metric.heads.streaming import streaming_margin_cross_entropy

__all__ = ["MarginHead", "ShardingError", "deferred_centres"]

# Above this many (sampled) class rows ``loss()`` streams by default: a dense [B, C] float32
# logit matrix and its softmax are then the largest activations of a typical model.
AUTO_STREAM_ROWS = 16384
# Elements of one [B, chunk] block (16 MB on CPU, 128 MB on CUDA). Few, large chunks: each
# chunk costs ~30 kernel launches / OpenMP parallel regions, and on a busy CPU every parallel
# region waits for a core, so many small chunks suffer most when the machine is busy.
_AUTO_BLOCK = {"cpu": 2**22, "cuda": 2**25}


_DEFERRED = ContextVar("lightning_metric_deferred_centres", default=False)


@contextmanager
def deferred_centres() -> Iterator[None]:
    """Margin heads with ``shard_classes=True`` built inside allocate no class-centre memory
    (a whole head is built at once): their ``weight`` is on the meta device until :meth:`MarginHead.shard` builds this rank's rows or
    :meth:`MarginHead.materialize` the whole matrix (the same values either way).

    >>> from lightning_metric.heads import ArcFaceHead
    >>> with deferred_centres():
    ...     head = ArcFaceHead(embedding_dim=4, num_classes=10**9, shard_classes=True)
    >>> head.weight.is_meta
    True
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class _Step(NamedTuple):
    """The classes of one training step's softmax, shared by every Matryoshka prefix."""

    target_class: Tensor  # each row's class as held by this rank's weight (-1: another rank's)
    local: Tensor  # its column among the softmax's classes (-1: another rank's)
    class_index: Tensor | None  # the sampled classes, sorted; None: all of them
    n: int  # classes in this rank's softmax


class MarginHead(nn.Module):
    """Base class of the margin-softmax heads (NormSoftmax, CosFace, ArcFace, ...).

    **Inputs are un-normalised.** ``MetricLearningModule`` hands a head the neck's output
    *before* L2 normalisation (AdaFace reads the feature norm as an image-quality signal);
    every head normalises internally, so passing unit vectors is also fine. Retrieval and
    ``MetricLearningModule.forward`` use the normalised embedding.

    - ``weight``: ``nn.Parameter [num_classes * sub_centers, embedding_dim]`` (the class
      centres; ``sub_centers`` is 1 except for ``SubCenterArcFaceHead``, whose row
      ``c * K + k`` is sub-centre ``k`` of class ``c``). With sharding, only this rank's rows.
    - ``forward(embeddings, labels=None)``: float32 logits ``[B, num_classes]``: the scaled
      cosine to every class; with ``labels`` the margin is applied to each row's target
      class (and, for CurricularFace, to its hard negatives). Without labels it returns the
      plain scaled cosines (inference). ``forward`` never samples classes.
    - ``loss(embeddings, labels)``: mean cross-entropy on those logits, with optional label
      smoothing. During training with ``sample_rate < 1`` only the batch's classes plus a
      uniform sample of the others enter the softmax (partial FC). Past
      ``AUTO_STREAM_ROWS`` classes (or whenever ``chunk_size`` is set) the loss is computed
      in class chunks by a fused online-log-sum-exp kernel that never builds the ``[B, C]``
      logits and recomputes each chunk in backward; values and gradients equal the dense
      computation's.

    All cosine and margin math runs in float32, also under ``torch.autocast``; the
    parameter keeps its own dtype.

    Example: train a head like any ``nn.Module`` (the embeddings need not be unit vectors):

    >>> import torch
    >>> from lightning_metric.heads import ArcFaceHead
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> head = ArcFaceHead(embedding_dim=8, num_classes=10, scale=30.0, margin=0.3)
    >>> embeddings = torch.randn(4, 8, requires_grad=True)
    >>> loss = head.loss(embeddings, torch.tensor([0, 1, 2, 3]))
    >>> loss.backward()
    >>> head.weight.grad.shape, bool(torch.isfinite(embeddings.grad).all())
    (torch.Size([10, 8]), True)

    A subclass implements the public hooks, all in float32 unscaled cosine units:
    :meth:`target_logit` (the margin), and only when needed :meth:`negative_logits` (raise
    ``max_negative_cos`` if they can exceed 1) and :meth:`update_statistics`.

    Args:
        embedding_dim: width ``D`` of the embeddings.
        num_classes: number of training classes ``C`` (>= 2).
        scale: ``s``, the logits are ``s * cos``.
        sample_rate: fraction of classes in each training step's softmax (partial FC, An et
            al. 2021): the batch's classes plus a uniform sample of the others; 1 uses all.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        chunk_size: classes per chunk of the streaming loss; None streams automatically
            past ``AUTO_STREAM_ROWS`` class rows.
        shard_classes: under DDP, split the class centres across ranks (rank ``r`` holds
            the classes ``shard_bounds(C, W)[r]``); embeddings and labels are gathered and
            the softmax is computed in pieces, so centre and optimizer memory per rank is
            ``C x D / W``. A no-op in one process. ``MetricLearningModule`` applies it at
            setup (see :meth:`shard`).

    With ``shard_classes=True`` the centres' initial values are a pure function of a seed drawn
    from torch's global generator at construction and of the row
    (:func:`~lightning_metric.heads.init.seeded_rows`), so a rank can build its own rows alone
    (a whole head draws them from the global generator directly, as before). A head built inside :func:`deferred_centres` (as
    ``MetricLearningModule`` builds one with ``shard_classes=True``) holds no centre memory
    until :meth:`shard` builds this rank's rows or :meth:`materialize` the whole matrix.
    """

    sub_centers: int = 1
    # Set by ``drop_centres``: loaded for inference without its centres (a class default, so
    # heads pickled before it existed read it too).
    centres_dropped: bool = False
    # Upper bound of ``negative_logits`` (unscaled); the streaming loss sizes its shift by it.
    max_negative_cos: float = 1.0

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float = 64.0,
        sample_rate: float = 1.0,
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
        shard_classes: bool = False,
    ) -> None:
        super().__init__()
        self.embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        self.num_classes = check_num_classes(num_classes)
        self.scale = check_range("scale", scale, 0.0, low_open=True)
        self.sample_rate = check_range("sample_rate", sample_rate, 0.0, 1.0, low_open=True)
        self.label_smoothing = check_range(
            "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True
        )
        if chunk_size is not None:
            chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.chunk_size = chunk_size
        if not isinstance(shard_classes, bool):
            raise ShardingError(f"`shard_classes` must be a bool, got {shard_classes!r}")
        self.shard_classes = shard_classes
        # Set by ``shard``: the classes this rank holds (None: all of them).
        self.class_shard: ClassShard | None = None
        # Only a head that will be sharded waits for its rows: a whole head is built now.
        device = "meta" if _DEFERRED.get() and shard_classes else None
        rows = self.num_classes * self.sub_centers
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw new centres: with ``shard_classes``, a seed and the rows from it (a meta head
        keeps only the seed); otherwise insightface's init, from torch's global generator as
        every release drew it, so seeded runs of a whole head keep their numbers."""
        if not self.shard_classes:
            nn.init.normal_(self.weight, std=INIT_STD)
            return
        self.init_seed = draw_seed()
        if not self.weight.is_meta:
            with torch.no_grad():
                seeded_rows(
                    self.init_seed, 0, self.weight.shape[0], self.embedding_dim, out=self.weight
                )

    def _initial_rows(self, start: int, stop: int) -> Tensor:
        return seeded_rows(self.init_seed, start, stop, self.embedding_dim, self.weight.dtype)

    def materialize(self) -> None:
        """Build the whole centre matrix of a head created inside :func:`deferred_centres`
        (the values a head built in one process has); a no-op for a built head."""
        if self.weight.is_meta:
            self._replace_weight(self._initial_rows(0, self.weight.shape[0]))

    def _replace_weight(self, data: Tensor) -> None:
        self.weight = nn.Parameter(data, requires_grad=self.weight.requires_grad)

    def drop_centres(self) -> None:
        """Hold no class centres (an empty ``[0, D]`` weight): a model loaded for inference
        from a sharded checkpoint embeds without them; ``forward`` and ``loss`` then raise."""
        self._replace_weight(torch.empty(0, self.embedding_dim, dtype=self.weight.dtype))
        self.class_shard = None
        self.centres_dropped = True

    def _check_built(self) -> None:
        if self.weight.is_meta:
            raise ShardingError(
                f"{type(self).__name__}'s class centres are not built yet (created inside "
                "deferred_centres(), as MetricLearningModule does with shard_classes=True until "
                "its setup): call head.materialize() in one process, or head.shard(rank, "
                "world_size)"
            )
        if self.centres_dropped:
            raise ShardingError(
                f"{type(self).__name__} was loaded for inference from a sharded checkpoint, "
                "without its class centres (embeddings do not need them): convert the "
                "checkpoint to one file with lightning_metric.centre_checkpoint."
                "convert_checkpoint and load that for logits or a loss"
            )

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Deferred centres have no data to move or cast (inference never builds them): they
        # stay on the meta device through ``.to(device)``, and keep their place in the order.
        if not self.weight.is_meta:
            return super()._apply(fn, recurse)
        order = list(self._parameters)
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
            for name in order:
                self._parameters[name] = self._parameters.pop(name)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Copying into a meta parameter is silently a no-op: give it storage first (of its
        # own shape, so that a checkpoint of another size is still reported as a mismatch).
        incoming = state_dict.get(prefix + "weight")
        if self.weight.is_meta and isinstance(incoming, Tensor) and not incoming.is_meta:
            self._replace_weight(torch.empty(self.weight.shape, dtype=self.weight.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the public hooks a subclass overrides (float32, unscaled cosine units) -------------
    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        """Margined target cosine ``[B]`` from the plain one; ``norms`` (the embeddings'
        norms before normalisation) are detached."""
        return cos_target

    def negative_logits(self, cos: Tensor, target: Tensor) -> Tensor:
        """Non-target cosines ``[B, n]`` given the detached margined target ``[B]``."""
        return cos

    def update_statistics(self, cos_target: Tensor, norms: Tensor) -> None:
        """Update running statistics (buffers) from the batch's target cosines and norms.

        Training only, before the margin is applied. Reduce batch means with
        :meth:`batch_mean` so every DDP rank keeps the same value.
        """

    def select_classes(self, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """The classes in one training step's softmax when ``sample_rate < 1`` (partial FC).

        ``labels`` are the step's target classes among ``num_classes`` candidates (with
        sharded centres: this rank's classes, ids relative to ``class_shard.start``).
        Returns the sorted class ids to keep (int64, every class of ``labels`` included) and
        ``labels`` remapped to positions in them. Default: the positives plus a uniform
        sample of the others, :func:`~lightning_metric.heads.sampling.sample_classes`.
        """
        return sample_classes(labels, num_classes, self.sample_rate)

    def batch_mean(self, values: Tensor) -> Tensor:
        """Mean over dim 0 and over DDP ranks; with sharded classes the batch is already
        every rank's (gathered), so no collective is needed."""
        mean = values.float().mean(dim=0)
        return mean if self.class_shard is not None else sync_mean(mean)

    # -- shared machinery -------------------------------------------------------------------
    @property
    def reweights_negatives(self) -> bool:
        """Whether the subclass re-weights non-target cosines (``negative_logits``)."""
        return type(self).negative_logits is not MarginHead.negative_logits

    @property
    def _keeps_statistics(self) -> bool:
        return type(self).update_statistics is not MarginHead.update_statistics

    def class_cosine(self, x: Tensor, rows: Tensor) -> Tensor:
        """Cosines ``[B, n]`` of unit ``x [B, D]`` to ``n`` classes' rows ``[n * K, D]``."""
        cos = x @ l2_normalize(rows)[0].T
        if self.sub_centers > 1:
            cos = cos.view(x.shape[0], -1, self.sub_centers).amax(dim=-1)
        return cos

    def target_cosine(self, x: Tensor, target_rows: Tensor) -> Tensor:
        """Cosine ``[B]`` of each row of ``x`` to its own class, given that class's rows
        ``[B * K, D]`` (``weight[class_rows(labels, K)]``): never touches other classes."""
        return self._sub_center_cosines(x, target_rows).amax(dim=-1)

    def _sub_center_cosines(self, x: Tensor, target_rows: Tensor) -> Tensor:
        w = l2_normalize(target_rows)[0].view(x.shape[0], self.sub_centers, -1)
        return (w @ x.unsqueeze(-1)).squeeze(-1)

    def _rows(self, class_index: Tensor | None, weight: Tensor) -> Tensor:
        if class_index is None:
            return weight
        return weight[class_rows(class_index, self.sub_centers)]

    def _prepare(self, embeddings: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Unit rows, norms and the finite-row mask (see ``functional.normalize_embeddings``)."""
        self._check_embeddings(embeddings)
        if labels is not None:
            check_labels("labels", labels, self.num_classes, length=embeddings.shape[0])
        return normalize_embeddings(embeddings)

    def _check_embeddings(self, embeddings: Tensor) -> None:
        if not isinstance(embeddings, Tensor):
            raise TypeError(
                f"embeddings must be a torch.Tensor [batch, embedding_dim={self.embedding_dim}], "
                f"got {type(embeddings).__name__}"
            )
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must have shape [batch, embedding_dim={self.embedding_dim}], "
                f"got {tuple(embeddings.shape)} (width {embeddings.shape[-1]})"
            )

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Scaled cosine logits ``[B, C]``; a row with a NaN/Inf embedding gets NaN logits
        (and no gradient), a zero row cosine 0 to every class."""
        if self.class_shard is not None:
            raise ShardingError(
                f"{type(self).__name__}.forward returns logits over all {self.num_classes} "
                f"classes, but this rank holds only classes [{self.class_shard.start}, "
                f"{self.class_shard.stop}) (shard_classes=True under DDP). Use loss() for "
                "training, the embeddings for retrieval, or load the checkpoint in one process "
                "for full logits"
            )
        self._check_built()
        with torch.autocast(embeddings.device.type, enabled=False):
            x, norms, finite = self._prepare(embeddings, labels)
            cos = self.class_cosine(x, self.weight)
            if labels is None:
                logits = self.scale * cos
            else:
                logits = self._margin_logits(cos, labels.long(), norms, finite)
            return torch.where(finite.unsqueeze(1), logits, float("nan"))

    def _margin_logits(
        self,
        cos: Tensor,
        labels: Tensor,
        norms: Tensor,
        finite: Tensor | None = None,
        update: bool = True,
    ) -> Tensor:
        cos_t = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
        if self.training and update:
            self._guarded_update(cos_t.detach(), norms.detach(), finite)
        target = self.target_logit(cos_t, norms.detach())
        logits = self.negative_logits(cos, target.detach())
        return self.scale * logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1))

    def _guarded_update(self, cos_target: Tensor, norms: Tensor, finite: Tensor | None) -> None:
        """``update_statistics``, undone when a row of the batch was not finite.

        The rows were zeroed by ``_prepare``, so the update itself stays finite; restoring the
        buffers (no host sync) keeps a poisoned batch out of the running statistics.
        """
        if not self._keeps_statistics:
            return
        if finite is None:
            self.update_statistics(cos_target, norms)
            return
        with torch.no_grad():
            buffers = [b for b in self.buffers(recurse=False) if b.is_floating_point()]
            saved = [b.clone() for b in buffers]
            self.update_statistics(cos_target, norms)
            ok = finite.all()
            for b, old in zip(buffers, saved, strict=True):
                b.copy_(torch.where(ok, b, old))

    def loss(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        """Mean (label-smoothed) cross-entropy of the margin logits; see the class doc.

        Bad rows never put NaN into a gradient: a zero-norm embedding has cosine 0 to every
        class, contributes its constant term to the mean and gets zero gradient; a row with
        a NaN/Inf value is treated the same way for the gradient, but makes the returned loss
        NaN (so the caller sees it; ``MetricLearningModule`` then raises or skips the step)
        and leaves the running statistics (CurricularFace, AdaFace) unchanged. An empty
        batch raises ``ValueError``.

        With sharded classes every rank passes its own batch and gets the loss of all ranks'
        batches together (the same value on every rank).
        """
        return self._losses(embeddings, labels, None)[0]

    def prefix_losses(
        self, embeddings: Tensor, labels: Tensor | None, dims: Sequence[int]
    ) -> list[Tensor]:
        """The loss of each Matryoshka prefix (Kusupati et al. 2022), in the order of ``dims``.

        The prefix of size ``d`` of an embedding is its first ``d`` coordinates, L2-normalised;
        it is scored against the prefixes of the *same* class centres, re-normalised (the
        paper's "efficient" variant: one centre matrix, no extra parameters, and the centres'
        first coordinates learn to serve every prefix). A prefix of the full ``embedding_dim``
        is exactly :meth:`loss`. Everything that belongs to the step is shared by all
        prefixes: partial FC's sampled classes (one draw), the sharded gather, the streaming
        chunks; running statistics (CurricularFace's ``t``, AdaFace's norm mean and std) are
        updated once, in the pass of the largest prefix, and every prefix reads the updated
        values; AdaFace's norms are those of the whole embedding (the image-quality signal
        does not depend on the prefix). Non-finite rows behave as in :meth:`loss`.

        >>> import torch
        >>> from lightning_metric.heads import CosFaceHead
        >>> head = CosFaceHead(embedding_dim=4, num_classes=3)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> small, full = head.prefix_losses(x, y, dims=[2, 4])
        >>> bool(torch.equal(full, head.loss(x, y)))
        True
        """
        dims = check_dims(dims, "dims", maximum=self.embedding_dim)
        return self._losses(embeddings, labels, dims)

    def _losses(
        self, embeddings: Tensor, labels: Tensor | None, dims: tuple[int, ...] | None
    ) -> list[Tensor]:
        """The losses of ``dims`` (None: the whole embedding only, one loss)."""
        if labels is None:
            raise ValueError(
                f"{type(self).__name__}.loss needs labels; call forward(embeddings) without "
                "labels for inference logits"
            )
        if isinstance(embeddings, Tensor) and embeddings.ndim >= 1 and embeddings.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__}.loss got an empty batch (embeddings of shape "
                f"{tuple(embeddings.shape)}): the mean cross-entropy of no rows is undefined; "
                "drop empty batches before the loss"
            )
        self._check_built()
        with torch.autocast(embeddings.device.type, enabled=False):
            if self.class_shard is not None:
                # The shape before gathering; the labels after, where every rank sees all of
                # them and a bad one stops every rank at once (not one, leaving the rest
                # waiting in the next collective).
                self._check_embeddings(embeddings)
                embeddings, labels = gather_with_grad(embeddings), gather_uneven(labels)
            x, norms, finite = self._prepare(embeddings, labels)
            poison = torch.where(finite.all(), 0.0, float("nan"))
            step = self._select(labels.long())
            if dims is None:
                return [self._loss(x, norms, finite, step, self.weight, True) + poison]
            losses: dict[int, Tensor] = {}
            for d in reversed(dims):  # the largest first: its pass updates the statistics
                full = d == self.embedding_dim
                x_d = x if full else normalize_embeddings(x[:, :d])[0]
                weight = self.weight if full else self.weight[:, :d]
                losses[d] = self._loss(x_d, norms, finite, step, weight, d == dims[-1]) + poison
            return [losses[d] for d in dims]

    def _select(self, labels: Tensor) -> _Step:
        """The classes in this step's softmax (partial FC draws here, once per step)."""
        sample = self.training and self.sample_rate < 1.0
        shard = self.class_shard
        if shard is None:
            if not sample:
                return _Step(labels, labels, None, self.num_classes)
            class_index, local = self.select_classes(labels, self.num_classes)
            return _Step(labels, local, class_index, class_index.numel())
        here = (labels >= shard.start) & (labels < shard.stop)
        target_class = torch.where(here, labels - shard.start, -1)
        if not sample:
            return _Step(target_class, target_class, None, shard.num_classes)
        # Partial FC per shard: this shard's positives plus a uniform sample of the rest.
        class_index, picked = self.select_classes(target_class[here], shard.num_classes)
        local = torch.full_like(labels, -1)
        local[here] = picked
        return _Step(target_class, local, class_index, class_index.numel())

    def _loss(
        self, x: Tensor, norms: Tensor, finite: Tensor, step: _Step, weight: Tensor, update: bool
    ) -> Tensor:
        """The loss of prepared (unit, finite-masked) rows against the class centres
        ``weight`` (``self.weight`` or its column prefix): dense or streamed, maybe sampled;
        ``update``: whether this pass updates the running statistics."""
        if self.class_shard is not None:
            return self._sharded_loss(x, norms, finite, step, weight, update)
        chunk = self.chunk_size
        if chunk is None and step.n * self.sub_centers > AUTO_STREAM_ROWS:
            chunk = self._auto_chunk(x)
        if chunk is None:
            cos = self.class_cosine(x, self._rows(step.class_index, weight))
            logits = self._margin_logits(cos, step.local, norms, finite, update)
            return F.cross_entropy(logits, step.local, label_smoothing=self.label_smoothing)
        if self.training and self._keeps_statistics and update:
            with torch.no_grad():
                rows = weight[class_rows(step.target_class, self.sub_centers)]
                cos_t = self.target_cosine(x, rows)
            self._guarded_update(cos_t, norms.detach(), finite)
        return streaming_margin_cross_entropy(
            self,
            x,
            norms.detach(),
            step.target_class,
            step.local,
            step.class_index,
            chunk,
            self.label_smoothing,
            weight=weight,
        )

    def _auto_chunk(self, x: Tensor) -> int:
        block = _AUTO_BLOCK.get(x.device.type, _AUTO_BLOCK["cuda"])
        if self.reweights_negatives:  # its elementwise graph keeps ~4 blocks alive
            block //= 4
        return max(256, block // (x.shape[0] * self.sub_centers))

    def _sharded_loss(
        self, x: Tensor, norms: Tensor, finite: Tensor, step: _Step, weight: Tensor, update: bool
    ) -> Tensor:
        """The loss of every rank's rows (gathered) against this rank's classes.

        Always the streaming kernel: it combines the softmax over ranks and, with a chunk of
        the whole shard, computes what the dense path does.
        """
        shard = self.class_shard
        assert shard is not None
        if self.training and self._keeps_statistics and update:
            here = step.target_class >= 0
            with torch.no_grad():
                cos_t = torch.zeros_like(norms)
                rows = weight[class_rows(step.target_class[here], self.sub_centers)]
                cos_t[here] = self.target_cosine(x[here], rows)
                cos_t = all_reduce_sum(cos_t)
            self._guarded_update(cos_t, norms.detach(), finite)
        chunk = self.chunk_size or (
            self._auto_chunk(x) if step.n * self.sub_centers > AUTO_STREAM_ROWS else step.n
        )
        return streaming_margin_cross_entropy(
            self,
            x,
            norms.detach(),
            step.target_class,
            step.local,
            step.class_index,
            chunk,
            self.label_smoothing,
            shard,
            weight,
        )

    # -- sharding ----------------------------------------------------------------------------
    def shard(self, rank: int, world_size: int) -> None:
        """Keep only this rank's class centres (``shard_classes=True``; called on every rank).

        A head not built yet (meta, as ``MetricLearningModule`` creates it) builds only its own
        rows from rank 0's seed (one integer is broadcast): no rank ever holds the whole
        matrix, and the shards together equal the matrix one process draws. A built head
        (trained in one process, say) is cut instead, after rank 0's matrix is broadcast, so
        the shards are exactly the weights of rank 0. ``MetricLearningModule.setup`` calls
        this under DDP; a world of one leaves the head whole (and builds it).
        """
        # A negative rank would index the shard list from its end: a silently wrong shard.
        world_size = check_int("world_size", world_size, minimum=1)
        rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
        if world_size == 1 or self.class_shard is not None:
            self.materialize()
            return
        if type(self).loss is not MarginHead.loss or type(self).forward is not MarginHead.forward:
            raise ShardingError(
                f"{type(self).__name__} overrides loss() or forward(), so its class centres "
                f"cannot be sharded across the {world_size} DDP ranks; shard_classes=True needs "
                "a head that customises only the hooks target_logit / negative_logits / "
                "update_statistics / select_classes"
            )
        if self.num_classes < world_size:
            raise ShardingError(
                f"{type(self).__name__}(num_classes={self.num_classes}, shard_classes=True) "
                f"cannot give each of the {world_size} DDP ranks at least one class; use fewer "
                "ranks or shard_classes=False"
            )
        grouped = dist.is_available() and dist.is_initialized()
        start, stop = shard_bounds(self.num_classes, world_size)[rank]
        k = self.sub_centers
        with torch.no_grad():
            if self.weight.is_meta:
                if grouped:
                    # NCCL broadcasts device tensors only; the module is still on the CPU here.
                    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
                    seed = torch.tensor([self.init_seed], dtype=torch.int64, device=device)
                    dist.broadcast(seed, src=0)
                    self.init_seed = int(seed.item())
                local = self._initial_rows(start * k, stop * k)
            else:
                if grouped:
                    dist.broadcast(self.weight.data, src=0)
                local = self.weight.data[start * k : stop * k].clone()
        self._replace_weight(local)
        self.class_shard = ClassShard(rank, world_size, start, stop)

    def unshard(self) -> None:
        """Gather the shards back into the whole matrix on every rank (a collective)."""
        if self.class_shard is None:
            return
        with torch.no_grad():
            full = gather_uneven(self.weight.data)
        self.weight = nn.Parameter(full, requires_grad=self.weight.requires_grad)
        self.class_shard = None

    def extra_repr(self) -> str:
        text = (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"scale={self.scale}, sample_rate={self.sample_rate}"
        )
        if self.class_shard is not None:
            text += f", classes [{self.class_shard.start}, {self.class_shard.stop}) of this rank"
        return text
