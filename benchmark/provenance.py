"""Where a result came from: code version, package versions, JAX devices, data hashes."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "flax", "optax", "grain", "hydra-core", "mlflow", "numpy", "pandas")


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, str | bool | None]:
    """Commit sha of the repository and whether the work tree has uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None}


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Package versions, Python, platform and JAX backend/devices."""
    import jax

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of the harness's Python sources (invalidates cached trainings on code change)."""
    digest = hashlib.sha256()
    for folder in ("core", "benchmark", "methods", "datasets"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (memoised while its size and mtime are unchanged:
    every cell hashes its manifests twice, for the training key and the provenance)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(manifests: dict[str, Path]) -> dict:
    """Everything needed to tell where a result came from."""
    return {
        **git_state(),
        **environment(),
        "manifests": {name: file_sha256(path) for name, path in manifests.items()},
    }
