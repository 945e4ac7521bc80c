"""Render the README's pictures from a short glyphs run: one of each picture callback.

    python scripts/render_readme_pictures.py            # writes docs/embedding_projection.png
                                                        #    and docs/retrieval_gallery.png

A small CNN trains with ArcFace for a few epochs on 400 glyph classes (a few minutes on a
laptop CPU); the pictures show the validation classes, which the model never trained on.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.callbacks import EmbeddingProjection, RecallAtK, RetrievalGallery
from lightning_metric.data import GlyphsDataModule
from lightning_metric.heads import ArcFaceHead


class _NamedGlyphs(GlyphsDataModule):
    """Glyphs whose class names are the characters themselves, for legends and titles."""

    def build_datasets(self) -> dict[str, Any]:
        datasets = super().build_datasets()
        for dataset in datasets.values():
            dataset.class_names = [chr(cp) for cp in dataset.classes]
        return datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="directory for the PNG files")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-classes", type=int, default=400)
    args = parser.parse_args()

    pl.seed_everything(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        last = args.epochs - 1
        # Every epoch is drawn into tmp; the last one is copied out.
        projection = EmbeddingProjection(max_classes=12, save_dir=tmp, every_n_epochs=1)
        gallery = RetrievalGallery(k=6, num_random=3, num_worst=3, save_dir=tmp, every_n_epochs=1)
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            callbacks=[RecallAtK(k=(1,)), projection, gallery],
            default_root_dir=tmp,
        )
        data = _NamedGlyphs(batch_size=128, max_classes=args.max_classes, seed=0)
        model = MetricLearningModule(
            SmallCNN(in_channels=1, width=32),
            head=ArcFaceHead,
            num_classes=data.num_classes,
            embedding_dim=64,
        )
        trainer.fit(model, datamodule=data)
        for key in ("embedding_projection", "retrieval_gallery"):
            src = Path(tmp) / f"val_{key}_epoch{last:03d}.png"
            shutil.copyfile(src, out / f"{key}.png")
            print(f"wrote {out / f'{key}.png'}")
        print(
            f"val/recall@1 after {args.epochs} epochs: {float(trainer.callback_metrics['val/recall@1']):.3f}"
        )


if __name__ == "__main__":
    main()
