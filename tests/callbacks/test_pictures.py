"""EmbeddingProjection and RetrievalGallery through CSV, TensorBoard, W&B (offline) and no logger."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.callbacks import EmbeddingProjection, RecallAtK, RetrievalGallery
from lightning_metric.callbacks.pictures import project_2d
from lightning_metric.data import DigitsDataModule
from lightning_metric.heads import ArcFaceHead

KEYS = ("val/embedding_projection", "val/retrieval_gallery")


def _model() -> MetricLearningModule:
    torch.manual_seed(0)
    return MetricLearningModule(
        SmallCNN(in_channels=1, width=8), head=ArcFaceHead, num_classes=5, embedding_dim=16
    )


def _validate(tmp_path: Path, logger: object, callbacks: list[pl.Callback] | None = None) -> list:
    callbacks = callbacks or [
        EmbeddingProjection(),
        RetrievalGallery(k=3, num_random=2, num_worst=2),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,  # type: ignore[arg-type]
        callbacks=list(callbacks),  # the Trainer appends its own to the list it gets
        limit_val_batches=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_model(), datamodule=DigitsDataModule(batch_size=64, seed=0))
    return callbacks


def _assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side
        # not a blank canvas: the picture has several distinct colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def test_csv_logger_gets_png_files(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    callbacks = _validate(tmp_path, logger)
    pictures = Path(logger.log_dir) / "pictures"
    for key, callback in zip(KEYS, callbacks, strict=True):
        path = pictures / f"{key.replace('/', '_')}_epoch000.png"
        assert callback.last_destinations == [str(path)]
        _assert_png(path)


def test_tensorboard_logger_gets_figures(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callbacks = _validate(tmp_path, logger)
    assert [c.last_destinations for c in callbacks] == [["tensorboard"], ["tensorboard"]]
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert set(KEYS) <= set(events.Tags()["images"])
    image = events.Images("val/retrieval_gallery")[0]
    assert image.width > 200 and image.height > 200


def test_wandb_offline_gets_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="lightning-metric-tests", save_dir=str(tmp_path), offline=True)
    callbacks = _validate(tmp_path, logger)
    assert [c.last_destinations for c in callbacks] == [["wandb"], ["wandb"]]
    run_dir = Path(logger.experiment.dir)
    logger.experiment.finish()
    for key in KEYS:
        folder = run_dir / "media" / "images" / Path(key).parent
        files = list(folder.glob(f"{Path(key).name}_*.png"))
        assert len(files) == 1, f"no W&B image for {key} in {folder}"
        _assert_png(files[0])


def test_no_logger_and_save_dir_and_frequency(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    projection = EmbeddingProjection(every_n_epochs=2, save_dir=str(extra))
    gallery = RetrievalGallery(k=2, num_random=1, num_worst=1, every_n_epochs=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[projection, gallery, RecallAtK(k=(1,))],
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_model(), datamodule=DigitsDataModule(batch_size=64, seed=0))
    # epoch 0 drawn, epoch 1 skipped (every 2nd), the sanity check never drawn
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "val_embedding_projection_epoch000.png",
        "val_retrieval_gallery_epoch000.png",
    ]
    assert [p.name for p in extra.iterdir()] == ["val_embedding_projection_epoch000.png"]
    assert "val/recall@1" in trainer.callback_metrics  # RecallAtK unaffected


def test_gallery_selects_seeded_random_and_most_confident_mistakes() -> None:
    gallery = RetrievalGallery(k=2, num_random=2, num_worst=2, seed=3)
    labels = np.array([0, 0, 1, 1, 2])
    neighbours = np.array([[1, 2], [2, 0], [0, 3], [2, 1], [0, 1]])
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.95, 0.2], [0.5, 0.4], [0.3, 0.2]])
    picks = gallery.select_queries(labels, neighbours, scores)
    # wrong top-1: rows 1 (0.8), 2 (0.95), 4 (0.3) -> two most confident are 2 then 1
    assert picks[2:] == [("worst", 2), ("worst", 1)]
    random_rows = [r for kind, r in picks[:2]]
    assert len(set(random_rows)) == 2
    assert picks == gallery.select_queries(labels, neighbours, scores)  # seeded
    l2 = RetrievalGallery(k=2, num_random=0, num_worst=1, metric="l2")
    # for l2 the smallest distance is the most confident mistake
    assert l2.select_queries(labels, neighbours, scores) == [("worst", 4)]


def test_pca_projection_keeps_the_main_axes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    xy = project_2d(x, "pca")
    assert xy.shape == (200, 2)
    var = xy.var(axis=0)
    assert var[0] > var[1] > 1.0 and var[0] == pytest.approx(x[:, 0].var(), rel=0.1)
    assert project_2d(x[:30], "tsne").shape == (30, 2)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (
            lambda: EmbeddingProjection(method="mds"),
            r"`method` must be one of \('pca', 'tsne', 'umap'\), got 'mds'",
        ),
        (lambda: EmbeddingProjection(every_n_epochs=0), "`every_n_epochs` must be an integer >= 1"),
        (lambda: EmbeddingProjection(max_points=0), "`max_points` must be an integer >= 1"),
        (lambda: RetrievalGallery(k=0), "`k` must be an integer >= 1"),
        (lambda: RetrievalGallery(num_random=0, num_worst=0), "no query to draw"),
        (lambda: RetrievalGallery(metric="dot"), "`metric` must be one of"),
    ],
)
def test_bad_arguments(factory: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()  # type: ignore[operator]
