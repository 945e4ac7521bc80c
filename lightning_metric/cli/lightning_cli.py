"""The LightningCLI subcommands of `lightning-metric` (``fit``, ``validate``, ``test``,
``predict``): :class:`LightningMetricCLI`, with the data set linked to the head, and
:func:`main`. :mod:`lightning_metric.cli.console` adds the argparse commands."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from jsonargparse.typing import import_object
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_metric.callbacks.prediction_writer import EmbeddingIndexWriter
from lightning_metric.cli.checkpoint_settings import reconcile_checkpoint_settings
from lightning_metric.module import MetricLearningModule
from lightning_metric.precision import bf16_is_emulated, default_precision

DESCRIPTION = (
    "Train and evaluate deep metric learning models from YAML: a backbone, an embedding neck "
    "and a margin head (ArcFace, CosFace, ...) or a pytorch-metric-learning loss. `fit` trains "
    "and reports recall@k / MAP@R on unseen classes every epoch; `validate` and `test` "
    "evaluate a checkpoint; `predict` writes a searchable FAISS index to "
    "<default_root_dir>/index. Two more commands ship the result: `lightning-metric export` "
    "writes the model as ONNX / TorchScript, `lightning-metric search` queries a saved index "
    "with images or a data module and evaluates it (see `lightning-metric export --help`, "
    "`lightning-metric search --help`); `lightning-metric benchmark` compares configs under "
    "equal conditions by k-fold cross-validation on the training classes (see `lightning-metric "
    "benchmark --help`). Example: lightning-metric fit --config "
    "examples/configs/glyphs_arcface.yaml"
)
INDEX_DIR = "index"
"""Where `predict` writes the index when the config has no EmbeddingIndexWriter of its own."""
# bf16 / fp32 time per training step of the main job's model with the CPU capped to AVX2
# (`python benchmarks/precision.py`): 11x on 2 quiet cores, 7x on busy ones.
_EMULATED_BF16_SLOWDOWN = "about 10x"


class LightningMetricCLI(LightningCLI):
    """LightningCLI whose data module tells the model (head or PML loss) how many training
    classes exist."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Resolved after the data module is built, so a head never has to repeat it in YAML.
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, Lightning parses the checkpoint's saved model settings over
        the given ones; a given setting that differs is applied or refused, never dropped
        (:mod:`lightning_metric.cli.checkpoint_settings` has the rule)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return super()._parse_ckpt_path()
        given = copy.deepcopy(self.config[subcommand])
        super()._parse_ckpt_path()
        merged = self.config[subcommand]
        if given.get("model") is None or merged.get("model") is None:
            return None
        _fill_pml_sizes(given)  # the checkpoint's hyper-parameters hold the filled sizes
        applied = reconcile_checkpoint_settings(
            given["model"], merged["model"], subcommand, str(ckpt_path)
        )
        for key, (old, new) in applied.items():
            rank_zero_info(f"--ckpt_path: {key}={new!r} applied (the checkpoint has {old!r})")
        return None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _fill_pml_sizes(config)
        if config.get("trainer") is not None:
            _choose_precision(config["trainer"])
            _drop_lr_monitor_without_logger(config["trainer"])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                quiet_wandb(logger)
        self._started = time.perf_counter()
        return trainer

    def before_predict(self) -> None:
        """`predict` always leaves a searchable index: ``<default_root_dir>/index`` unless the
        config has an EmbeddingIndexWriter of its own. That default index is replaced by a
        later predict of the same checkpoint only (sha256 compared), never by another
        model's embeddings; without ``--ckpt_path`` the writer refuses the untrained model."""
        callbacks = _callbacks(self.trainer)
        if not any(isinstance(c, EmbeddingIndexWriter) for c in callbacks):
            output = Path(self.trainer.default_root_dir) / INDEX_DIR
            callbacks.append(EmbeddingIndexWriter(str(output), overwrite="same_checkpoint"))

    def after_fit(self) -> None:
        """One summary at the end of `fit`: the final metrics and where everything went."""
        if not self.trainer.is_global_zero:
            return
        # wandb prints its own footer when its run ends: end it first so this summary is last.
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
        epochs = self.trainer.current_epoch
        lines = [
            f"lightning-metric fit finished in {time.perf_counter() - self._started:.0f} s "
            f"({epochs} epoch{'s' * (epochs != 1)}, {self.trainer.global_step} steps, "
            f"precision {self.trainer.precision})"
        ]
        metrics = {
            name: float(value)
            for name, value in self.trainer.callback_metrics.items()
            if name.startswith("val/")
        }
        if metrics:
            line = "  ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))
            lines.append(f"  final validation metrics: {line}")
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if best:
            lines.append(f"  best checkpoint: {best}")
        lines += [f"  logs ({kind}): {where}" for kind, where in _log_locations(self.trainer)]
        pictures = sorted({d for c in _callbacks(self.trainer) for d in _picture_destinations(c)})
        if pictures:
            lines.append(f"  pictures: {', '.join(pictures)}")
        rank_zero_info("\n".join(lines))


def _fill_pml_sizes(config: Namespace) -> None:
    """Fill a PML loss's ``num_classes`` / ``embedding_size`` when the YAML leaves them out.

    Proxy/classification losses (ProxyAnchorLoss, ArcFaceLoss, ...) and CrossBatchMemory
    need them. jsonargparse links cannot target ``loss.init_args`` because the loss is
    optional (a head config has none), so they are filled here, only when needed.
    """
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


