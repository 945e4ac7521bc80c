"""Developer sessions: `nox` runs tests, vision, lint (ruff) and typecheck (mypy).

torch is installed before the package so pip never swaps it: the CPU wheel for the main
suite (small, fast to install) and the torch/torchvision pair that import together for the
`vision` extra. Override with LM_TORCH (e.g. LM_TORCH="torch==2.5.1") on other machines.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "vision", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TORCH_CPU = os.environ.get("LM_TORCH", "torch==2.13.0")
# torchvision's wheels are built against one torch release; this pair imports together.
TORCH_VISION = os.environ.get("LM_TORCH_VISION", "torch==2.14.1 torchvision==0.29.1").split()

ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONHASHSEED": "0"}


@nox.session
def tests(session: nox.Session) -> None:
    """The full suite on the CPU build of torch (vision tests skip without torchvision)."""
    session.install(TORCH_CPU)
    session.install("-e", ".[dev]")
    session.run("pytest", "-m", "not vision", *session.posargs, env=ENV)


@nox.session
def vision(session: nox.Session) -> None:
    """torchvision / timm backbones, on the torch build torchvision was compiled for."""
    session.install(*TORCH_VISION)
    session.install("-e", ".[dev,vision]")
    session.run("pytest", "-m", "vision", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(TORCH_CPU)
    session.install("-e", ".[dev]")
    session.run("mypy", "lightning_metric")
