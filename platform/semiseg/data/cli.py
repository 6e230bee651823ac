"""``semiseg-prepare``: preprocess a dataset into its Parquet cache ahead of a study.

Example::

    semiseg-prepare /data/Task04_Hippocampus --target-spacing 1x1x1 --normalisation zscore_nonzero \\
        --num-labelled 4 --num-validation 10 --num-test 20

Reads the dataset (nnU-Net v2 or Medical Segmentation Decathlon layout), checks
and preprocesses every training case once (or finds the cache already built),
and prints a summary: cases per role, spacings and shapes before and after
preprocessing, label voxel counts and raw intensity ranges. Problems with the
input are printed one per line, ``PATH: message``, on standard error, and the
exit status is 2. So is a label declared in ``dataset.json`` that occurs in no
label file (it would train to Dice 0), unless ``--allow-absent-labels``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.cache import CachedDataset, absent_label_problem, build_cache, printed_progress
from semiseg.data.dataset import DatasetLayout
from semiseg.data.errors import DatasetError
from semiseg.data.formats import read_dataset
from semiseg.data.preprocess import NORMALISATIONS, PreprocessSettings
from semiseg.data.source import default_cache_dir
from semiseg.data.splits import make_split

EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the prepare command.

    Args:
        argv: Command-line arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 when the dataset or the request has problems (also for
        bad arguments, through argparse).
    """
    args = _parser().parse_args(argv)
    try:
        settings = PreprocessSettings(target_spacing=args.target_spacing, normalisation=args.normalisation,
                                      ct_window=args.ct_window, crop_to_body=args.crop_to_body, dims=args.dims,
                                      image_order=args.image_order)
        layout = read_dataset(args.dataset, args.extra_unlabelled)
        roles = _roles(layout, args)
        info = build_cache(layout, settings, args.cache_root or default_cache_dir() / "prepared",
                           progress=printed_progress(args.progress_every))
        absent = absent_label_problem(CachedDataset(info.path).manifest)
        if absent is not None and not args.allow_absent_labels:
            raise DatasetError([(absent[0], f"{absent[1]}; fix the label files or dataset.json, or accept "
                                            "them with --allow-absent-labels")])
        if absent is not None:
            print(f"warning: {absent[0]}: {absent[1]} (accepted: --allow-absent-labels)", file=sys.stderr)
    except DatasetError as error:
        for path, message in error.problems:
            print(f"{path}: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:
        print(f"semiseg-prepare: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = summarise(CachedDataset(info.path), roles)
    summary["cache"] = {"path": str(info.path), "key": info.key, "reused": info.reused}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def summarise(dataset: CachedDataset, roles: dict[str, int]) -> dict[str, Any]:
    """Describe a built cache.

    Args:
        dataset: The cache.
        roles: Cases per role (``labelled``, ``unlabelled``, ... as counted by the caller).

    Returns:
        A JSON-ready dict: ``dataset``, ``roles``, ``settings``, ``rows``,
        ``original_spacing``/``spacing``/``original_shape``/``shape`` (min,
        median, max per axis), ``labels`` (name, value, voxels, cases) and
        ``intensity`` (raw min and max per channel).
    """
    manifest = dataset.manifest
    entries = manifest["cases"]
    summary: dict[str, Any] = {
        "dataset": {"name": manifest["name"], "layout": manifest["layout_format"], "root": manifest["root"]},
        "roles": roles,
        "settings": manifest["settings"],
        "rows": manifest["num_rows"],
    }
    for key in ("original_spacing", "spacing", "original_shape", "shape"):
        values = np.array([entry[key] for entry in entries], dtype=np.float64)
        summary[key] = {stat: [round(float(v), 4) for v in fn(values, axis=0)]
                        for stat, fn in (("min", np.min), ("median", np.median), ("max", np.max))}
    summary["labels"] = [
        {"name": name, "value": value,
         "voxels": sum(entry["label_counts"].get(str(value), 0) for entry in entries),
         "cases": sum(1 for entry in entries if entry["label_counts"].get(str(value), 0))}
        for name, value in sorted(manifest["labels"].items(), key=lambda item: item[1])
    ]
    ranges = np.array([entry["intensity_range"] for entry in entries], dtype=np.float64)
    summary["intensity"] = [
        {"channel": name, "min": float(ranges[:, c, 0].min()), "max": float(ranges[:, c, 1].max())}
        for c, name in enumerate(manifest["channel_names"].values())
    ]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Render :func:`summarise`'s dict (plus ``cache``) as lines of text.

    Args:
        summary: The summary.

    Returns:
        The text, without a trailing newline.
    """
    data, cache = summary["dataset"], summary["cache"]
    lines = [
        f"dataset    {data['name']} ({data['layout']}) at {data['root']}",
        f"cache      {cache['path']} ({'reused' if cache['reused'] else 'built'})",
        "settings   " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()),
        "cases      " + ", ".join(f"{role} {count}" for role, count in summary["roles"].items()),
        f"rows       {summary['rows']} ({'slices' if summary['settings']['dims'] == 2 else 'volumes'})",
    ]
    for key, title in (("original_spacing", "spacing in "), ("spacing", "spacing out"),
                       ("original_shape", "shape in   "), ("shape", "shape out  ")):
        stats = summary[key]
        lines.append(f"{title}" + "".join(f"  {stat} {_axes(stats[stat])}" for stat in ("min", "median", "max")))
    for label in summary["labels"]:
        lines.append(f"label      {label['value']} {label['name']}: {label['voxels']} voxels in {label['cases']} cases")
    for channel in summary["intensity"]:
        lines.append(f"intensity  {channel['channel']}: {channel['min']:g} .. {channel['max']:g} (raw)")
    return "\n".join(lines)


def _axes(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _roles(layout: DatasetLayout, args: argparse.Namespace) -> dict[str, int]:
    if args.num_labelled is None:
        return {"labelled": len(layout.labelled_ids), "unlabelled": len(layout.unlabelled_ids),
                "test images (no label)": len(layout.test)}
    split = make_split(layout.labelled_ids, layout.unlabelled_ids, num_labelled=args.num_labelled,
                       num_validation=args.num_validation, num_test=args.num_test, seed=args.split_seed)
    return {role: len(ids) for role, ids in split.roles().items()}


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a spacing like 1x1x3") from None
    if len(values) != 3 or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must be three positive numbers, like 1x1x3")
    return (values[0], values[1], values[2])


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a window like -1000,1000") from None
    return (lo, hi)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg-prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 or Decathlon layout)")
    parser.add_argument("--extra-unlabelled", type=Path, default=None,
                        help="folder of further unlabelled images, named as in the dataset's layout")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="where caches live (default: $SEMISEG_CACHE/prepared or ~/.cache/semiseg/prepared)")
    parser.add_argument("--target-spacing", type=_spacing, default=None, help="resample to XxYxZ mm, e.g. 1x1x3")
    parser.add_argument("--normalisation", choices=NORMALISATIONS, default="zscore")
    parser.add_argument("--ct-window", type=_window, default=(-1000.0, 1000.0), help="LO,HI for --normalisation ct")
    parser.add_argument("--crop-to-body", action="store_true", help="crop each case to its body's bounding box")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="rows are slices (2) or volumes (3)")
    parser.add_argument("--image-order", type=int, choices=(1, 3), default=1, help="image interpolation order")
    parser.add_argument("--num-labelled", type=int, default=None, help="also check and show this split")
    parser.add_argument("--num-validation", type=int, default=0)
    parser.add_argument("--num-test", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--progress-every", type=int, default=10, help="cases between progress lines")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--allow-absent-labels", action="store_true",
                        help="accept, with a warning, labels of dataset.json that occur in no label file")
    return parser


if __name__ == "__main__":
    sys.exit(main())
