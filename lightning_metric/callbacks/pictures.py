"""Pictures of the validation embeddings, sent to whichever logger can show images.

* :class:`EmbeddingProjection`: 2-D projection (PCA, t-SNE or UMAP) coloured by class.
* :class:`RetrievalGallery`: random and worst queries with their top-k neighbours.

Where a picture goes (:func:`log_figure`): a ``WandbLogger`` gets a ``wandb.Image``, a
``TensorBoardLogger`` a figure (``add_figure``), an ``MLFlowLogger`` an artifact; any other
logger (``CSVLogger``, ...) gets a PNG file in ``<log_dir>/pictures/``, and with no logger at
all the PNG goes to ``<default_root_dir>/pictures/``. ``save_dir`` additionally writes every
picture as a PNG there. Curves of recall@k per epoch are the loggers' own job (RecallAtK logs
the numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from matplotlib.figure import Figure

from lightning_metric.callbacks.collect import (
    Collected,
    EmbeddingCollector,
    EvaluationCallback,
    Stage,
    Step,
)
from lightning_metric.checks import check_choice, check_int, check_metric
from lightning_metric.retrieval.knn import Similarity

__all__ = ["EmbeddingProjection", "RetrievalGallery", "figure_to_array", "log_figure"]


# ---------------------------------------------------------------------- emitting


def figure_to_array(figure: Figure) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` rendering of a matplotlib figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _png_name(key: str, epoch: int) -> str:
    return f"{key.replace('/', '_')}_epoch{epoch:03d}.png"


def _save_png(figure: Figure, directory: Path, key: str, epoch: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _png_name(key, epoch)
    figure.savefig(path, dpi=figure.dpi)
    return path


def _send(logger: Logger, figure: Figure, key: str, step: int, epoch: int) -> Optional[str]:
    """Give the figure to one logger; returns where it went, or None if the logger cannot
    take images (its log directory then gets a PNG)."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(
            key=key, images=[figure_to_array(figure)], step=step, caption=[f"epoch {epoch}"]
        )
        return "wandb"
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure(key, figure, global_step=step, close=False)
        return "tensorboard"
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_figure(logger.run_id, figure, f"pictures/{_png_name(key, epoch)}")
        return "mlflow"
    return None


def log_figure(
    trainer: pl.Trainer, figure: Figure, key: str, save_dir: Optional[str] = None
) -> list[str]:
    """Send ``figure`` to every logger of ``trainer`` that can show images, a PNG to the log
    directory of the others (or to ``default_root_dir`` without a logger), and a PNG to
    ``save_dir`` if given. Returns the destinations (logger names and file paths)."""
    step, epoch = trainer.global_step, trainer.current_epoch
    destinations: list[str] = []
    for logger in trainer.loggers:
        sent = _send(logger, figure, key, step, epoch)
        if sent is not None:
            destinations.append(sent)
            continue
        log_dir = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
        destinations.append(str(_save_png(figure, Path(log_dir) / "pictures", key, epoch)))
    if not trainer.loggers:
        directory = Path(trainer.default_root_dir) / "pictures"
        destinations.append(str(_save_png(figure, directory, key, epoch)))
    if save_dir is not None:
        destinations.append(str(_save_png(figure, Path(save_dir), key, epoch)))
    return destinations


# ---------------------------------------------------------------------- shared shell


