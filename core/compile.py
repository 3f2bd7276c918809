"""How the harness compiles its programs: ``jit`` is ``jax.jit`` with the XLA options that every
top-level program of the harness shares (the train steps, prediction, the timed E-step), in
one place, so the programs that are timed are built as the ones that run.

``xla_cpu_prefer_vector_width=512``: XLA's CPU backend asks LLVM for 256-bit vectors by
default. With 512-bit vectors on a CPU with AVX-512 the exact E-step's pass over its
(B, E+1, K) arrays does about 30% less work, and the E-step + projection program runs about
1.3x faster at (1024, 8, 100) (``test_compiler_options_pay`` in
``tests/benchmarks/test_estep_benchmark.py``, which checks it is no slower on the machine it
runs on). Under ``xla_cpu_max_isa=AVX2`` LLVM splits the vectors in two and the program was
still faster; the train steps measured the same with either width
(``tests/benchmarks/train_step_table.py``). Accelerators ignore ``xla_cpu_*`` options.

JAX takes compile options on a top-level ``jax.jit`` only: functions that run inside these
programs (``methods.estep``, ``methods.projection``) keep a plain ``jax.jit`` and are
compiled with the options of the program that calls them.
"""

from __future__ import annotations

import functools

import jax

COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}

jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
