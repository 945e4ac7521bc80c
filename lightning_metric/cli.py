"""The `lightning-metric` command: LightningCLI with the data set linked to the head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lightning import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_metric.module import MetricLearningModule


class LightningMetricCLI(LightningCLI):
    """LightningCLI whose data module tells the model (head or PML loss) how many training
    classes exist."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Resolved after the data module is built, so a head never has to repeat it in YAML.
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
        # Proxy/classification PML losses (ProxyAnchorLoss, ArcFaceLoss, ...) and
        # CrossBatchMemory need the class count and embedding size too; a loss without such
        # a parameter is left untouched by these links.
        parser.link_arguments(
            "data.num_classes", "model.init_args.loss.init_args.num_classes", apply_on="instantiate"
        )
        parser.link_arguments(
            "model.init_args.embedding_dim", "model.init_args.loss.init_args.embedding_size"
        )

    def after_fit(self) -> None:
        """Print the final validation metrics: the headline numbers of a `fit` run."""
        metrics = {
            name: float(value)
            for name, value in self.trainer.callback_metrics.items()
            if name.startswith("val/")
        }
        if metrics:
            line = "  ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))
            rank_zero_info(f"final validation metrics (epoch {self.trainer.current_epoch}): {line}")
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if best:
            rank_zero_info(f"best checkpoint: {best}")


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def main(args: ArgsType = None, run: bool = True) -> Optional[LightningMetricCLI]:
    """Entry point of the `lightning-metric` console script (also callable from Python/tests)."""
    # The example configs log to W&B; without an account that must mean "offline", never a
    # login prompt. A user who has logged in (or set WANDB_MODE) keeps their choice.
    if "WANDB_MODE" not in os.environ and not _wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    cli_kwargs: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        "auto_configure_optimizers": False,
        "args": args,
        "run": run,
    }
    return LightningMetricCLI(MetricLearningModule, LightningDataModule, **cli_kwargs)


def entry_point() -> None:
    """The console script: returns None so the process exits 0 on success."""
    main()


if __name__ == "__main__":  # pragma: no cover
    entry_point()
