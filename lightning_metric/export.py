"""Export a trained embedding model: input -> unit-norm embedding, as ONNX or TorchScript.

``export(module, "model.onnx", example_input)`` (or ``"model.pt"`` for TorchScript) writes
the model with a dynamic batch axis and, beside it, ``model.onnx.json``: the input shape
``[C, H, W]``, dtype and preprocessing record the model expects (the data module's own
evaluation transform, see :func:`describe_input`), ``embedding_dim`` and the metric to
compare embeddings with. The exported file is
run once on ``example_input`` and must reproduce the module's embeddings.

Command line: ``lightning-metric export --config CFG --ckpt_path CKPT --output model.onnx``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_metric.checks import check_int, check_metric
from lightning_metric.data.preprocess import PreprocessingError, record_of_input

__all__ = ["FORMATS", "ExportError", "describe_input", "export", "sidecar_path"]

FORMATS = {".onnx": "onnx", ".pt": "torchscript"}
SIDECAR_FORMAT = "lightning-metric-export"


class ExportError(RuntimeError):
    """The model cannot be written in the requested format."""


class _Embedder(nn.Module):
    """``module(x)`` in float32: the unit-norm embeddings of a MetricLearningModule; with
    ``dim``, their Matryoshka prefix (the operations of
    :func:`~lightning_metric.retrieval.quantization.prefix`, inside the exported graph)."""

    def __init__(self, module: nn.Module, dim: Optional[int] = None) -> None:
        super().__init__()
        self.module = module
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        out = self.module(x).float()
        if self.dim is None:
            return out
        return nn.functional.normalize(out[:, : self.dim], dim=1)


def sidecar_path(path: Union[str, os.PathLike[str]]) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: where the input description is written."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def describe_input(datamodule: Any, example_input: Tensor) -> dict[str, Any]:
    """Input shape, dtype and preprocessing of ``datamodule``: what the index manifest and the
    export sidecar record, and what ``search --query`` applies to image files.

    ``preprocessing`` is the data module's own record
    (:meth:`~lightning_metric.data.ArrayDataModule.input_preprocessing`, a
    :class:`~lightning_metric.data.preprocess.Preprocessing` as a dict), the very object its
    evaluation loaders read images with. Where there is none (no data module, a data module
    without ``input_preprocessing``, a custom evaluation transform, a record that does not
    make ``example_input``'s shape), ``preprocessing`` is ``None`` and ``preprocessing_unknown``
    says why; ``search --query`` then refuses with that reason.
    """
    shape = [int(s) for s in example_input.shape[1:]]
    info: dict[str, Any] = {"shape": shape, "dtype": str(example_input.dtype).split(".")[-1]}
    reason = None
    record = None
    describe = getattr(datamodule, "input_preprocessing", None)
    if datamodule is None:
        reason = "no data module was given to describe the preprocessing"
    elif not callable(describe):
        reason = f"{type(datamodule).__name__} has no input_preprocessing() to describe it"
    else:
        try:
            pre = describe()
            if list(pre.shape) != shape:
                raise PreprocessingError(
                    f"{type(datamodule).__name__}'s preprocessing makes {list(pre.shape)} "
                    f"tensors but the model input is {shape}"
                )
            record = pre.to_dict()
        except PreprocessingError as err:
            reason = str(err)
    info["preprocessing"] = record
    if reason is not None:
        info["preprocessing_unknown"] = reason
    if datamodule is not None:
        cls = type(datamodule)
        info["data"] = f"{cls.__module__}.{cls.__qualname__}"
    return info


@contextmanager
def _scripting(module: nn.Module) -> Iterator[None]:
    """A LightningModule's ``trainer`` property raises when the tracer inspects it unless
    Lightning's own scripting flag is set (as ``LightningModule.to_torchscript`` does)."""
    flag = hasattr(module, "_jit_is_scripting")
    if flag:
        setattr(module, "_jit_is_scripting", True)  # noqa: B010
    try:
        yield
    finally:
        if flag:
            setattr(module, "_jit_is_scripting", False)  # noqa: B010


@contextmanager
def _module_stack(module: nn.Module) -> Iterator[list[str]]:
    """Names of the submodules being run (the deepest last), to name the one that fails."""
    stack: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        label = f"{name or 'model'} ({type(sub).__name__})"

        def pre(_m: nn.Module, _a: Any, label: str = label) -> None:
            stack.append(label)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def export(
    module: nn.Module,
    path: Union[str, os.PathLike[str]],
    example_input: Tensor,
    *,
    input_info: Optional[Mapping[str, Any]] = None,
    datamodule: Any = None,
    metric: str = "cosine",
    opset: int = 17,
    check: bool = True,
    extra: Optional[Mapping[str, Any]] = None,
    dim: Optional[int] = None,
) -> Path:
    """Write ``module`` (input -> unit-norm embedding) to ``path``: ONNX for ``.onnx``,
    TorchScript (traced) for ``.pt``; the batch axis is dynamic. Returns ``path``.

    Args:
        module: the embedding model, e.g. a :class:`MetricLearningModule` (``forward``
            returns the embeddings). Exported in eval mode on CPU, float32.
        example_input: a batch of inputs ``[B, C, H, W]`` (a sample batch's ``x``).
        input_info: description written to the sidecar JSON (default:
            ``describe_input(datamodule, example_input)``).
        datamodule: the data module the model was trained with, whose preprocessing record
            the sidecar stores; without it (or ``input_info``) the sidecar records none and
            a warning says so.
        metric: how the embeddings are compared (``cosine``, ``ip``, ``l2``), recorded.
        opset: ONNX opset.
        check: run the exported file on a batch of another size derived from
            ``example_input`` and compare with ``module`` (cosine >= 0.9999 per row); ONNX
            needs ``onnxruntime`` for this.
        extra: more JSON-serialisable fields for the sidecar (checkpoint, model class).
        dim: export the Matryoshka prefix of this size: the graph keeps the first ``dim``
            coordinates and L2-normalises them (what an index built with ``dim=`` searches);
            the sidecar records ``dim`` and the model's ``full_embedding_dim``.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the export format from {str(path)!r}: use a {' or '.join(FORMATS)} "
            "suffix (ONNX or TorchScript)"
        )
    if not isinstance(example_input, Tensor) or example_input.ndim < 2:
        raise ValueError(
            "example_input must be a batch tensor [B, ...] (e.g. a sample batch's 'x'), got "
            f"{type(example_input).__name__} of shape {tuple(getattr(example_input, 'shape', ()))}"
        )
    check_metric(metric)
    check_int("opset", opset, minimum=7)
    if dim is not None:
        dim = check_int("dim", dim, minimum=1)
    info = dict(input_info) if input_info is not None else describe_input(datamodule, example_input)
    if info.get("preprocessing") is not None:
        # A record handed in is read back by `search --query`: refuse one that cannot be.
        pre = record_of_input(info, "input_info")
        if list(pre.shape) != list(example_input.shape[1:]):
            raise PreprocessingError(
                f"input_info's preprocessing makes {list(pre.shape)} tensors but example_input "
                f"is {list(example_input.shape[1:])} per item; it does not describe this model"
            )
    example = example_input.detach().float().cpu()
    was_training = module.training
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    module.eval().cpu()
    wrapper = _Embedder(module, dim).eval()
    try:
        with torch.no_grad():
            full_dim = int(module(example[:1]).shape[1])
            if dim is not None and dim > full_dim:
                raise ValueError(
                    f"`dim`={dim} is larger than the model's {full_dim}-d embeddings: export "
                    f"a prefix size in [1, {full_dim}], or dim=None for all of them"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            reference = wrapper(example)
            # Another batch size and other values than the traced example: catches a batch
            # axis or an input that the trace froze into constants.
            probe = torch.cat([example.flip(0), example[:1] * 0.5])
            probe_reference = wrapper(probe)
            with _module_stack(module) as stack, _scripting(module), warnings.catch_warnings():
                # Shape checks traced as constants; the parity check below catches real harm.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                try:
                    if fmt == "onnx":
                        _to_onnx(wrapper, example, path, opset)
                    else:
                        torch.jit.save(torch.jit.trace(wrapper, example), str(path))
                except Exception as err:
                    where = stack[-1] if len(stack) > 1 else _locate(wrapper, example, module, err)
                    raise _export_error(module, fmt, where, err) from err
        if check:
            _check_parity(path, fmt, probe, probe_reference)
    finally:
        module.to(device).train(was_training)
    if info.get("preprocessing") is None:
        warnings.warn(
            f"{str(sidecar_path(path))!r} records no preprocessing, so image files cannot be "
            f"fed to {path.name} from it: {info.get('preprocessing_unknown', 'none given')}",
            UserWarning,
            stacklevel=2,
        )
    sidecar = {
        "format": SIDECAR_FORMAT,
        "file": path.name,
        "export_format": fmt,
        "input": {"name": "input", "batch_axis": 0, "dynamic_batch": True, **info},
        "output": {"name": "embedding", "normalized": True},
        "embedding_dim": int(reference.shape[1]),
        "dim": dim,
        "full_embedding_dim": full_dim,
        "metric": metric,
        **(dict(extra) if extra else {}),
    }
    text = json.dumps(sidecar, indent=2, sort_keys=True, default=repr) + "\n"
    sidecar_path(path).write_text(text, encoding="utf-8")
    return path


def _to_onnx(wrapper: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    kwargs: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["embedding"],
        "dynamic_axes": {"input": {0: "batch"}, "embedding": {0: "batch"}},
        "opset_version": opset,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
        try:
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, **kwargs)
        except TypeError:  # torch without the `dynamo` switch
            torch.onnx.export(wrapper, (example,), str(path), **kwargs)


def _locate(wrapper: nn.Module, example: Tensor, module: nn.Module, err: Exception) -> str:
    """The submodule holding the operator an ONNX conversion error names (from the scope
    of that operator in a trace), else the model itself."""
    import re

    fallback = f"model ({type(module).__name__})"
    op = re.search(r"operator '([\w:.]+)'", str(err))
    if op is None:
        return fallback
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(wrapper, example).inlined_graph
    except Exception:
        return fallback
    for node in graph.nodes():
        if node.kind() == op.group(1):
            scope = node.scopeName().split("/")[-1].removeprefix("__module.module")
            name = scope.lstrip(".")
            if not name:
                return fallback
            try:
                return f"{name} ({type(module.get_submodule(name)).__name__})"
            except AttributeError:
                return fallback
    return fallback


def _export_error(module: nn.Module, fmt: str, where: str, err: Exception) -> ExportError:
    other = ".pt (TorchScript)" if fmt == "onnx" else ".onnx (ONNX)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ExportError(
        f"cannot export {type(module).__name__} to {'ONNX' if fmt == 'onnx' else 'TorchScript'}: "
        f"the module {where} failed ({type(err).__name__}: {first}). Try the other format "
        f"({other}), or make that module traceable (no data-dependent Python control flow "
        "or non-tensor outputs)"
    )


def _run_exported(path: Path, fmt: str, x: Tensor) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["embedding"], {"input": x.numpy()})[0])
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x).numpy()  # type: ignore[no-any-return]


def _check_parity(path: Path, fmt: str, example: Tensor, reference: Tensor) -> None:
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            warnings.warn(
                f"wrote {str(path)!r} without checking it against the model: onnxruntime is "
                "not installed (pip install 'lightning-metric[export]')",
                UserWarning,
                stacklevel=3,
            )
            return
    try:
        got = _run_exported(path, fmt, example)
    except Exception as err:
        raise ExportError(
            f"{str(path)!r} was written but cannot be run on a batch of {example.shape[0]} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}); "
            "the trace probably froze the input into constants (a .numpy() / .item() / Python "
            "value in forward). Try the other format, or make forward traceable"
        ) from err
    ref = reference.numpy()
    lowest = float("nan")
    if got.shape == ref.shape:
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12
        lowest = float(((got * ref).sum(1) / norms).min())
    if not lowest >= 0.9999:
        raise ExportError(
            f"{str(path)!r} does not reproduce the model on a batch of {len(example)}: output "
            f"{got.shape} vs {ref.shape}, lowest cosine {lowest:.6f} (needs >= 0.9999). The "
            "trace probably froze part of the input or the batch size into constants (a "
            ".tolist() / .item() / .numpy() or Python control flow in forward); try the other "
            "format, or make forward traceable"
        )
