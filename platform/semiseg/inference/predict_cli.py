"""``semiseg-predict``: segment a folder of NIfTI scans with a study's models.

Example::

    semiseg-predict --model studies_state/ema_sweep --input scans/ --output segmentations/ \\
        --ensemble --tta mirror --save-probabilities

``--model`` is a study folder (its best model, or ``--method NAME``'s; with ``--ensemble`` the
mean of the final phase's models), ``runs:/<run id>``, ``models:/<name>/<version>`` (or
``models:/<name>@<alias>``) or a ``model.pt`` file. Each input case (``{case}_{channel:04d}.nii.gz``,
or ``{case}.nii.gz`` for one channel) goes through the model's own preprocessing and back: the
label map ``<output>/<case>.nii.gz`` has the input's shape, affine and header. Everything that can
be checked is checked before the networks are built; a problem is one line ``error: ...`` on
standard error and the exit status is 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from semiseg.data.errors import DatasetError
from semiseg.data.prediction_io import InputCase, find_input_cases
from semiseg.inference.bundle import ModelBundle, build_network, ensemble_settings
from semiseg.inference.predictor import (POSTPROCESS_MODES, TTA_MODES, CasePredictionError, mirror_axes,
                                         postprocessing_choice, predict_folder)
from semiseg.inference.sources import load_resolved, resolve_model
from semiseg.postprocess import postprocessing_summary

EXIT_ERROR = 2
DEFAULT_BATCH_SIZE = 8


class UsageError(ValueError):
    """A problem with the request found before predicting (printed as ``error: ...``)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``semiseg-predict``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 when every case is written; 2 on a problem (bad arguments, input, output or model, or a
        case that fails: the cases before it stay written).
    """
    args = _parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        input_folder, output_folder = check_folders(args.input, args.output)
        bundles = load_resolved(resolve_model(args.model, args.method, args.ensemble, args.tracking_uri))
        settings = ensemble_settings(bundles)
        cases = input_cases(input_folder, settings.in_channels)
        choice = postprocessing_choice(args.postprocess, settings)
    except DatasetError as error:
        for path, message in error.problems:
            print(f"error: {path}: {message}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        networks = [build_network(bundle, device) for bundle in bundles]
        written = predict_folder(cases, networks, settings, output_folder, device, args.tta == "mirror",
                                 args.batch_size, choice, args.save_probabilities)
    except CasePredictionError as error:
        print(f"error: {error} ({error.completed} earlier case(s) written to {output_folder})", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(summary(len(written), output_folder, bundles, args.tta, args.postprocess,
                  postprocessing_summary(choice, settings.label_names),
                  sum(item.removed_voxels for item in written), settings.dims))
    return 0


def summary(count: int, output: Path, bundles: Sequence[ModelBundle], tta: str, mode: str, choice: str,
            removed: int, dims: int) -> str:
    """The closing lines: cases written, the models used, test-time augmentation and post-processing."""
    lines = [f"{count} case(s) written to {output}",
             f"models ({'ensemble of ' + str(len(bundles)) if len(bundles) > 1 else 'one'}):"]
    lines += [f"  {bundle.describe()}  [{bundle.source}]" for bundle in bundles]
    augmentation = f"mirror ({len(mirror_axes(dims))} mirrorings)" if tta == "mirror" else "none"
    lines.append(f"test-time augmentation: {augmentation}")
    origin = {"auto": "the choice stored with the model", "none": "--postprocess none",
              "lcc": "--postprocess lcc"}[mode]
    lines.append(f"post-processing ({origin}): {choice}" + (f"; {removed} voxel(s) removed" if removed else ""))
    return "\n".join(lines)


def input_cases(folder: Path, channels: int) -> list[InputCase]:
    """The cases of the input folder (``.nii.gz`` or ``.nii``), each with the model's channels.

    Raises:
        DatasetError: As :func:`find_input_cases`, each line also saying how many channels the model takes.
    """
    try:
        return find_input_cases(folder, channels, file_ending=None)
    except DatasetError as error:
        naming = ("{case}_0000.nii.gz or {case}.nii.gz" if channels == 1
                  else f"{{case}}_0000.nii.gz to {{case}}_{channels - 1:04d}.nii.gz")
        raise DatasetError([(path, f"{message} (the model takes {channels} channel(s): {naming})")
                            for path, message in error.problems]) from None


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UsageError: CUDA asked for but not available, or no such GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_folders(input_folder: Path, output_folder: Path) -> tuple[Path, Path]:
    """The input folder (exists) and the output folder (creatable, not the input), both absolute.

    Raises:
        UsageError: A missing input folder, an output that is the input, a file, or not writable.
    """
    source = input_folder.expanduser().resolve()
    target = output_folder.expanduser().resolve()
    if not source.is_dir():
        raise UsageError(f"--input {input_folder}: no such folder")
    if target == source:
        raise UsageError(f"--output {output_folder} is the input folder; write the segmentations elsewhere")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--output {output_folder} is a file, not a folder")
    existing = next(folder for folder in (target, *target.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output_folder}: cannot create or write into it ({existing} is not writable)")
    return source, target


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="study folder, runs:/<run id>[/<artifact>], models:/<name>/<version> "
                             "(or @<alias>), or a model.pt file")
    parser.add_argument("--input", required=True, type=Path,
                        help="folder of NIfTI images: {case}_{channel:04d}.nii.gz, or {case}.nii.gz for one channel")
    parser.add_argument("--output", required=True, type=Path, help="folder for {case}.nii.gz (created)")
    parser.add_argument("--method", default=None, help="with a study folder: use this method's models "
                                                       "(default: the method with the best validation Dice)")
    parser.add_argument("--ensemble", action="store_true",
                        help="with a study folder: average the final phase's models (its seeds and splits)")
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation (default none)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write {case}.npz with the class probabilities on the input's grid")
    parser.add_argument("--postprocess", choices=POSTPROCESS_MODES, default="auto",
                        help="auto: the largest-component filter chosen on validation; none; lcc: for every class")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument("--batch-size", type=_batch_size, default=DEFAULT_BATCH_SIZE,
                        help=f"slices (2D) or windows (3D) per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
