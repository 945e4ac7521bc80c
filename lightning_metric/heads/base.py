"""`MarginHead`: the one pipeline every margin-softmax head shares.

normalise -> cosine -> (class-centre sampling) -> margin on the target -> scale -> CE.
Subclasses supply only the margin (``_target_logit``) and, rarely, a rule for the
non-target cosines (``_negative_logits``) or a running statistic (``_update_statistics``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metric.checks import check_int, check_labels, check_num_classes, check_real
from lightning_metric.heads.functional import l2_normalize, normalize_embeddings
from lightning_metric.heads.sampling import class_rows, sample_classes
from lightning_metric.heads.streaming import streaming_margin_cross_entropy

__all__ = ["MarginHead"]

# Above this many (sampled) class rows ``loss()`` streams by default: a dense [B, C] float32
# logit matrix and its softmax are then the largest activations of a typical model.
AUTO_STREAM_ROWS = 16384
# Elements of one [B, chunk] block (16 MB on CPU, 128 MB on CUDA). Few, large chunks: each
# chunk costs ~30 kernel launches / OpenMP parallel regions, and on a busy CPU every parallel
# region waits for a core (4k-class chunks ran 7x slower than 32k ones under load).
_AUTO_BLOCK = {"cpu": 2**22, "cuda": 2**25}


class MarginHead(nn.Module):
    """Base class of the margin-softmax heads (NormSoftmax, CosFace, ArcFace, ...).

    **Inputs are un-normalised.** ``MetricLearningModule`` hands a head the neck's output
    *before* L2 normalisation (AdaFace reads the feature norm as an image-quality signal);
    every head normalises internally, so passing unit vectors is also fine. Retrieval and
    ``MetricLearningModule.forward`` use the normalised embedding.

    - ``weight``: ``nn.Parameter [num_classes * sub_centers, embedding_dim]`` (the class
      centres; ``sub_centers`` is 1 except for ``SubCenterArcFaceHead``, whose row
      ``c * K + k`` is sub-centre ``k`` of class ``c``).
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
    """

    sub_centers: int = 1
    # Upper bound of ``_negative_logits`` (unscaled); the streaming loss sizes its shift by it.
    max_negative_cos: float = 1.0

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float,
        sample_rate: float = 1.0,
        label_smoothing: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1)
        num_classes = check_num_classes(num_classes)
        scale = _real("scale", scale)
        sample_rate = _real("sample_rate", sample_rate)
        label_smoothing = _real("label_smoothing", label_smoothing)
        _check(math.isfinite(scale) and scale > 0, "scale", scale, "must be finite and > 0")
        _check(0.0 < sample_rate <= 1.0, "sample_rate", sample_rate, "must be in (0, 1]")
        _check(
            0.0 <= label_smoothing < 1.0, "label_smoothing", label_smoothing, "must be in [0, 1)"
        )
        if chunk_size is not None:
            chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        self.label_smoothing = float(label_smoothing)
        self.chunk_size = chunk_size
        self.weight = nn.Parameter(torch.empty(num_classes * self.sub_centers, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # insightface's init; the scale of W is irrelevant to cosines, only its directions.
        nn.init.normal_(self.weight, std=0.01)

    # -- what subclasses override (all in float32, unscaled cosine units) ------------------
    def _target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        """Margined target cosine ``[B]`` from the plain one; ``norms`` are detached."""
        return cos_target

    def _negative_logits(self, cos: Tensor, target: Tensor) -> Tensor:
        """Non-target cosines ``[B, n]`` given the detached margined target ``[B]``."""
        return cos

    def _update_statistics(self, cos_target: Tensor, norms: Tensor) -> None:
        """Update running statistics (training only, before the margin is applied)."""

    # -- shared pipeline --------------------------------------------------------------------
    @property
    def _reweights_negatives(self) -> bool:
        return type(self)._negative_logits is not MarginHead._negative_logits

    @property
    def _plain_negatives(self) -> bool:
        """True when non-target logits are just ``scale * cos`` (one centre, no re-weighting)."""
        return self.sub_centers == 1 and not self._reweights_negatives

    def _class_cosine(self, x: Tensor, rows: Tensor) -> Tensor:
        """Cosines ``[B, n]`` of unit ``x [B, D]`` to ``n`` classes' rows ``[n * K, D]``."""
        cos = x @ l2_normalize(rows)[0].T
        if self.sub_centers > 1:
            cos = cos.view(x.shape[0], -1, self.sub_centers).amax(dim=-1)
        return cos

    def _chunk_logits(self, x: Tensor, rows: Tensor, target: Tensor, shift: Tensor) -> Tensor:
        """Non-target logits of one class chunk minus a per-row ``shift [B]``.

        The streaming loss's inner kernel (the target column is not special here). For
        heads that leave negatives alone the scale and shift ride inside one ``addmm``:
        two fewer passes over the ``[B, chunk]`` block, which dominate on CPU.
        """
        if self._plain_negatives:
            w = l2_normalize(rows)[0]
            return torch.addmm(shift.neg().unsqueeze(1), x, w.T, alpha=self.scale)
        cos = self._class_cosine(x, rows)
        return self.scale * self._negative_logits(cos, target) - shift.unsqueeze(1)

    def _target_cosine(self, x: Tensor, target_rows: Tensor) -> Tensor:
        """Cosine ``[B]`` of each row of ``x`` to its own class, given that class's rows
        ``[B * K, D]`` (``weight[class_rows(labels, K)]``): never touches other classes."""
        return self._sub_center_cosines(x, target_rows).amax(dim=-1)

    def _sub_center_cosines(self, x: Tensor, target_rows: Tensor) -> Tensor:
        w = l2_normalize(target_rows)[0].view(x.shape[0], self.sub_centers, -1)
        return (w @ x.unsqueeze(-1)).squeeze(-1)

    def _rows(self, class_index: Tensor | None) -> Tensor:
        if class_index is None:
            return self.weight
        return self.weight[class_rows(class_index, self.sub_centers)]

    def _prepare(self, embeddings: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Unit rows, norms and the finite-row mask (see ``functional.normalize_embeddings``)."""
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
        if labels is not None:
            check_labels("labels", labels, self.num_classes, length=embeddings.shape[0])
        return normalize_embeddings(embeddings)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Scaled cosine logits ``[B, C]``; a row with a NaN/Inf embedding gets NaN logits
        (and no gradient), a zero row cosine 0 to every class."""
        with torch.autocast(embeddings.device.type, enabled=False):
            x, norms, finite = self._prepare(embeddings, labels)
            cos = self._class_cosine(x, self.weight)
            if labels is None:
                logits = self.scale * cos
            else:
                logits = self._margin_logits(cos, labels.long(), norms, finite)
            return torch.where(finite.unsqueeze(1), logits, float("nan"))

    def _margin_logits(
        self, cos: Tensor, labels: Tensor, norms: Tensor, finite: Tensor | None = None
    ) -> Tensor:
        cos_t = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
        if self.training:
            self._guarded_update(cos_t.detach(), norms.detach(), finite)
        target = self._target_logit(cos_t, norms.detach())
        logits = self._negative_logits(cos, target.detach())
        return self.scale * logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1))

    def _guarded_update(self, cos_target: Tensor, norms: Tensor, finite: Tensor | None) -> None:
        """``_update_statistics``, undone when a row of the batch was not finite.

        The rows were zeroed by ``_prepare``, so the update itself stays finite; restoring the
        buffers (no host sync) keeps a poisoned batch out of the running statistics.
        """
        if type(self)._update_statistics is MarginHead._update_statistics:
            return
        if finite is None:
            self._update_statistics(cos_target, norms)
            return
        with torch.no_grad():
            buffers = [b for b in self.buffers(recurse=False) if b.is_floating_point()]
            saved = [b.clone() for b in buffers]
            self._update_statistics(cos_target, norms)
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
        """
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
        with torch.autocast(embeddings.device.type, enabled=False):
            x, norms, finite = self._prepare(embeddings, labels)
            poison = torch.where(finite.all(), 0.0, float("nan"))
            return self._loss(x, norms, finite, labels) + poison

    def _loss(self, x: Tensor, norms: Tensor, finite: Tensor, labels: Tensor) -> Tensor:
        """The loss of prepared (unit, finite-masked) rows: dense or streamed, maybe sampled."""
        labels = labels.long()
        local, class_index, n = labels, None, self.num_classes
        if self.training and self.sample_rate < 1.0:
            class_index, local = sample_classes(labels, self.num_classes, self.sample_rate)
            n = class_index.numel()
        chunk = self.chunk_size
        if chunk is None and n * self.sub_centers > AUTO_STREAM_ROWS:
            block = _AUTO_BLOCK.get(x.device.type, _AUTO_BLOCK["cuda"])
            if self._reweights_negatives:  # its elementwise graph keeps ~4 blocks alive
                block //= 4
            chunk = max(256, block // (x.shape[0] * self.sub_centers))
        if chunk is None:
            cos = self._class_cosine(x, self._rows(class_index))
            logits = self._margin_logits(cos, local, norms, finite)
            return F.cross_entropy(logits, local, label_smoothing=self.label_smoothing)
        if self.training:
            with torch.no_grad():
                rows = self.weight[class_rows(labels, self.sub_centers)]
                cos_t = self._target_cosine(x, rows)
            self._guarded_update(cos_t, norms.detach(), finite)
        return streaming_margin_cross_entropy(
            self, x, norms.detach(), labels, local, class_index, chunk, self.label_smoothing
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"scale={self.scale}, sample_rate={self.sample_rate}"
        )


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")


_real = check_real  # the heads' float hyper-parameters
