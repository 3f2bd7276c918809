"""Static checks, part of the test command: ruff (lint and import order) over the whole tree
and mypy over the packages, both pinned in constraints.txt and configured in
pyproject.toml. A finding fails the suite with the checker's own report."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def run_checker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)


def test_ruff_finds_nothing():
    result = run_checker("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_mypy_finds_nothing():
    result = run_checker("mypy", "--cache-dir", str(REPO_ROOT / ".mypy_cache"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
