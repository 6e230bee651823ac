"""Segment new scans with trained models: probabilities, test-time mirroring, ensembles, whole folders.

:func:`predict_probabilities` turns one preprocessed image into class probabilities: the mean of
the softmax over the networks of an ensemble and, with mirror test-time augmentation, over the
mirrorings of the input (each prediction flipped back before averaging, as nnU-Net does). 2D
models see the volume slice by slice along Z; 3D models see sliding windows with Gaussian
blending (:func:`semiseg.train.sliding_window.sliding_window_inference`) when they were trained
on patches, else the whole volume.

:func:`predict_case_file` runs one case from its files to its outputs: read, the model's own
preprocessing, probabilities, back onto the input's voxel grid, labels, post-processing, and the
label map written with the input's affine and header (plus its probabilities on request).
:func:`predict_folder` does so for every case of a folder, with a progress display.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.data.geometry import labels_from_probabilities, preprocess_image, restore_probabilities
from semiseg.data.prediction_io import InputCase, read_input_case, write_label_map, write_probabilities
from semiseg.inference.bundle import InferenceSettings
from semiseg.postprocess import apply_postprocessing
from semiseg.train.sliding_window import sliding_window_inference

POSTPROCESS_MODES = ("auto", "none", "lcc")
"""``--postprocess``: the stored choice, nothing, or the largest component of every foreground class."""

TTA_MODES = ("none", "mirror")
"""``--tta``: no test-time augmentation, or the mean over the mirrorings of the input."""

LABEL_ENDING = ".nii.gz"
PROBABILITY_ENDING = ".npz"


class CasePredictionError(RuntimeError):
    """A case could not be predicted; the message starts with its id.

    Attributes:
        case_id: The case that failed.
        completed: Cases written before it.
    """

    def __init__(self, case_id: str, error: BaseException, completed: int = 0) -> None:
        self.case_id = case_id
        self.completed = completed
        detail = str(error).strip() or type(error).__name__
        super().__init__(f"case {case_id}: {detail}")


@dataclass(frozen=True)
class CasePrediction:
    """What was written for one case.

    Attributes:
        case_id: The case.
        label_path: Its label map.
        probability_path: Its probabilities (``.npz``), or None when not asked for.
        removed_voxels: Voxels post-processing turned into background.
    """

    case_id: str
    label_path: Path
    probability_path: Path | None
    removed_voxels: int


def mirror_axes(dims: int) -> list[tuple[int, ...]]:
    """The axes of ``[C, X, Y, Z]`` to flip for each mirroring, the identity first.

    2D models: every subset of the in-plane axes (X, Y), 4 in all; 3D models: every subset of
    X, Y and Z, 8 in all (nnU-Net's mirroring).
    """
    spatial = (1, 2) if dims == 2 else (1, 2, 3)
    return [subset for size in range(len(spatial) + 1) for subset in itertools.combinations(spatial, size)]


@torch.no_grad()
def predict_probabilities(networks: Sequence[nn.Module], image: np.ndarray | torch.Tensor,
                          settings: InferenceSettings, device: torch.device | str = "cpu",
                          tta_mirror: bool = False, batch_size: int = 4) -> torch.Tensor:
    """Class probabilities of a preprocessed image: the mean over networks (and mirrorings).

    Args:
        networks: Evaluation networks in eval mode, on ``device``, returning logits.
        image: Preprocessed ``[C, x, y, z]`` float32.
        settings: ``dims``, ``patch_size``, ``overlap``, ``min_size`` of the networks.
        device: Where the networks run.
        tta_mirror: Also average over the mirrorings of :func:`mirror_axes`, each flipped back.
        batch_size: Slices (2D) or windows (3D) per forward pass.

    Returns:
        float32 ``[K, x, y, z]`` on the CPU, summing to 1 over K.

    Raises:
        ValueError: No networks, a batch size below 1, an image that is not 4D or has the wrong
            number of channels.
    """
    if not networks:
        raise ValueError("no networks to predict with")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    volume = torch.as_tensor(image).float()
    if volume.ndim != 4 or volume.shape[0] != settings.in_channels:
        raise ValueError(f"expected a preprocessed image [C={settings.in_channels}, x, y, z], "
                         f"got shape {tuple(volume.shape)}")
    device = torch.device(device)
    flips = mirror_axes(settings.dims) if tta_mirror else [()]
    total: torch.Tensor | None = None
    for network in networks:
        for axes in flips:
            flipped = volume.flip(axes) if axes else volume
            probabilities = network_probabilities(network, flipped, settings, device, batch_size)
            probabilities = probabilities.flip(axes) if axes else probabilities
            total = probabilities if total is None else total + probabilities
    assert total is not None
    return (total / (len(networks) * len(flips))).cpu()


def network_probabilities(network: nn.Module, volume: torch.Tensor, settings: InferenceSettings,
                          device: torch.device, batch_size: int) -> torch.Tensor:
    """Softmax probabilities ``[K, x, y, z]`` (on ``device``) of one network for ``[C, x, y, z]``."""
    if settings.dims == 2:
        return _slice_probabilities(network, volume, settings.min_size, device, batch_size)
    if settings.patch_size is not None:
        return sliding_window_inference(network, volume, settings.patch_size, overlap=settings.overlap,
                                        batch_size=batch_size, num_classes=settings.num_classes, device=device)
    padded, crop = _pad_to_minimum(volume, settings.min_size, spatial_axes=3)
    logits = network(padded[None].to(device))[0]
    return F.softmax(logits.float(), dim=0)[(slice(None), *crop)]


def _slice_probabilities(network: nn.Module, volume: torch.Tensor, min_size: int, device: torch.device,
                         batch_size: int) -> torch.Tensor:
    """2D: the axial slices (along Z) in batches, softmax per slice, stacked back to ``[K, x, y, z]``."""
    slices = volume.permute(3, 0, 1, 2).contiguous()
    padded, crop = _pad_to_minimum(slices, min_size, spatial_axes=2)
    outputs = []
    for first in range(0, padded.shape[0], batch_size):
        logits = network(padded[first:first + batch_size].to(device))
        outputs.append(F.softmax(logits.float(), dim=1)[(slice(None), slice(None), *crop)])
    return torch.cat(outputs).permute(1, 2, 3, 0)


def _pad_to_minimum(tensor: torch.Tensor, min_size: int, spatial_axes: int
                    ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the last ``spatial_axes`` axes symmetrically to at least ``min_size`` (what a network
    of that depth accepts; larger sizes need no padding, odd ones included), and the window of the
    original in the result."""
    shape = tensor.shape[-spatial_axes:]
    targets = [max(int(size), min_size) for size in shape]
    crop = tuple(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(shape, targets))
    if all(t == s for s, t in zip(shape, targets)):
        return tensor, crop
    pad: list[int] = []
    for size, target in reversed(list(zip(shape, targets))):
        pad.extend([(target - size) // 2, target - size - (target - size) // 2])
    return F.pad(tensor, pad), crop


def postprocessing_choice(mode: str, settings: InferenceSettings) -> dict[int, bool]:
    """Class id → keep its largest component, for ``--postprocess`` ``mode``.

    ``auto``: the choice stored with the model (made on validation); ``none``: nothing;
    ``lcc``: every foreground class.

    Raises:
        ValueError: An unknown mode.
    """
    if mode == "auto":
        return {c: bool(settings.postprocessing.get(c, False)) for c in settings.foreground_ids}
    if mode == "none":
        return {c: False for c in settings.foreground_ids}
    if mode == "lcc":
        return {c: True for c in settings.foreground_ids}
    raise ValueError(f"--postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {mode!r}")


def predict_case_file(case: InputCase, networks: Sequence[nn.Module], settings: InferenceSettings,
                      output: Path, device: torch.device | str = "cpu", tta_mirror: bool = False,
                      batch_size: int = 4, postprocess: Mapping[int, bool] | None = None,
                      save_probabilities: bool = False) -> CasePrediction:
    """Predict one case from its files and write ``output/<case>.nii.gz`` (and ``<case>.npz``).

    Args:
        case: The case's files (one per channel).
        networks: Evaluation networks in eval mode on ``device``.
        settings: The models' settings (preprocessing, class ids, windows).
        output: The output folder (exists).
        device: Where the networks run.
        tta_mirror: Mirror test-time augmentation.
        batch_size: Slices or windows per forward pass.
        postprocess: Class id → keep its largest component (:func:`postprocessing_choice`); None: nothing.
        save_probabilities: Also write the probabilities on the input's voxel grid.

    Returns:
        What was written.

    Raises:
        ValueError: The case's channel count differs from the models' (the message names its files).
        DatasetError: An unreadable case file.
    """
    image, reference = read_input_case(case)
    if image.shape[0] != settings.in_channels:
        raise ValueError(f"{image.shape[0]} channel(s) ({', '.join(str(f) for f in case.files)}) but the "
                         f"model takes {settings.in_channels}")
    preprocessed, geometry = preprocess_image(image, reference.affine, settings.preprocessing)
    probabilities = predict_probabilities(networks, preprocessed, settings, device, tta_mirror, batch_size)
    restored = restore_probabilities(probabilities.numpy(), geometry)
    raw = labels_from_probabilities(restored, settings.class_ids)
    labels = apply_postprocessing(raw, postprocess or {})
    probability_path = None
    if save_probabilities:
        probability_path = output / f"{case.case_id}{PROBABILITY_ENDING}"
        write_probabilities(restored, probability_path, settings.class_ids)
    label_path = output / f"{case.case_id}{LABEL_ENDING}"
    write_label_map(labels, reference, label_path)
    return CasePrediction(case_id=case.case_id, label_path=label_path, probability_path=probability_path,
                          removed_voxels=int(np.count_nonzero(labels != raw)))


def predict_folder(cases: Sequence[InputCase], networks: Sequence[nn.Module], settings: InferenceSettings,
                   output: Path, device: torch.device | str = "cpu", tta_mirror: bool = False,
                   batch_size: int = 4, postprocess: Mapping[int, bool] | None = None,
                   save_probabilities: bool = False, progress: bool = True,
                   stream: TextIO | None = None) -> list[CasePrediction]:
    """Predict every case of ``cases`` in order (see :func:`predict_case_file`), showing progress.

    Each case's files are written atomically as soon as it is done, so a failure loses nothing
    already written.

    Args:
        progress: Show progress on ``stream`` (standard error by default): a bar on a terminal
            (tqdm when installed, else a line rewritten in place), one line per case otherwise (logs).

    Returns:
        One :class:`CasePrediction` per case.

    Raises:
        CasePredictionError: A case failed (its id in the message); the cases before it are written.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for case in _progress(cases, progress, stream or sys.stderr):
        try:
            written.append(predict_case_file(case, networks, settings, output, device, tta_mirror, batch_size,
                                             postprocess, save_probabilities))
        except Exception as error:  # noqa: BLE001 - any failure is reported with the case it happened in
            raise CasePredictionError(case.case_id, error, completed=len(written)) from error
    return written


def _progress(cases: Sequence[InputCase], enabled: bool, stream: TextIO) -> Iterator[InputCase]:
    """``cases``, with a progress display on ``stream`` while iterating."""
    if not enabled or not cases:
        yield from cases
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not _is_terminal(stream):
        yield from _printed_progress(cases, stream)
        return
    with tqdm(cases, desc="predicting", unit="case", file=stream, dynamic_ncols=True) as bar:
        for case in bar:
            bar.set_postfix_str(case.case_id, refresh=False)
            yield case


def _printed_progress(cases: Sequence[InputCase], stream: TextIO) -> Iterator[InputCase]:
    """Progress without tqdm: ``[i/n] case`` rewritten in place on a terminal, one line per case otherwise."""
    interactive = _is_terminal(stream)
    for position, case in enumerate(cases, 1):
        line = f"predicting [{position}/{len(cases)}] {case.case_id}"
        stream.write(f"\r\x1b[K{line}" if interactive else f"{line}\n")
        stream.flush()
        yield case
    if interactive:
        stream.write("\n")
        stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:
        return False

