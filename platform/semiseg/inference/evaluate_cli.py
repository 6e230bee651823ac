"""``semiseg-evaluate``: per-case and per-class scores of a folder of predictions, into ``summary.json``.

Example::

    semiseg-evaluate --pred predictions/ --ref labelsTs/ --dataset-json dataset.json --nsd-tolerance 2

Any problem with the inputs (a case without its partner, a shape or affine mismatch, an undeclared
label value, an unreadable file) is printed as one line naming the file, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from semiseg.data.errors import DatasetError
from semiseg.inference.evaluate_folder import (
    SUMMARY_FILE,
    default_num_processes,
    evaluate_folder,
    format_table,
    parse_label_ids,
    write_summary,
)
from semiseg.metrics import DEFAULT_NSD_TOLERANCE_MM


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``semiseg-evaluate``."""
    parser = argparse.ArgumentParser(
        prog="semiseg-evaluate",
        description="Score predicted label maps against references per case and per class (Dice, Jaccard, "
                    "precision, recall, HD95, ASD, normalised surface Dice; distances in mm from each file's "
                    "affine) and write summary.json.")
    parser.add_argument("--pred", required=True, type=Path, help="folder of predictions {case}.nii.gz / .nii")
    parser.add_argument("--ref", required=True, type=Path, help="folder of references with the same case ids")
    parser.add_argument("--dataset-json", type=Path, default=None,
                        help="nnU-Net dataset.json whose \"labels\" (name -> value) give the classes and their names")
    parser.add_argument("--labels", type=str, default=None,
                        help="class ids to evaluate, e.g. 1,2,3 (default: dataset.json's labels, else the "
                             "values present in the references); background 0 is never evaluated")
    parser.add_argument("--nsd-tolerance", type=float, default=DEFAULT_NSD_TOLERANCE_MM,
                        help="tolerance of the normalised surface Dice in mm (default %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"summary file (default: {SUMMARY_FILE} in the --pred folder)")
    parser.add_argument("--num-processes", type=int, default=default_num_processes(),
                        help="cases scored in parallel (default: min(4, CPUs) = %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``semiseg-evaluate``.

    Raises:
        SystemExit: 2 for bad arguments or inputs (after printing one line per problem).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        label_ids = parse_label_ids(args.labels) if args.labels is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.num_processes < 1:
        parser.error(f"--num-processes must be at least 1, got {args.num_processes}")
    if not args.nsd_tolerance >= 0 or args.nsd_tolerance == float("inf"):
        parser.error(f"--nsd-tolerance must be a finite number of mm >= 0, got {args.nsd_tolerance}")
    output = args.output if args.output is not None else args.pred / SUMMARY_FILE
    try:
        summary = evaluate_folder(args.pred, args.ref, dataset_json=args.dataset_json, label_ids=label_ids,
                                  nsd_tolerance_mm=args.nsd_tolerance, num_processes=args.num_processes)
        write_summary(summary, output)
    except DatasetError as exc:
        print(f"semiseg-evaluate: {len(exc.problems)} problem(s):", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"semiseg-evaluate: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(summary))
    print(f"summary: {output}")


if __name__ == "__main__":
    main()
