"""Datasets the harness can materialise itself, by name (``dataset.builder`` in config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from core.registry import Registry
from datasets import cifar
from datasets.digits import materialise_digits
from datasets.materialise import check_unknown_options

BUILDERS: Registry[Callable[..., Path]] = Registry("dataset builder")


@BUILDERS.register("digits")
def build_digits(root: Path, **unknown: Any) -> Path:
    """scikit-learn digits with three class-specialist experts (the embedded default)."""
    check_unknown_options("digits", unknown)
    return materialise_digits(root)


@BUILDERS.register("cifar10h")
def build_cifar10h(root: Path, **options: Any) -> Path:
    """CIFAR-10 test images with experts sampled from CIFAR-10H human label distributions."""
    return cifar.build_cifar10h(root, **options)


@BUILDERS.register("cifar10")
def build_cifar10(root: Path, **options: Any) -> Path:
    """CIFAR-10 (official binary version) with three class-specialist experts."""
    return cifar.build_cifar10(root, **options)


@BUILDERS.register("cifar100")
def build_cifar100(root: Path, **options: Any) -> Path:
    """CIFAR-100 (official binary version) with three super-class specialist experts."""
    return cifar.build_cifar100(root, **options)
