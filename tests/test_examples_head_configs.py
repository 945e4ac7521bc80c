"""Every head family's overlay on the main job trains (a few batches, on digits) through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from repo_paths import CONFIGS

from lightning_metric.cli import main

HEAD_CONFIGS = {
    "normsoftmax.yaml": "NormSoftmaxHead",
    "cosface.yaml": "CosFaceHead",
    "subcenter_arcface.yaml": "SubCenterArcFaceHead",
    "combined_margin.yaml": "CombinedMarginHead",
    "curricularface.yaml": "CurricularFaceHead",
    "adaface.yaml": "AdaFaceHead",
}


@pytest.mark.parametrize("name", list(HEAD_CONFIGS))
def test_head_config_fits(name: str, tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "glyphs_arcface.yaml"),
            "--config",
            str(CONFIGS / "heads" / name),
            # Same model and head; the seconds-sized data set so the test stays fast.
            "--data=lightning_metric.data.DigitsDataModule",
            "--model.neck.init_args.in_features=512",  # 8x8 digits: 128 x 2 x 2
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=lightning_metric.callbacks.RecallAtK",
        ]
    )
    assert type(cli.model.head).__name__ == HEAD_CONFIGS[name]
    assert cli.model.head.num_classes == cli.datamodule.num_classes
    overlay = yaml.safe_load((CONFIGS / "heads" / name).read_text())["model"]["init_args"]["head"]
    for key, value in overlay.get("init_args", {}).items():
        assert getattr(cli.model.head, key) == pytest.approx(value), key
    assert 0.0 <= cli.trainer.callback_metrics["val/recall@1"].item() <= 1.0
