"""The inverse of preprocessing: arrays on the network's grid back onto the input's voxel grid.

:func:`preprocess_image` preprocesses an image exactly as training did
(:func:`~semiseg.data.preprocess.preprocess_case`) and records a :class:`CaseGeometry`: how
the input's voxel array was reoriented, cropped and resampled. :func:`restore_probabilities`
and :func:`restore_labels` undo those steps in reverse order:

1. resample from the preprocessed grid back to the cropped canonical grid (linear for
   probabilities, then renormalised to sum 1; nearest neighbour for labels), with the grid
   convention of :func:`~semiseg.data.preprocess.resample` (voxel edges aligned);
2. paste the result into the canonical array; outside the crop box is background
   (probability 1 for class index 0, label 0);
3. undo the reorientation (the inverse of nibabel's ``io_orientation`` transform), which only
   permutes and flips axes, so the result lies on the input's own voxel grid and its affine
   applies unchanged.

Without resampling every step is exact, so labels come back voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel import orientations

from semiseg.data.dataset import LoadedCase
from semiseg.data.preprocess import Box, PreprocessSettings, preprocess_case, resample, spacing_of

Shape = tuple[int, int, int]

_CANONICAL = orientations.axcodes2ornt("RAS")


@dataclass(frozen=True)
class CaseGeometry:
    """How one input image was mapped onto the preprocessed grid (what undoing it needs).

    Attributes:
        input_affine: The input's 4x4 voxel-to-world matrix (float64).
        input_shape: ``(X, Y, Z)`` of the input's voxel array, as stored on disk.
        ornt: nibabel orientation ``[3, 2]`` (``io_orientation`` of ``input_affine``): row ``i``
            sends input axis ``i`` to canonical axis ``ornt[i, 0]``, reversed when ``ornt[i, 1]`` is -1.
        canonical_shape: ``(X, Y, Z)`` after reorientation to the closest canonical (RAS+) order.
        crop_box: ``((x0, x1), (y0, y1), (z0, z1))`` kept of the canonical array (half-open),
            or None when the body crop is off.
        cropped_shape: ``(X, Y, Z)`` after the crop (the canonical shape when there is none).
        preprocessed_shape: ``(x, y, z)`` of the network's grid (after resampling).
        spacing: Voxel size in mm of the preprocessed grid along its three axes.
    """

    input_affine: np.ndarray
    input_shape: Shape
    ornt: np.ndarray
    canonical_shape: Shape
    crop_box: Box | None
    cropped_shape: Shape
    preprocessed_shape: Shape
    spacing: tuple[float, float, float]

    @property
    def resampled(self) -> bool:
        """Whether the preprocessed grid differs from the cropped canonical one."""
        return self.preprocessed_shape != self.cropped_shape


def preprocess_image(
    image: np.ndarray, affine: np.ndarray, settings: PreprocessSettings
) -> tuple[np.ndarray, CaseGeometry]:
    """Preprocess an image exactly as training did and record how to undo it.

    Args:
        image: ``[C, X, Y, Z]`` intensities (cast to float32, as the dataset loader does).
        affine: The 4x4 voxel-to-world matrix of the image.
        settings: The preprocessing the model was trained with.

    Returns:
        ``(preprocessed, geometry)``: float32 ``[C, x, y, z]``, identical to
        :func:`~semiseg.data.preprocess.preprocess_case`'s image for the same input, and its
        :class:`CaseGeometry`.

    Raises:
        ValueError: When ``image`` is not 4D, ``affine`` not 4x4, or the image is constant
            (nothing to crop or normalise).
    """
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 4:
        raise ValueError(f"image must be [C, X, Y, Z], got shape {image.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    case = LoadedCase(
        case_id="input",
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=None,
        spacing=spacing_of(affine),
        affine=affine,
    )
    result = preprocess_case(case, settings)
    ornt = orientations.io_orientation(affine)
    input_shape = _shape3(image.shape[1:])
    canonical_shape = _canonical_shape(input_shape, ornt)
    box = result.crop_box
    cropped_shape = canonical_shape if box is None else _shape3([hi - lo for lo, hi in box])
    geometry = CaseGeometry(
        input_affine=affine.copy(),
        input_shape=input_shape,
        ornt=ornt,
        canonical_shape=canonical_shape,
        crop_box=box,
        cropped_shape=cropped_shape,
        preprocessed_shape=_shape3(result.image.shape[1:]),
        spacing=result.spacing,
    )
    return result.image, geometry


def restore_probabilities(probabilities: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Map class probabilities from the preprocessed grid onto the input's voxel grid.

    Each class channel is resampled linearly back to the cropped canonical grid, the
    channels are renormalised to sum 1 per voxel, pasted into the canonical array (outside
    the crop box: probability 1 for class index 0, 0 for the others) and reoriented back.

    Args:
        probabilities: ``[K, x, y, z]`` on the preprocessed grid (softmax output), K >= 1.
        geometry: The case's geometry from :func:`preprocess_image`.

    Returns:
        float32 ``[K, X, Y, Z]`` on the input's voxel grid, summing to 1 per voxel.

    Raises:
        ValueError: When the spatial shape is not ``geometry.preprocessed_shape``.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4 or probabilities.shape[0] < 1:
        raise ValueError(f"probabilities must be [K, x, y, z], got shape {probabilities.shape}")
    _check_grid(probabilities.shape[1:], geometry, "probabilities")
    values = resample(probabilities.astype(np.float32, copy=False), geometry.cropped_shape, 1)
    values = np.clip(values, 0.0, None)
    total = values.sum(axis=0)
    empty = total <= 0.0
    values = values / np.where(empty, 1.0, total)[None]
    values[0][empty] = 1.0
    canonical = np.zeros((probabilities.shape[0], *geometry.canonical_shape), dtype=np.float32)
    canonical[0] = 1.0
    canonical[(slice(None), *_box_slices(geometry))] = values
    return np.stack([_to_input_orientation(channel, geometry) for channel in canonical]).astype(np.float32)


def restore_labels(labels: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Map a label map from the preprocessed grid onto the input's voxel grid.

    Nearest-neighbour resampling, background 0 outside the crop box, then the inverse
    reorientation; exact (voxel for voxel) when preprocessing did not resample.

    Args:
        labels: Integer ``[x, y, z]`` on the preprocessed grid.
        geometry: The case's geometry from :func:`preprocess_image`.

    Returns:
        ``[X, Y, Z]`` of the input's dtype on the input's voxel grid.

    Raises:
        ValueError: When the shape is not ``geometry.preprocessed_shape``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [x, y, z], got shape {labels.shape}")
    _check_grid(labels.shape, geometry, "labels")
    values = resample(labels, geometry.cropped_shape, 0)
    canonical = np.zeros(geometry.canonical_shape, dtype=labels.dtype)
    canonical[_box_slices(geometry)] = values
    return _to_input_orientation(canonical, geometry)


def labels_from_probabilities(probabilities: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """The most probable class of each voxel, as the class id values.

    Args:
        probabilities: ``[K, ...]`` class probabilities (or scores).
        class_ids: The label value of each of the K channels, e.g. ``[0, 1, 2, 4]``.

    Returns:
        int16 label map of ``probabilities.shape[1:]``; ties go to the lower channel index.

    Raises:
        ValueError: When ``class_ids`` does not have one value per channel.
    """
    probabilities = np.asarray(probabilities)
    ids = np.asarray(list(class_ids), dtype=np.int64)
    if probabilities.ndim < 2 or ids.shape != (probabilities.shape[0],):
        raise ValueError(f"need one class id per channel: {len(ids)} ids for probabilities "
                         f"of shape {probabilities.shape}")
    return ids[np.argmax(probabilities, axis=0)].astype(np.int16)


def _shape3(shape: Sequence[int]) -> Shape:
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _canonical_shape(shape: Shape, ornt: np.ndarray) -> Shape:
    out = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = shape[axis]
    return _shape3(out)


def _box_slices(geometry: CaseGeometry) -> tuple[slice, slice, slice]:
    box = geometry.crop_box or tuple((0, n) for n in geometry.canonical_shape)
    return (slice(*box[0]), slice(*box[1]), slice(*box[2]))


def _check_grid(shape: Sequence[int], geometry: CaseGeometry, what: str) -> None:
    if tuple(int(n) for n in shape) != geometry.preprocessed_shape:
        raise ValueError(f"{what} have spatial shape {tuple(shape)} but the case was preprocessed "
                         f"to {geometry.preprocessed_shape}")


def _to_input_orientation(volume: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    back = orientations.ornt_transform(_CANONICAL, geometry.ornt)
    return np.ascontiguousarray(orientations.apply_orientation(volume, back))
