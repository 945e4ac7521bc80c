"""README's code blocks run as written: Python blocks in order, shell commands shortened."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo_paths import ROOT

README = (ROOT / "README.md").read_text()

# Turn a documented command into a seconds-long run; the command itself is unchanged.
SMOKE = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.limit_predict_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.save_dir=outputs",
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def cli_commands() -> list[list[str]]:
    commands = []
    for block in blocks("bash"):
        for line in block.splitlines():
            # "pip install -e . && lightning-metric ...": the install is CI's job.
            line = line.split("&&")[-1].strip()
            if line.startswith("lightning-metric"):
                commands.append(shlex.split(line))
    return commands


def test_readme_has_the_two_quickstart_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first, second = blocks("bash")[:2]
    assert first.strip() in quickstart and second.strip() in quickstart
    assert "examples/configs/glyphs_arcface.yaml" in first
    assert second.strip() in (ROOT / ".ci" / "run").read_text()


def test_python_blocks_run_in_order():
    namespace: dict = {"__name__": "readme"}
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), namespace)
    assert 0.0 <= float(namespace["trainer"].callback_metrics["val/recall@1"]) <= 1.0
    metrics = namespace["retrieval_metrics"](namespace["embeddings"], namespace["batch"]["label"])
    assert "recall@1" in metrics and "map@r" in metrics


def test_readme_yaml_is_a_valid_model_and_data_config(tmp_path):
    from lightning_metric.cli import main

    config = next(b for b in blocks("yaml") if b.startswith("model:"))
    path = tmp_path / "readme.yaml"
    path.write_text(config)
    cli = main(["--config", str(path), "--trainer.logger=false"], run=False)
    assert type(cli.model.head).__name__ == "ArcFaceHead"
    assert cli.model.head.weight.shape == (cli.datamodule.num_classes, 128)


@pytest.mark.slow
def test_cli_commands_run_from_a_fresh_directory(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    exe = Path(sys.executable).parent / "lightning-metric"
    env = {**os.environ, "WANDB_MODE": "offline"}
    commands = cli_commands()
    assert any(c[1] == "test" for c in commands) and any(c[1] == "fit" for c in commands)
    # `test --ckpt_path` needs the checkpoint the glyphs `fit` leaves, so fits go first.
    for command in sorted(commands, key=lambda c: c[1] != "fit"):
        extra = [] if "--print_config" in command else SMOKE
        result = subprocess.run(
            [str(exe), *command[1:], *extra], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        prefix = {"test": "test", "validate": "val"}.get(command[1])
        if prefix:
            assert f"{prefix}/recall@1" in result.stdout
        if command[1] == "predict":
            assert (tmp_path / "outputs" / "digits_arcface" / "index" / "index.faiss").is_file()
        if command[1] == "export":
            output = Path(command[command.index("--output") + 1])
            assert (tmp_path / output).is_file() and (tmp_path / f"{output}.json").is_file()
        if command[1] == "search" and "--evaluate" in command:
            assert "search/evaluate: recall@1=" in result.stdout
