"""Datasets the harness can materialise itself, by name (``dataset.builder`` in config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from benchmark.registry import Registry

BUILDERS: Registry[Callable[..., Path]] = Registry("dataset builder")


@BUILDERS.register("digits")
def build_digits(root: Path, **_: Any) -> Path:
    """scikit-learn digits with three class-specialist experts (the embedded default)."""
    from datasets.digits import materialise_digits

    return materialise_digits(root)
