"""The stage scripts (stages/*.py) run in the test's process through click's test runner:
the same code `dvc repro` runs, without a subprocess's start-up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def run_stage(name: str, *args: str) -> None:
    """Run ``stages/{name}.py`` with ``args``; fail the test with its output if it fails."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = CliRunner().invoke(module.main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
