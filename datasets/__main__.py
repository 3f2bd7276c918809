"""Command line for datasets: ``python -m datasets {prepare,expert,missing,validate} ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets.builders import BUILDERS
from datasets.generators import class_specialist_labels, confusion_matrix_labels, write_missing_manifests
from datasets.layout import load_split
from datasets.manifest import ManifestError, read_manifest, write_manifest


def _prepare(args: argparse.Namespace) -> None:

    options = {"source": Path(args.source)} if args.source else {}
    if args.seed is not None:
        options["seed"] = args.seed
    if args.num_experts is not None:
        options["num_experts"] = args.num_experts
    root = BUILDERS.get(args.name)(Path(args.out), **options)
    print(f"prepared {args.name} under {root}")


def _expert(args: argparse.Namespace) -> None:

    truth = read_manifest(args.ground_truth, args.num_classes)
    y = truth.hard_labels()
    if args.kind == "specialist":
        classes = [int(c) for c in args.classes.split(",")]
        labels = class_specialist_labels(y, classes, args.p_in, args.p_out, args.num_classes, args.seed)
    else:
        import numpy as np

        labels = confusion_matrix_labels(y, np.load(args.confusion), args.seed)
    write_manifest(args.out, truth.files, labels)
    print(f"wrote {args.out}: accuracy {(labels == y).mean():.3f} against {args.ground_truth}")


def _missing(args: argparse.Namespace) -> None:

    truth = read_manifest(args.ground_truth, args.num_classes)
    experts = [read_manifest(p, args.num_classes) for p in args.experts]
    for rate in args.rates:
        out_dir = Path(args.out_dir) / f"rate_{rate:g}"
        paths = [out_dir / Path(p).name for p in args.experts]
        write_missing_manifests(experts, truth.files, rate, args.seed, paths)
        print(f"rate {rate:g}: wrote {len(paths)} manifests to {out_dir}")


def _validate(args: argparse.Namespace) -> None:

    split = load_split(args.root, args.ground_truth, args.experts, args.num_classes,
                       require_complete=args.complete)
    observed = (split.t >= 0).mean(axis=0) if split.num_experts else []
    print(f"ok: {len(split)} samples, {split.num_experts} experts, "
          f"annotated shares {[round(float(v), 3) for v in observed]}")
    absent = sorted(set(range(args.num_classes)) - set(split.y.tolist()))
    if absent:
        print(f"warning: class(es) {', '.join(map(str, absent))} never occur in {args.ground_truth} "
              "(a class absent from the training split cannot be learned)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="materialise a known dataset as PNG files + manifests")
    p.add_argument("name", help="dataset builder, e.g. digits")
    p.add_argument("--out", required=True, help="dataset root to write")
    p.add_argument("--source", help="downloaded source files, for builders that need them")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-experts", type=int, default=None)
    p.set_defaults(run=_prepare)

    p = sub.add_parser("expert", help="write a synthetic expert's manifest")
    p.add_argument("--ground-truth", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--kind", choices=["specialist", "confusion"], default="specialist")
    p.add_argument("--classes", default="0", help="specialist classes, comma-separated")
    p.add_argument("--p-in", type=float, default=0.9)
    p.add_argument("--p-out", type=float, default=0.3)
    p.add_argument("--confusion", help=".npy (K, K) row-stochastic matrix, for --kind confusion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=_expert)

    p = sub.add_parser("missing", help="drop annotations at given rates (seeded, nested)")
    p.add_argument("--ground-truth", required=True)
    p.add_argument("--experts", nargs="+", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--rates", type=float, nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(run=_missing)

    p = sub.add_parser("validate", help="check a split's manifests and image files")
    p.add_argument("--root", required=True)
    p.add_argument("--ground-truth", required=True, help="relative to --root")
    p.add_argument("--experts", nargs="*", default=[], help="relative to --root")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--complete", action="store_true", help="require complete annotations (test)")
    p.set_defaults(run=_validate)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ManifestError, ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
