"""Datasets the harness can materialise itself, by name (``dataset.builder`` in config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from benchmark.registry import Registry

BUILDERS: Registry[Callable[..., Path]] = Registry("dataset builder")


@BUILDERS.register("digits")
def build_digits(root: Path, **unknown: Any) -> Path:
    """scikit-learn digits with three class-specialist experts (the embedded default)."""
    from datasets.digits import materialise_digits
    from datasets.materialise import check_unknown_options

    check_unknown_options("digits", unknown)
    return materialise_digits(root)


@BUILDERS.register("cifar10h")
def build_cifar10h(root: Path, **options: Any) -> Path:
    """CIFAR-10 test images with experts sampled from CIFAR-10H human label distributions."""
    from datasets.cifar import build_cifar10h as build

    return build(root, **options)


@BUILDERS.register("cifar10")
def build_cifar10(root: Path, **options: Any) -> Path:
    """CIFAR-10 (official binary version) with three class-specialist experts."""
    from datasets.cifar import build_cifar10 as build

    return build(root, **options)


@BUILDERS.register("cifar100")
def build_cifar100(root: Path, **options: Any) -> Path:
    """CIFAR-100 (official binary version) with three super-class specialist experts."""
    from datasets.cifar import build_cifar100 as build

    return build(root, **options)
