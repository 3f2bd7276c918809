"""Real cells' training throughput against their isolated train step, one table.

For every record under ``RESULTS`` (cells run by ``python -m app`` at the given image
size; backbone and precision read from each record's variant, else the defaults given), its ``run_metrics.samples_per_second`` (the training
loop's samples over its wall time, compilation excluded) next to the images/s of one
isolated jitted train step of the same method and shapes on random data
(``train_step_table.step_seconds``, batch 128), and their ratio: 1.0 means the loop costs
nothing beyond its steps.

    PYTHONPATH=. python3 tests/benchmarks/cell_throughput.py RESULTS --backbone small_cnn --size 32
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks.train_step_table import BATCH, step_seconds
except ImportError:  # pragma: no cover
    from train_step_table import BATCH, step_seconds

from core.records import load_records


def main(argv=None) -> None:
    import jax

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    isolated = functools.lru_cache(maxsize=None)(
        lambda method, backbone, precision: BATCH / step_seconds(method, backbone, args.size, "auto",
                                                                 precision=precision))
    print(f"backend: {jax.default_backend()}, device: {jax.devices()[0].device_kind}; "
          f"{args.size}x{args.size} images, batch {BATCH}")
    print("| cell | backbone | precision | epochs x samples | train s | compile s | cell samples/s "
          "| isolated step images/s | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for record in sorted(load_records(args.results), key=lambda r: r["cell"]["method"]):
        if record.get("status") != "ok":
            continue
        metrics = record["run_metrics"]
        speed = metrics.get("samples_per_second")
        if not speed:
            continue
        variant = record.get("variant") or {}
        backbone = (variant.get("dataset") or {}).get("backbone", args.backbone)
        precision = (variant.get("train") or {}).get("train.precision", args.precision)
        step = isolated(record["method_name"], backbone, precision)
        epochs = len(record.get("history") or [])
        print(f"| {record['cell']['method']} seed {record['cell']['seed']} | {backbone} | {precision} | {epochs} x "
              f"{speed * metrics['train_seconds'] / max(epochs, 1):,.0f} | {metrics['train_seconds']:.2f} | "
              f"{metrics['compile_seconds']:.1f} | {speed:,.0f} | {step:,.0f} | {speed / step:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