def _choose_precision(trainer: Namespace) -> None:
    """Fill an unset ``trainer.precision`` for this machine; warn on emulated bf16."""
    accelerator = trainer.get("accelerator", "auto")
    precision = trainer.get("precision")
    if precision is None:
        precision, reason = default_precision(accelerator)
        trainer["precision"] = precision
        rank_zero_info(f"precision: {precision}, {reason}; set --trainer.precision to override")
    elif bf16_is_emulated(precision, accelerator):
        rank_zero_warn(
            f"trainer.precision={precision} on a CPU without native bf16 (no AVX512_BF16/AMX): "
            f"bf16 is emulated there, {_EMULATED_BF16_SLOWDOWN} slower than 32-true. "
            "Leave precision unset to get the fastest precision for this machine."
        )


def _drop_lr_monitor_without_logger(trainer: Namespace) -> None:
    """``--trainer.logger false`` with a config that holds a LearningRateMonitor: Lightning
    refuses the monitor at fit start (after DDP has started its processes). Nothing can be
    logged without a logger, so the monitor goes, with one line saying so."""
    logger = trainer.get("logger")
    if logger not in (False, None) or not trainer.get("callbacks"):
        return
    callbacks = trainer["callbacks"]
    kept = [c for c in callbacks if not _is_lr_monitor(c)]
    if len(kept) != len(callbacks):
        trainer["callbacks"] = kept
        rank_zero_info("trainer.logger is off: LearningRateMonitor dropped (it needs a logger)")


def _is_lr_monitor(callback: Any) -> bool:
    class_path = callback.get("class_path") if isinstance(callback, Namespace) else None
    if class_path is None:
        return isinstance(callback, LearningRateMonitor)
    return bool(class_path.rsplit(".", 1)[-1] == "LearningRateMonitor")


def quiet_wandb(logger: WandbLogger) -> None:
    """Lightning passes ``anonymous=None``, which wandb now warns about, and wandb looks for
    a git repository from the save dir before it exists ("git root ... does not exist")."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", True) is None:
        del init["anonymous"]
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)


def _log_locations(trainer: Trainer) -> list[tuple[str, str]]:
    """``(logger, where its files are)`` for every logger of the run."""
    out = []
    for logger in trainer.loggers:
        name = type(logger).__name__
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            where = str(Path(run.dir).parent) if getattr(run, "dir", None) else logger.save_dir
            if where and run.settings.mode == "offline":
                where += f" (offline; upload with `wandb sync {where}`)"
        else:
            where = getattr(logger, "log_dir", None) or logger.save_dir
        if where:
            out.append((name, str(where)))
    return out


def _callbacks(trainer: Trainer) -> list[Callback]:
    """The trainer's callback list (an attribute Lightning sets, untyped on the class)."""
    return trainer.callbacks  # type: ignore[attr-defined,no-any-return]


def _picture_destinations(callback: Any) -> list[str]:
    """Where a picture callback's last pictures went: folders of its PNGs, logger names."""
    destinations = getattr(callback, "last_destinations", None) or []
    return [str(Path(d).parent) if d.endswith(".png") else d for d in destinations]


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


class _DropTips(logging.Filter):
    """Lightning advertises its cloud products at every start; our users did not ask."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def quiet() -> None:
    """Drop Lightning's tips and known third-party warning noise (every console command)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in tips.filters):
        tips.addFilter(_DropTips())
    # Lightning's own deprecation noise with newer torch, and a model-summary note about bf16.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary")


def main(args: ArgsType = None, run: bool = True) -> Optional[LightningMetricCLI]:
    """The LightningCLI subcommands of `lightning-metric` (``fit``, ``validate``, ``test``,
    ``predict``), callable from Python/tests; :mod:`lightning_metric.cli.console` is the console
    script that also dispatches ``export`` / ``search`` / ``benchmark``.

    The example configs leave ``trainer.precision`` unset: it is chosen for the machine
    (:func:`lightning_metric.precision.default_precision`) and printed at start.
    """
    quiet()
    # The example configs log to W&B; without an account that must mean "offline", never a
    # login prompt. A user who has logged in (or set WANDB_MODE) keeps their choice.
    if "WANDB_MODE" not in os.environ and not _wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    # wandb's own run history and summary would repeat the closing summary printed here.
    os.environ.setdefault("WANDB_QUIET", "true")
    # Configs write `${trainer.default_root_dir}`; under a subcommand that key is really
    # `fit.trainer.default_root_dir`, which this setting resolves.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    cli_kwargs: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "save_config_kwargs": {"overwrite": True},
        # Interpolation resolved after all --config files are merged, so an overlay that
        # sets trainer.default_root_dir moves the logs and checkpoints that refer to it.
        # prog: `python -m lightning_metric.cli` would otherwise call itself "__main__.py".
        "parser_kwargs": {
            "parser_mode": "omegaconf+",
            "description": DESCRIPTION,
            "prog": "lightning-metric",
        },
        "auto_configure_optimizers": False,
        "args": args,
        "run": run,
    }
    return LightningMetricCLI(MetricLearningModule, LightningDataModule, **cli_kwargs)
