"""Both performance tables on whatever backend JAX finds (CPU, or a GPU with
``L2D_JAX=cuda``): the constrained E-step against its yardstick, then train steps per
method, backbone, size and seeds per program (images/s), each headed by the backend and
device (``preact_resnet18`` rows only off the CPU).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/device_tables.py
"""

from __future__ import annotations

try:  # repository root on sys.path (PYTHONPATH=.)
    from tests.benchmarks import estep_table, train_step_table
except ImportError:  # pragma: no cover
    import estep_table
    import train_step_table


def main() -> None:
    import jax

    estep_table.main([])
    print()
    # a ResNet step at batch 128 takes seconds on a CPU: there, small_cnn only
    backbones = "small_cnn" if jax.default_backend() == "cpu" else "small_cnn,preact_resnet18"
    train_step_table.main(["--methods", "classifier_only,multi_l2d_softmax,prob_l2d",
                           "--backbones", backbones, "--sizes", "16,32"])


if __name__ == "__main__":
    main()
