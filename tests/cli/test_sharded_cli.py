"""The main job's config with ``--model.head.init_args.shard_classes=true`` trains under DDP (2
spawned gloo ranks) and its checkpoint then runs ``test`` in one process; with the per-rank
checkpointing strategy, ``test``, ``predict`` and ``export`` run from the file alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from repo_paths import CONFIGS

from lightning_metric.centre_checkpoint import centres_directory
from lightning_metric.cli import main
from lightning_metric.cli.console import main as console_main


def _args(tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "glyphs_arcface.yaml"),
        "--data=lightning_metric.data.DigitsDataModule",  # the seconds-sized data set
        "--model.neck.init_args.in_features=512",  # 8x8 digits: 128 x 2 x 2
        "--model.head.init_args.shard_classes=true",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]


@pytest.mark.ddp
def test_sharded_fit_under_ddp_then_test_in_one_process(tmp_path: Path) -> None:
    fit = main(
        [
            "fit",
            *_args(tmp_path),
            # Lightning's ddp_spawn, meeting through a file rather than a port (tests only).
            "--trainer.strategy=ddp_harness.FileRendezvousDDP",
            f"--trainer.strategy.folder={tmp_path}",
            "--trainer.devices=2",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
        ]
    )
    assert 0.0 <= fit.trainer.callback_metrics["val/recall@1"].item() <= 1.0
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts
    saved = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    num_classes = fit.datamodule.num_classes
    assert saved["state_dict"]["head.weight"].shape == (num_classes, 128)  # every centre

    test = main(["test", *_args(tmp_path), "--trainer.devices=1", f"--ckpt_path={ckpts[-1]}"])
    assert test.model.head.class_shard is None  # one process: the switch is a no-op
    torch.testing.assert_close(test.model.head.weight, saved["state_dict"]["head.weight"])
    assert 0.0 <= test.trainer.callback_metrics["test/recall@1"].item() <= 1.0


def test_shard_classes_on_a_pml_loss_is_a_parser_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "glyphs_triplet.yaml"),
                "--model.loss.init_args.shard_classes=true",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert "shard_classes" in capsys.readouterr().err


@pytest.mark.ddp
def test_per_rank_checkpoint_of_fit_runs_test_predict_and_export_in_one_process(
    tmp_path: Path,
) -> None:
    main(
        [
            "fit",
            *_args(tmp_path),
            "--trainer.strategy=ddp_harness.FileRendezvousShardedDDP",
            f"--trainer.strategy.folder={tmp_path}",
            "--trainer.devices=2",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
        ]
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "head.weight" not in saved["state_dict"]  # the centres are in the directory
    assert sorted(p.name for p in centres_directory(ckpt).glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    one = tmp_path / "whole.ckpt"
    console_main(["convert-checkpoint", "--ckpt_path", str(ckpt), "--output", str(one)])
    whole = torch.load(one, map_location="cpu", weights_only=False)
    assert whole["state_dict"]["head.weight"].shape[1] == 128
    with pytest.raises(FileExistsError, match=r"whole\.ckpt exists"):
        console_main(["convert-checkpoint", "--ckpt_path", str(ckpt), "--output", str(one)])

    test = main(["test", *_args(tmp_path), "--trainer.devices=1", f"--ckpt_path={ckpt}"])
    assert test.model.head.weight.shape == (0, 128)  # inference never reads the centres
    for name, value in test.model.state_dict().items():
        if name != "head.weight":
            torch.testing.assert_close(value, whole["state_dict"][name], rtol=0, atol=0)
    assert 0.0 <= test.trainer.callback_metrics["test/recall@1"].item() <= 1.0

    index = tmp_path / "index"
    main(
        [
            "predict",
            *_args(tmp_path),
            "--trainer.devices=1",
            "--trainer.callbacks+=lightning_metric.callbacks.EmbeddingIndexWriter",
            f"--trainer.callbacks.output_dir={index}",
            f"--ckpt_path={ckpt}",
        ]
    )
    assert (index / "manifest.json").is_file()

    out = tmp_path / "model.pt"
    digits = tmp_path / "digits.yaml"  # export takes configs, and only dotted overrides
    digits.write_text(
        "data:\n  class_path: lightning_metric.data.DigitsDataModule\n"
        "model:\n  neck:\n    init_args:\n      in_features: 512\n"
        "  head:\n    init_args:\n      shard_classes: true\n"
    )
    console_main(["export", "--config", str(CONFIGS / "glyphs_arcface.yaml"), "--config",
                  str(digits), "--ckpt_path", str(ckpt), "--output", str(out),
                  "--trainer.accelerator=cpu"])  # fmt: skip
    assert torch.jit.load(str(out))(torch.rand(3, 1, 8, 8)).shape == (3, 128)
