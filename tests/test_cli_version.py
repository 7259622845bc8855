"""`asicfleet --version` names what is installed, as the project file and the contract say."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from contract import CONTRACT_VERSION


def test_version_names_the_release_and_the_contract() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "asicfleet", "--version"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = f"asicfleet {project['project']['version']} (contract {CONTRACT_VERSION})\n"
    assert result.stdout == expected
