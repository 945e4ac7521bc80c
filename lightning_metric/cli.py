"""The `lightning-metric` command: LightningCLI with the data set linked to the head."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from jsonargparse.typing import import_object
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

    def before_instantiate_classes(self) -> None:
        """Fill a PML loss's ``num_classes`` / ``embedding_size`` when the YAML leaves them out.

        Proxy/classification losses (ProxyAnchorLoss, ArcFaceLoss, ...) and CrossBatchMemory
        need them. jsonargparse links cannot target ``loss.init_args`` because the loss is
        optional (a head config has none), so they are filled here, only when needed.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        loss = model.get("init_args", {}).get("loss") if model else None
        if not loss or "class_path" not in loss:
            return
        if loss.get("init_args") is None:
            loss["init_args"] = Namespace()
        init_args = loss["init_args"]
        accepted = inspect.signature(import_object(loss["class_path"])).parameters
        if "embedding_size" in accepted and init_args.get("embedding_size") is None:
            init_args["embedding_size"] = model["init_args"]["embedding_dim"]
        if "num_classes" in accepted and init_args.get("num_classes") is None:
            init_args["num_classes"] = _data_num_classes(config["data"])

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


def _data_num_classes(data_config: Namespace) -> int:
    """``num_classes`` of the configured data module (built once more, cheaply: the data
    modules defer loading to ``setup``, and the glyph table is cached)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    data = parser.instantiate_classes(parser.parse_object({"data": data_config})).data
    num_classes = getattr(data, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ValueError(
            f"the PML loss needs num_classes, and {type(data).__name__} has no integer "
            f"num_classes attribute (got {num_classes!r}); set loss.init_args.num_classes"
        )
    return num_classes


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
    # Configs write `${trainer.default_root_dir}`; under a subcommand that key is really
    # `fit.trainer.default_root_dir`, which this setting resolves.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    cli_kwargs: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        # Interpolation resolved after all --config files are merged, so an overlay that
        # sets trainer.default_root_dir moves the logs and checkpoints that refer to it.
        "parser_kwargs": {"parser_mode": "omegaconf+"},
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