class _ValidationPicture(EvaluationCallback):
    """Collects the validation embeddings of due epochs; subclasses draw the figure."""

    key: str
    stages: tuple[Stage, ...] = ("val",)

    def __init__(
        self,
        every_n_epochs: int = 1,
        seed: int = 0,
        dataloader_idx: int = 0,
        save_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            every_n_epochs: draw on epochs 0, n, 2n, ...
            seed: the random choices of the picture.
            dataloader_idx: which validation dataloader to draw.
            save_dir: also write each picture as a PNG here.
        """
        super().__init__()
        check_int("every_n_epochs", every_n_epochs, minimum=1)
        check_int("dataloader_idx", dataloader_idx, minimum=0)
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.dataloader_idx = dataloader_idx
        self.save_dir = save_dir
        self._collector = EmbeddingCollector(type(self).__name__)
        self.last_destinations: list[str] = []

    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self._collector.reset()

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Step) -> None:
        if step.dataloader_idx == self.dataloader_idx and self._due(trainer):
            self._collector.update(pl_module, step.outputs, step.batch)

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if not self._due(trainer) or not len(self._collector):
            return
        data = self._collector.collected(trainer, pl_module, stage, self.dataloader_idx)
        self._collector.reset()
        if not trainer.is_global_zero:
            return
        figure = self.draw(data, trainer)
        if figure is not None:
            self.last_destinations = log_figure(trainer, figure, self.key, self.save_dir)

    def draw(self, data: Collected, trainer: pl.Trainer) -> Optional[Figure]:
        raise NotImplementedError


def _class_names(dataset: Any) -> Optional[Sequence[Any]]:
    return getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)


def _name(names: Optional[Sequence[Any]], label: int) -> str:
    if names is not None and 0 <= label < len(names):
        return str(names[label])
    return str(label)


# ---------------------------------------------------------------------- projection

Method = Literal["pca", "tsne", "umap"]
_METHODS = ("pca", "tsne", "umap")


def project_2d(x: np.ndarray, method: Method = "pca", seed: int = 0) -> np.ndarray:
    """``[N, D] -> [N, 2]`` by PCA (exact SVD), t-SNE (scikit-learn) or UMAP (umap-learn)."""
    check_choice("method", method, _METHODS)
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        raise ValueError(f"a 2-D projection needs at least 3 points, got {len(x)}")
    if method == "pca":
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        out = centred @ vt[:2].T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # D == 1 still gives two columns
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, len(x) - 1))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    import umap  # the last of _METHODS

    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)


class EmbeddingProjection(_ValidationPicture):
    """A 2-D projection of the validation embeddings, one colour per class, logged as
    ``val/embedding_projection`` every ``every_n_epochs`` validation epochs.

    Args:
        method: ``"pca"`` (default, fast and deterministic), ``"tsne"`` (scikit-learn) or
            ``"umap"`` (needs ``umap-learn``).
        max_classes: draw this many classes (chosen by ``seed``); colours stay tellable apart.
        max_points: at most this many points (chosen by ``seed``) of those classes.
        **kwargs: ``every_n_epochs``, ``seed`` (the class/point choice and t-SNE/UMAP),
            ``dataloader_idx``, ``save_dir``: see ``_ValidationPicture``.
    """

    key = "val/embedding_projection"

    def __init__(
        self,
        method: Method = "pca",
        max_classes: int = 20,
        max_points: int = 2000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("method", method, _METHODS)
        if method == "umap":
            try:
                import umap  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "EmbeddingProjection(method='umap') needs umap-learn: pip install umap-learn"
                ) from err
        check_int("max_classes", max_classes, minimum=1)
        check_int("max_points", max_points, minimum=1)
        self.method: Method = method
        self.max_classes = max_classes
        self.max_points = max_points

    def draw(self, data: Collected, trainer: pl.Trainer) -> Optional[Figure]:
        index, embeddings, labels = (t.numpy() for t in data[:3])
        dataset = data.dataset
        rng = np.random.default_rng(self.seed)
        classes = np.unique(labels)
        if len(classes) > self.max_classes:
            classes = np.sort(rng.choice(classes, self.max_classes, replace=False))
        rows = np.flatnonzero(np.isin(labels, classes))
        if len(rows) > self.max_points:
            rows = np.sort(rng.choice(rows, self.max_points, replace=False))
        if len(rows) < 3:
            warnings.warn(
                f"EmbeddingProjection: only {len(rows)} validation points, nothing to draw",
                stacklevel=2,
            )
            return None
        xy = project_2d(embeddings[rows], self.method, self.seed)
        names = _class_names(dataset)
        figure = Figure(figsize=(7.5, 6), dpi=100, layout="constrained")
        ax = figure.add_subplot()
        cmap_name = "tab20" if len(classes) <= 20 else "turbo"
        from matplotlib import colormaps

        cmap = colormaps[cmap_name].resampled(max(len(classes), 2))
        for i, c in enumerate(classes):
            sel = labels[rows] == c
            ax.scatter(
                xy[sel, 0], xy[sel, 1], s=14, color=cmap(i), label=_name(names, int(c)), alpha=0.85
            )
        if len(classes) <= 20:
            ax.legend(
                title="class",
                fontsize=7,
                title_fontsize=8,
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                frameon=False,
            )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            f"{self.method.upper()} of validation embeddings, epoch {trainer.current_epoch} "
            f"({len(rows)} points, {len(classes)} classes)",
            fontsize=10,
        )
        return figure


# ---------------------------------------------------------------------- gallery


def _image(dataset: Any, i: int) -> np.ndarray:
    """Item ``i`` of the dataset as a displayable ``[H, W]`` or ``[H, W, 3]`` array in [0, 1]."""
    item = dataset[i]
    x = item["x"] if isinstance(item, dict) else item[0]
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0)
    arr = x.numpy()
    # Per-image min-max scaling undoes any mean/std normalisation for display.
    low, high = float(arr.min()), float(arr.max())
    return (arr - low) / (high - low) if high > low else np.zeros_like(arr)


class RetrievalGallery(_ValidationPicture):
    """Queries (``num_random`` chosen by ``seed``, then the ``num_worst``) with their ``k``
    nearest validation neighbours, logged as ``val/retrieval_gallery``.

    Neighbours get a green border when their label equals the query's, red otherwise; each
    title gives the label and the distance (``1 - cosine`` for ``cosine``, ``-ip`` for
    ``ip``, squared euclidean for ``l2``). "Worst" queries are those whose nearest neighbour
    has another label, most confident mistake first. Search is leave-one-out over the whole
    validation set, as RecallAtK does. Images are read back from the validation dataset by
    the batches' ``index`` (so it must be a map-style dataset).

    Args:
        k: neighbours per query.
        num_random: random queries (fixed by ``seed`` across epochs).
        num_worst: worst queries.
        metric: ``"cosine"``, ``"ip"`` or ``"l2"``.
        **kwargs: ``every_n_epochs``, ``seed`` (the random queries), ``dataloader_idx``,
            ``save_dir``: see ``_ValidationPicture``.
    """

    key = "val/retrieval_gallery"

    def __init__(
        self,
        k: int = 5,
        num_random: int = 4,
        num_worst: int = 4,
        metric: Similarity = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_int("k", k, minimum=1)
        check_int("num_random", num_random, minimum=0)
        check_int("num_worst", num_worst, minimum=0)
        if num_random + num_worst == 0:
            raise ValueError("num_random + num_worst must be >= 1: there would be no query to draw")
        check_metric(metric)
        self.k = k
        self.num_random = num_random
        self.num_worst = num_worst
        self.metric: Similarity = metric

    def select_queries(
        self, labels: np.ndarray, neighbours: np.ndarray, scores: np.ndarray
    ) -> list[tuple[str, int]]:
        """``[("random" | "worst", row), ...]``: the queries to draw, in drawing order."""
        rng = np.random.default_rng(self.seed)
        n = len(labels)
        random_rows = rng.choice(n, min(self.num_random, n), replace=False)
        wrong = np.flatnonzero(labels[neighbours[:, 0]] != labels)
        # Most confident mistake first: highest similarity, or smallest l2 distance.
        confidence = -scores[wrong, 0] if self.metric == "l2" else scores[wrong, 0]
        worst = wrong[np.argsort(-confidence, kind="stable")][: self.num_worst]
        return [("random", int(r)) for r in random_rows] + [("worst", int(r)) for r in worst]

    def _distance(self, score: float) -> float:
        return {"cosine": 1.0 - score, "ip": -score, "l2": score}[self.metric]

    def draw(self, data: Collected, trainer: pl.Trainer) -> Optional[Figure]:
        index, embeddings, labels = (t.numpy() for t in data[:3])
        dataset = data.dataset
        from lightning_metric.retrieval import knn

        if dataset is None or not hasattr(dataset, "__getitem__"):
            warnings.warn(
                "RetrievalGallery: the validation dataloader has no map-style dataset to read "
                "images from; no gallery drawn",
                stacklevel=2,
            )
            return None
        k = min(self.k, len(labels) - 1)
        if k < 1:
            return None
        found = knn(torch.from_numpy(embeddings), None, k=k, metric=self.metric)
        neighbours, scores = found.indices.numpy(), found.values.numpy()
        queries = self.select_queries(labels, neighbours, scores)
        names = _class_names(dataset)
        cols = k + 1
        figure = Figure(figsize=(1.45 * cols, 1.7 * len(queries)), dpi=100, layout="constrained")
        axes = figure.subplots(len(queries), cols, squeeze=False)
        for r, (kind, q) in enumerate(queries):
            tiles = [(q, "#1f77b4", f"{kind} query\n{_name(names, int(labels[q]))}")]
            for j in range(k):
                nb = int(neighbours[q, j])
                colour = "#2ca02c" if labels[nb] == labels[q] else "#d62728"
                title = (
                    f"{_name(names, int(labels[nb]))}\nd={self._distance(float(scores[q, j])):.3f}"
                )
                tiles.append((nb, colour, title))
            for c, (row, colour, title) in enumerate(tiles):
                ax = axes[r, c]
                img = _image(dataset, int(index[row]))
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_color(colour)
                    spine.set_linewidth(4)
                ax.set_title(title, fontsize=7, color=colour if c else "black")
        figure.suptitle(
            f"Retrieval gallery, epoch {trainer.current_epoch}: query (blue), top-{k} "
            "neighbours (green: same label, red: different)",
            fontsize=9,
        )
        return figure
