"""benchmarks/gpu.py: the prepared GPU check, its no-CUDA exit and its head stress on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch
from repo_paths import ROOT
from torch import Tensor

from lightning_metric.heads import ArcFaceHead

SCRIPT = ROOT / "benchmarks" / "gpu.py"
# Small enough that no op opens an OpenMP parallel region (those stall on a busy CPU).
SMALL = {"batch": 32, "classes": 64, "dim": 32, "reseat_every": 5}


def _load() -> ModuleType:
    name = "lightning_metric_gpu_check"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")
def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    assert "no CUDA device" in lines[0] and "nothing was checked" in lines[0]


def test_stress_every_head_bf16_on_cpu_is_finite_with_float32_logits():
    gpu = _load()
    heads = gpu.default_heads()
    assert set(heads) == {
        "NormSoftmaxHead",
        "CosFaceHead",
        "ArcFaceHead",
        "SubCenterArcFaceHead",
        "CombinedMarginHead",
        "CurricularFaceHead",
        "AdaFaceHead",
        "CombinedMargin m1=0.9",  # the acos path of the combined margin
    }
    results = gpu.stress_heads(heads, device="cpu", dtypes=(torch.bfloat16,), steps=6, **SMALL)
    assert [r.head for r in results] == list(heads)
    for r in results:
        assert r.skipped is None and r.error is None, (r.head, r.skipped, r.error)
        assert r.steps == 6
        assert r.nonfinite == 0, (r.head, dict(r.failed))
        assert r.logits_dtypes == {"float32"}, (r.head, r.logits_dtypes)
        assert r.ok
    table = "\n".join(gpu.stress_table(results))
    assert "0/6" in table and "logits dtype seen: float32" in table


class _UnclampedArcFace(ArcFaceHead):
    """ArcFace through a raw acos: NaN where the float32 cosine rounds above 1."""

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return torch.cos(torch.acos(cos_target) + self.margin)


class _ClampedToOneArcFace(ArcFaceHead):
    """acos of the cosine clamped to [-1, 1] only: finite values, but d acos/d cos is
    infinite at cos = 1 exactly (the clamp passes the gradient at its bound)."""

    def target_logit(self, cos_target: Tensor, norms: Tensor) -> Tensor:
        return torch.cos(torch.acos(cos_target.clamp(-1.0, 1.0)) + self.margin)


def test_stress_catches_heads_without_the_acos_margin():
    gpu = _load()
    results = gpu.stress_heads(
        {
            "unclamped": _UnclampedArcFace,
            "clamped to 1": _ClampedToOneArcFace,
            "ArcFaceHead": ArcFaceHead,
        },
        device="cpu",
        dtypes=(torch.bfloat16,),
        steps=6,
        **SMALL,
    )
    nan_value, inf_grad, good = results
    for bad in (nan_value, inf_grad):
        assert bad.error is None
        assert bad.nonfinite > 0 and bad.first_bad == 0, bad
        assert not bad.ok
    assert nan_value.failed["loss"] > 0 and nan_value.failed["loss stream"] > 0
    # The loss stays finite; only the gradient check can catch this one.
    assert inf_grad.failed["grad"] > 0 and inf_grad.failed["grad stream"] > 0, inf_grad.failed
    assert "loss" not in inf_grad.failed and "logits" not in inf_grad.failed, inf_grad.failed
    assert good.ok and good.nonfinite == 0
    table = "\n".join(gpu.stress_table(results))
    assert f"{inf_grad.nonfinite}/6 (first 0)" in table
    assert "clamped to 1 bf16: non-finite grad x" in table
