"""The configs of a benchmark: ``NAME=YAML[,YAML...]`` specs, resolved as ``fit`` would merge
them (no training), hashed, and compared key by key (the equal-conditions check)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ALLOWED_PREFIXES",
    "BenchmarkError",
    "ConfigSpec",
    "check_data_accepts_folds",
    "check_map_at_r",
    "config_hash",
    "differences",
    "flatten",
    "parse_specs",
    "resolve",
]

# The objective and its own hyper-parameters: what a benchmark compares.
ALLOWED_PREFIXES = (
    "model.init_args.head",
    "model.init_args.loss",
    "model.init_args.miner",
    "model.init_args.objective_lr",
)
# Settings that only name where outputs go (each fold gets its own default_root_dir anyway).
_OUTPUT_KEYS = ("default_root_dir", "save_dir", "dirpath", "filename", "output_dir")
_LOGGER_NAME_KEYS = ("name", "version", "project", "id", "dir", "group", "tags")


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked (raised before anything trains)."""


@dataclass(frozen=True)
class ConfigSpec:
    """One compared config: its name and its YAML files (``--base`` files first)."""

    name: str
    files: tuple[str, ...]


def parse_specs(specs: Sequence[str], base: Sequence[str] = ()) -> list[ConfigSpec]:
    """``NAME=A.yaml,B.yaml`` (overlays in order; NAME defaults to the last file's stem) with
    the ``base`` files prepended; every file must exist and names must be distinct."""
    if not specs:
        raise BenchmarkError("give at least one --config NAME=YAML[,YAML...] to benchmark")
    out: list[ConfigSpec] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep:
            name, rest = "", spec
        files = [f.strip() for f in rest.split(",") if f.strip()]
        if not files:
            raise BenchmarkError(
                f"--config {spec!r} names no YAML file; expected NAME=A.yaml[,B.yaml]"
            )
        name = name.strip() or Path(files[-1]).stem
        if not name.replace("-", "_").replace(".", "_").isidentifier():
            raise BenchmarkError(
                f"--config {spec!r}: the name {name!r} must be letters, digits, '_', '-' or '.' "
                "(it names the output folder)"
            )
        for f in [*base, *files]:
            if not Path(f).is_file():
                raise BenchmarkError(f"--config {spec!r}: the YAML file {f!r} does not exist")
        out.append(ConfigSpec(name, (*base, *files)))
    names = [c.name for c in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchmarkError(
            f"two --config entries are named {', '.join(map(repr, duplicates))}: name them "
            "apart with NAME=... (each name is an output folder and a row of the report)"
        )
    return out


def resolve(spec: ConfigSpec, overrides: Sequence[str]) -> dict[str, Any]:
    """The config ``fit`` would run (YAMLs merged, overrides applied, interpolations resolved),
    parsed by the `lightning-metric` parser without building anything."""
    from lightning_metric.cli.lightning_cli import main

    argv = [a for f in spec.files for a in ("--config", f)] + [*overrides, "--print_config"]
    out, err = io.StringIO(), io.StringIO()
    code: Any = None
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        try:
            main(argv, run=False)
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        message = err.getvalue().strip().splitlines()
        detail = "\n".join(line for line in message if "error" in line.lower()) or "\n".join(
            message[-5:]
        )
        raise BenchmarkError(
            f"config {spec.name!r} ({', '.join(spec.files)}) does not parse:\n{detail}"
        )
    config = yaml.safe_load(out.getvalue())
    if not isinstance(config, dict):
        raise BenchmarkError(f"config {spec.name!r} printed no configuration")
    return config


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the resolved config (key order ignored)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b[0].c": leaf}`` for nested dicts and lists (an empty dict/list is a leaf)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))


def _names_output(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    if not key.startswith("trainer."):
        return False
    if leaf in _OUTPUT_KEYS:
        return True
    return key.startswith("trainer.logger") and leaf in _LOGGER_NAME_KEYS


_ABSENT = "<absent>"


def differences(
    configs: dict[str, dict[str, Any]], allow: Sequence[str] = ()
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Compare every config with the first, key by key. Returns ``(refused, accepted)``:
    ``{key: {config name: value}}`` of the differences outside the allowed objective keys,
    output names and ``allow`` prefixes, and of those inside them. An ``allow`` entry that
    names no key of any config raises."""
    flat = {name: flatten(c) for name, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    unknown = [a for a in allow if not any(_under(k, a) for k in keys)]
    if unknown:
        raise BenchmarkError(
            f"--allow_difference {', '.join(unknown)} matches no key of the configs (keys look "
            "like data.init_args.batch_size or model.init_args.backbone; see "
            "`lightning-metric fit --config ... --print_config`)"
        )
    refused: dict[str, dict[str, Any]] = {}
    accepted: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = {name: f.get(key, _ABSENT) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) == 1:
            continue
        ok = _names_output(key) or any(_under(key, p) for p in (*ALLOWED_PREFIXES, *allow))
        (accepted if ok else refused)[key] = values
    return refused, accepted


def refusal_message(refused: dict[str, dict[str, Any]]) -> str:
    lines = [
        "the configs do not compare under equal conditions (Musgrave et al. 2020: same data, "
        "backbone, embedding size, optimizer, budget and seed; only the objective differs). "
        "They differ in:"
    ]
    for key, values in refused.items():
        shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
        lines.append(f"  {key}: {shown}")
    lines.append(
        "Make them equal, or accept a difference with --allow_difference KEY (e.g. "
        f"--allow_difference {next(iter(refused))})"
    )
    return "\n".join(lines)


def check_map_at_r(name: str, config: dict[str, Any]) -> bool:
    """Whether the config's RecallAtK logs ``val/map@r`` (the fold checkpoint's criterion);
    False when it has no RecallAtK (the fold adds one). Raises when it has one that cannot."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    found = False
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(callback, dict) or not str(callback.get("class_path", "")).endswith(
            "RecallAtK"
        ):
            continue
        found = True
        init = callback.get("init_args") or {}
        if init.get("map_at_r") is False or init.get("on_validation") is False:
            raise BenchmarkError(
                f"config {name!r}: its RecallAtK has map_at_r={init.get('map_at_r')!r}, "
                f"on_validation={init.get('on_validation')!r}; the benchmark picks each fold's "
                "checkpoint by val/map@r, so both must be true"
            )
        if init.get("query_dataloader_idx") is not None:
            raise BenchmarkError(
                f"config {name!r}: its RecallAtK evaluates a query/reference protocol "
                f"(query_dataloader_idx={init['query_dataloader_idx']!r}); the benchmark scores "
                "folds leave-one-out, so leave query_dataloader_idx / reference_dataloader_idx unset"
            )
    return found


def check_data_accepts_folds(name: str, config: dict[str, Any]) -> str:
    """The data module class path; raises unless its constructor takes ``num_folds`` and
    ``fold`` (its own or, through ``**kwargs``, a base class's)."""
    from jsonargparse.typing import import_object

    data = config.get("data") or {}
    class_path = data.get("class_path") if isinstance(data, dict) else None
    if not class_path:
        raise BenchmarkError(f"config {name!r} has no data module (data.class_path)")
    cls = import_object(class_path)
    accepted: set[str] = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted |= set(inspect.signature(init).parameters)
    missing = [p for p in ("num_folds", "fold") if p not in accepted]
    if missing:
        raise BenchmarkError(
            f"config {name!r}: the data module {class_path} does not accept {' and '.join(missing)}. "
            "A data module for `lightning-metric benchmark` must take `num_folds: Optional[int] "
            "= None` and `fold: Optional[int] = None` and, with them, serve fold `fold` of the "
            "training classes as `val`, the other folds as `train` and the test classes "
            "unchanged as `test` (the built-in data modules do: subclass ArrayDataModule)"
        )
    return str(class_path)


def check_folds_fit(name: str, config: dict[str, Any], num_folds: int) -> int:
    """Build the config's data module with ``num_folds`` (fold 0) as the folds will, so that
    its own check (``num_folds`` larger than its pool of training classes, ...) reaches the
    user now, not from inside a fold's subprocess. Returns fold 0's training classes."""
    from jsonargparse import ArgumentParser
    from jsonargparse.typing import import_object
    from lightning import LightningDataModule

    data = json.loads(json.dumps(config["data"]))
    init_args = {**(data.get("init_args") or {}), "num_folds": num_folds, "fold": 0}
    nested = any(isinstance(v, dict) and "class_path" in v for v in init_args.values())
    try:
        if nested:  # objects inside: jsonargparse builds them (its message wraps the cause)
            parser = ArgumentParser(exit_on_error=False)
            parser.add_subclass_arguments(LightningDataModule, "data")
            data["init_args"] = init_args
            module = parser.instantiate_classes(parser.parse_object({"data": data})).data
        else:
            module = import_object(data["class_path"])(**init_args)
        num_classes = module.num_classes
    except (ValueError, TypeError) as error:
        raise BenchmarkError(
            f"config {name!r}: its data module refuses --num_folds {num_folds}: {error}"
        ) from error
    return int(num_classes)
