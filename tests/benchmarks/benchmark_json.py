"""Print each benchmark's ``extra_info`` from a pytest-benchmark JSON file (the ratio checks
keep their measurements there), one line per benchmark.

    python3 tests/benchmarks/benchmark_json.py RESULTS.json
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(f"usage: {__doc__.strip().splitlines()[-1].strip()}")
    with open(argv[0]) as handle:
        results = json.load(handle)
    for bench in results["benchmarks"]:
        print(f"{bench['name']}: {json.dumps(bench['extra_info'], sort_keys=True)}")


if __name__ == "__main__":
    main()
