"""`lightning-metric fit/test --ckpt_path CKPT --model.X=...`: a model flag that differs from
the checkpoint's saved settings is applied or refused, never silently dropped (issue 18).

The rule is in :mod:`lightning_metric.cli.checkpoint_settings`. Every test drives the real CLI on
the tiny digits config from one small checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tiny_digits import tiny_args, tiny_checkpoint

from lightning_metric.cli import main
from lightning_metric.cli.checkpoint_settings import CheckpointSettingsError
from lightning_metric.nonfinite import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("trained"))


class NaNFirstBatch(Callback):
    """Puts NaN into two input rows of the first training batch of every epoch."""

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            batch["x"][:2] = float("nan")


POISON = f"--trainer.callbacks+={__name__}.NaNFirstBatch"

# (flags, message fragments): every refused change names the flag and both values.
REFUSED = {
    "embedding_dim": (["--model.embedding_dim=64"], ["--model.embedding_dim", "32", "64"]),
    "head class": (
        ["--model.head=lightning_metric.heads.CosFaceHead"],
        ["--model.head.class_path", "ArcFaceHead", "CosFaceHead"],
    ),
    "head args": (["--model.head.margin=0.5"], ["--model.head.init_args.margin", "0.3", "0.5"]),
    "optimizer class": (
        ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.1"],
        ["--model.optimizer.class_path", "AdamW", "SGD"],
    ),
    "optimizer lr": (
        ["--model.optimizer.lr=0.01"],
        ["--model.optimizer.init_args.lr", "0.003", "0.01"],
    ),
    "objective_lr": (["--model.objective_lr=0.1"], ["--model.objective_lr", "None", "0.1"]),
    "loss": (
        ["--model.head=null", "--model.loss=pytorch_metric_learning.losses.TripletMarginLoss"],
        ["--model.head", "--model.loss"],
    ),
    "backbone": (
        ["--model.backbone.width=8"],
        ["--model.backbone.init_args.width", "16", "8"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_changed_setting_is_refused_naming_flag_values_and_remedy(
    case: str, checkpoint: Path, tmp_path: Path
) -> None:
    flags, fragments = REFUSED[case]
    with pytest.raises(CheckpointSettingsError) as info:
        main(["fit", *tiny_args(tmp_path, 2), f"--ckpt_path={checkpoint}", *flags])
    text = str(info.value)
    for fragment in [*fragments, str(checkpoint), "without --ckpt_path", "load_from_checkpoint"]:
        assert fragment in text, (fragment, text)
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any training


def test_resume_with_the_checkpoint_s_settings_continues_it(checkpoint: Path, tmp_path) -> None:
    cli = main(["fit", *tiny_args(tmp_path, 2), f"--ckpt_path={checkpoint}"])
    assert cli is not None
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert cli.trainer.global_step == saved["global_step"] + 2  # one more epoch of 2 steps
    assert cli.model.embedding_dim == 32 and cli.model.nonfinite == "raise"


def test_nonfinite_skip_is_applied_on_resume_and_skips(checkpoint: Path, tmp_path) -> None:
    # Without the flag the checkpoint's "raise" holds: the poisoned batch stops the run ...
    with pytest.raises(NonFiniteError, match="global step 2"):
        main(["fit", *tiny_args(tmp_path / "a", 2), f"--ckpt_path={checkpoint}", POISON])
    # ... with it (what the error message recommends) the step is skipped and training ends.
    cli = main(
        ["fit", *tiny_args(tmp_path / "b", 2), f"--ckpt_path={checkpoint}", POISON]
        + ["--model.nonfinite=skip"]
    )
    assert cli is not None and cli.model.nonfinite == "skip"
    assert cli.model.skipped_nonfinite_steps == 1
    assert float(cli.trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 1.0
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_a_skip_checkpoint_resumed_with_raise_raises(tmp_path: Path) -> None:
    skip_checkpoint = tiny_checkpoint(tmp_path / "skip", "--model.nonfinite=skip")
    assert torch.load(skip_checkpoint, weights_only=True)["hyper_parameters"]["nonfinite"] == "skip"
    with pytest.raises(NonFiniteError):
        main(
            ["fit", *tiny_args(tmp_path / "resume", 2), f"--ckpt_path={skip_checkpoint}", POISON]
            + ["--model.nonfinite=raise"]
        )


def test_evaluation_applies_training_only_settings_and_refuses_the_architecture(
    checkpoint: Path, tmp_path: Path
) -> None:
    args = [*tiny_args(tmp_path), f"--ckpt_path={checkpoint}"]
    cli = main(["test", *args, "--model.optimizer.lr=0.5"])  # unused by test: applied
    assert cli is not None and cli.model.optimizer_factory.keywords["lr"] == 0.5
    assert "test/recall@1" in cli.trainer.callback_metrics
    with pytest.raises(CheckpointSettingsError, match=r"test --ckpt_path.*embedding_dim"):
        main(["test", *args, "--model.embedding_dim=64"])
