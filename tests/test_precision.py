"""The default precision is chosen for the machine that runs, never written into a config."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
import yaml
from repo_paths import ROOT

from lightning_metric import precision as lm_precision
from lightning_metric.cli import main
from lightning_metric.precision import bf16_is_emulated, cpu_has_native_bf16, default_precision

DIGITS = str(ROOT / "examples" / "configs" / "digits_arcface.yaml")
QUICK = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU does (True) or does not (False) execute bf16 natively."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(lm_precision, "cpu_has_native_bf16", lambda: native)

    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_default_follows_native_bf16(cpu_bf16, native, expected):
    cpu_bf16(native)
    precision, reason = default_precision("cpu")
    assert precision == expected
    assert ("natively" in reason) == native
    assert bf16_is_emulated("bf16-mixed", "cpu") == (not native)
    assert not bf16_is_emulated("32-true", "cpu")


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_default_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Some GPU")
    assert default_precision("auto")[0] == expected
    assert default_precision("gpu")[0] == expected
    # A CPU run on the same machine still decides by the CPU.
    assert default_precision("cpu")[0] in ("bf16-mixed", "32-true")


def test_onednn_isa_cap_turns_native_bf16_off(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN run as on an AVX2-only CPU: bf16 is emulated."""
    cpu_has_native_bf16.cache_clear()
    try:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert not cpu_has_native_bf16()
        cpu_has_native_bf16.cache_clear()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
        flags = lm_precision._cpu_flags()
        assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    finally:
        cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cli_fills_unset_precision_and_says_why_once(cpu_bf16, caplog, native, expected):
    cpu_bf16(native)
    with caplog.at_level(logging.INFO):
        cli = main(["--config", DIGITS, *QUICK], run=False)
    assert cli.trainer.precision == expected
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert len(said) == 1 and expected in said[0] and "--trainer.precision" in said[0]


def test_explicit_precision_wins_and_emulated_bf16_warns(cpu_bf16, recwarn):
    cpu_bf16(False)
    cli = main(["--config", DIGITS, *QUICK, "--trainer.precision=bf16-mixed"], run=False)
    assert cli.trainer.precision == "bf16-mixed"
    emulated = [w for w in recwarn if "emulated" in str(w.message)]
    assert len(emulated) == 1 and "slower than 32-true" in str(emulated[0].message)

    cpu_bf16(True)
    recwarn.clear()
    cli = main(["--config", DIGITS, *QUICK, "--trainer.precision=bf16-mixed"], run=False)
    assert cli.trainer.precision == "bf16-mixed"
    assert not [w for w in recwarn if "emulated" in str(w.message)]

    cpu_bf16(False)
    cli = main(["--config", DIGITS, *QUICK, "--trainer.precision=64-true"], run=False)
    assert cli.trainer.precision == "64-true"


def test_unknown_precision_gets_the_parsers_own_error(capsys):
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["--config", DIGITS, *QUICK, "--trainer.precision=bf17"], run=False)
    assert exit_info.value.code != 0
    assert "bf17" in capsys.readouterr().err


def test_no_example_config_fixes_a_precision():
    for path in sorted((ROOT / "examples" / "configs").rglob("*.yaml")):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        assert "precision" not in trainer, f"{path.name} sets trainer.precision"
        assert not re.search(r"^\s*precision:", path.read_text(), flags=re.M), path.name
