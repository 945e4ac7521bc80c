"""The `lightning-metric` command, driven in-process as a user would from the shell."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from repo_paths import ROOT
from tiny_digits import DIGITS, smoke_args

from lightning_metric import MetricLearningModule
from lightning_metric.cli import main


def test_fit_then_test_from_checkpoint_logs_recall(tmp_path, capsys):
    cli = main(["fit", "--config", DIGITS, *smoke_args(tmp_path)])
    recall = cli.trainer.callback_metrics["val/recall@1"].item()
    assert 0.0 <= recall <= 1.0
    ckpts = list(Path(tmp_path).rglob("*.ckpt"))
    assert ckpts, "fit must leave a checkpoint behind"
    # The head was sized from the data module by the CLI link, not from YAML.
    assert cli.model.head.weight.shape == (cli.datamodule.num_classes, 32)

    # A CLI checkpoint rebuilds its own model from the saved config, weights included.
    restored = MetricLearningModule.load_from_checkpoint(ckpts[0], weights_only=True).eval()
    x = next(iter(cli.datamodule.test_dataloader()))["x"]
    torch.testing.assert_close(restored(x), cli.model.eval()(x))

    test_cli = main(["test", "--config", DIGITS, *smoke_args(tmp_path), f"--ckpt_path={ckpts[0]}"])
    assert "test/recall@1" in test_cli.trainer.callback_metrics
    assert "test/recall@1" in capsys.readouterr().out


def test_print_config_is_complete_and_round_trips(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DIGITS, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    init = config["model"]["init_args"]
    assert init["head"]["class_path"] == "lightning_metric.heads.ArcFaceHead"
    assert init["backbone"]["class_path"] == "lightning_metric.backbones.SmallCNN"
    assert config["data"]["class_path"] == "lightning_metric.data.DigitsDataModule"
    # What --print_config prints must itself be a valid config that prints the same.
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "lightning-metric").exists()


@pytest.mark.parametrize(
    "logger_args, produced",
    [
        ([], "wandb/offline-run-*"),  # the config's own WandbLogger, offline without an account
        (
            ["--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger"],
            "**/events.out.tfevents*",
        ),
    ],
)
def test_example_config_logs_through_wandb_offline_or_a_swapped_logger(
    tmp_path, logger_args, produced
):
    cli = main(
        [
            "fit",
            "--config",
            DIGITS,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false",
            *logger_args,
        ]
    )
    assert "val/recall@1" in cli.trainer.callback_metrics
    assert list(tmp_path.glob(produced)), f"no {produced} under {tmp_path}"


def test_logger_off_drops_the_lr_monitor_before_any_process_starts():
    """`--trainer.logger false` on a config with a LearningRateMonitor: Lightning would refuse
    the monitor at fit start (under DDP after the processes started); the CLI drops it."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lightning_metric.cli import main as cli_main

    config = str(ROOT / "examples/configs/glyphs_arcface.yaml")
    off = cli_main(["--config", config, "--trainer.logger=false"], run=False)
    csv = "--trainer.logger=lightning.pytorch.loggers.CSVLogger"
    on = cli_main(["--config", config, csv], run=False)
    assert not any(isinstance(c, LearningRateMonitor) for c in off.trainer.callbacks)
    assert any(isinstance(c, LearningRateMonitor) for c in on.trainer.callbacks)


def test_best_glyphs_overlay_builds_a_model_whose_neck_fits_its_backbone():
    """The overlay's in_features is written by hand: a forward pass on a glyph-sized batch
    proves it matches the wider backbone's flattened map."""
    import torch

    from lightning_metric.cli import main as cli_main

    configs = [
        ROOT / "examples/configs/glyphs_arcface.yaml",
        ROOT / "examples/configs/glyphs_best.yaml",
    ]
    args = [a for c in configs for a in ("--config", str(c))]
    cli = cli_main([*args, "--trainer.logger=false"], run=False)
    assert cli.model.backbone.num_features == 160 and cli.trainer.max_epochs == 7
    out = cli.model.eval()(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 128)
