"""Per-case preprocessing: canonical orientation, body crop, resampling, intensity normalisation.

Every function here is pure (arrays in, new arrays out). :func:`preprocess_case`
chains them in this order:

1. reorient to the closest canonical (RAS+) voxel order, as nibabel's
   ``as_closest_canonical`` does (axes permuted/flipped, never interpolated);
2. optionally crop to the body: the bounding box of the voxels where some
   channel is above its minimum (the background: 0 for most MRI, air or
   padding for CT);
3. optionally resample to a target spacing, the image with linear or cubic
   splines and the label (and body mask) with nearest neighbour;
4. normalise intensities per channel: z-score over all voxels, z-score over
   the body voxels (the rest set to 0; the body is as in step 2, which is the
   nonzero voxels of an MRI with a zero background), or a CT window
   ``[lo, hi]`` clipped and mapped to ``[0, 1]``.

Normalising last makes the stored statistics exact (mean 0 and std 1 in the
space the network sees), and cubic overshoot cannot leave the CT window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel import orientations
from scipy import ndimage

from semiseg.data.dataset import LoadedCase

NORMALISATIONS = ("zscore", "zscore_nonzero", "ct")

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class PreprocessSettings:
    """How cases are preprocessed once per dataset (these settings are part of the cache key).

    Attributes:
        target_spacing: Voxel size in mm along X, Y, Z after resampling; None keeps each case's own.
        normalisation: ``"zscore"`` (per channel, all voxels), ``"zscore_nonzero"``
            (per channel, body voxels; background set to 0) or ``"ct"`` (window, see ``ct_window``).
        ct_window: ``(lo, hi)`` intensities mapped to ``[0, 1]`` by the ``"ct"`` normalisation.
        crop_to_body: Crop each case to the bounding box of its body voxels.
        dims: 2 (stored as one row per axial slice, along Z) or 3 (one row per volume).
        image_order: Spline order of image resampling: 1 (linear) or 3 (cubic).
    """

    target_spacing: tuple[float, float, float] | None = None
    normalisation: str = "zscore"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    crop_to_body: bool = False
    dims: int = 2
    image_order: int = 1

    def __post_init__(self) -> None:
        """Check and normalise the field values (lists become tuples of floats).

        Raises:
            ValueError: On an unknown normalisation, a spacing that is not three
                positive numbers, a window with ``lo >= hi``, dims other than 2
                or 3, or an image order other than 1 or 3.
        """
        if self.target_spacing is not None:
            spacing = tuple(float(s) for s in self.target_spacing)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise ValueError("target_spacing must be 3 positive numbers (X, Y, Z in mm), "
                                 f"got {self.target_spacing}")
            object.__setattr__(self, "target_spacing", spacing)
        window = tuple(float(v) for v in self.ct_window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"ct_window must be (lo, hi) with lo < hi, got {self.ct_window}")
        object.__setattr__(self, "ct_window", window)
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if self.image_order not in (1, 3):
            raise ValueError(f"image_order must be 1 (linear) or 3 (cubic), got {self.image_order}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict.

        Returns:
            Field name to value (tuples as lists).
        """
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessSettings:
        """Build settings from :meth:`to_dict`'s output.

        Args:
            values: Field name to value.

        Returns:
            The settings.

        Raises:
            ValueError: See :meth:`__post_init__`.
        """
        return cls(**values)


@dataclass(frozen=True)
class PreprocessedCase:
    """One case after :func:`preprocess_case`.

    Attributes:
        case_id: The case identifier.
        image: float32 ``[C, X, Y, Z]`` in canonical orientation, cropped, resampled, normalised.
        label: int16 ``[X, Y, Z]`` on the same grid, or None for unlabelled cases.
        spacing: Voxel size in mm of ``image`` (the effective spacing after resampling).
        original_shape: ``[X, Y, Z]`` as stored on disk (before reorientation).
        original_spacing: Voxel size in mm as stored on disk.
        crop_box: ``((x0, x1), (y0, y1), (z0, z1))`` kept of the canonical array, or None.
        intensity_range: Raw ``(min, max)`` per channel, before any step.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    crop_box: Box | None
    intensity_range: tuple[tuple[float, float], ...]


def to_canonical(
    image: np.ndarray, label: np.ndarray | None, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Reorder axes so the voxel array is in the closest canonical (RAS+) orientation.

    Args:
        image: ``[C, X, Y, Z]``.
        label: ``[X, Y, Z]`` or None.
        affine: The 4x4 voxel-to-world matrix of the image.

    Returns:
        ``(image, label, affine)`` reoriented; the affine maps the new voxel
        indices to the same world points. An oblique affine keeps its rotation
        (no interpolation happens here).
    """
    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, orientations.axcodes2ornt("RAS")):
        return image, label, affine
    new_affine = affine @ orientations.inv_ornt_aff(ornt, image.shape[1:])
    new_image = np.stack([orientations.apply_orientation(channel, ornt) for channel in image])
    new_label = None if label is None else np.ascontiguousarray(orientations.apply_orientation(label, ornt))
    return np.ascontiguousarray(new_image), new_label, new_affine


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the norms of the affine's columns.

    Args:
        affine: A 4x4 voxel-to-world matrix.

    Returns:
        ``(sx, sy, sz)``.
    """
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def body_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where some channel is above its own minimum (the background).

    Args:
        image: ``[C, X, Y, Z]``.

    Returns:
        bool ``[X, Y, Z]``.
    """
    minima = image.reshape(image.shape[0], -1).min(axis=1)
    return np.any(image > minima[:, None, None, None], axis=0)


def body_box(mask: np.ndarray) -> Box:
    """Bounding box of a mask's true voxels.

    Args:
        mask: bool ``[X, Y, Z]``.

    Returns:
        ``((x0, x1), (y0, y1), (z0, z1))``, half-open.

    Raises:
        ValueError: When the mask is empty (a constant image has no body).
    """
    if not mask.any():
        raise ValueError("no voxel is above the background (constant image): cannot crop to the body")
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bounds.append((int(hits[0]), int(hits[-1]) + 1))
    return (bounds[0], bounds[1], bounds[2])


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """Crop the last three axes of ``array`` to ``box``.

    Args:
        array: ``[..., X, Y, Z]``.
        box: Half-open bounds per spatial axis.

    Returns:
        A contiguous copy of the cropped array.
    """
    index = (Ellipsis, *(slice(lo, hi) for lo, hi in box))
    return np.ascontiguousarray(array[index])


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """Grid size that covers the same field of view at the target spacing.

    Args:
        shape: ``(X, Y, Z)``.
        spacing: Current voxel size in mm.
        target: Wanted voxel size in mm.

    Returns:
        ``round(shape * spacing / target)`` per axis, at least 1.
    """
    sizes = [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]
    return (sizes[0], sizes[1], sizes[2])


def resample(volume: np.ndarray, new_shape: tuple[int, int, int], order: int) -> np.ndarray:
    """Resample the last three axes of ``volume`` onto a grid of ``new_shape``.

    Voxel edges are aligned (``grid_mode=True``), so the field of view is kept
    and a 2:1 down-sampling takes each output voxel from the centre of its two
    input voxels. Order 0 (nearest) keeps label values exactly.

    Args:
        volume: ``[X, Y, Z]`` or ``[C, X, Y, Z]`` (bool masks are resampled with nearest).
        new_shape: Output ``(X, Y, Z)``.
        order: Spline order: 0 nearest, 1 linear, 3 cubic.

    Returns:
        The resampled array, of the input's dtype.
    """
    if volume.ndim == 4:
        return np.stack([resample(channel, new_shape, order) for channel in volume])
    if tuple(volume.shape) == tuple(new_shape):
        return volume.copy()
    if volume.dtype == np.bool_:
        return resample(volume.astype(np.uint8), new_shape, 0).astype(np.bool_)
    factors = [n / o for n, o in zip(new_shape, volume.shape)]
    return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def normalise(
    image: np.ndarray, method: str, ct_window: tuple[float, float] = (-1000.0, 1000.0),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise intensities per channel.

    Args:
        image: ``[C, X, Y, Z]``.
        method: ``"zscore"``, ``"zscore_nonzero"`` or ``"ct"`` (see :class:`PreprocessSettings`).
        ct_window: ``(lo, hi)`` of the ``"ct"`` method.
        mask: bool ``[X, Y, Z]`` body voxels for ``"zscore_nonzero"``; defaults to :func:`body_mask`.

    Returns:
        float32 ``[C, X, Y, Z]``.

    Raises:
        ValueError: When a channel's voxels (or body voxels) are constant, or
            the method is unknown.
    """
    image = image.astype(np.float32, copy=True)
    if method == "ct":
        lo, hi = ct_window
        return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if method not in ("zscore", "zscore_nonzero"):
        raise ValueError(f"unknown normalisation {method!r}; use one of {NORMALISATIONS}")
    if method == "zscore_nonzero":
        mask = body_mask(image) if mask is None else mask
    for channel in range(image.shape[0]):
        values = image[channel] if method == "zscore" else image[channel][mask]
        std = float(values.std()) if values.size else 0.0
        if std == 0.0:
            raise ValueError(f"constant image channel {channel}: intensity normalisation would divide by zero")
        image[channel] = (image[channel] - float(values.mean())) / std
        if method == "zscore_nonzero":
            image[channel][~mask] = 0.0
    return image


def preprocess_case(case: LoadedCase, settings: PreprocessSettings) -> PreprocessedCase:
    """Reorient, crop, resample and normalise one case (the order is in the module doc).

    Args:
        case: The loaded case (``image [C, X, Y, Z]``, ``label [X, Y, Z]`` or None, affine).
        settings: What to do.

    Returns:
        The preprocessed case; ``spacing`` is the effective voxel size after
        resampling, ``shape * spacing`` being the original field of view.

    Raises:
        ValueError: When the image is constant (no body to crop, or nothing to normalise).
    """
    flat = case.image.reshape(case.image.shape[0], -1)
    intensity_range = tuple((float(lo), float(hi)) for lo, hi in zip(flat.min(axis=1), flat.max(axis=1)))
    image, label, affine = to_canonical(case.image, case.label, case.affine)
    spacing = spacing_of(affine)
    mask = body_mask(image) if settings.crop_to_body or settings.normalisation == "zscore_nonzero" else None
    box = None
    if settings.crop_to_body and mask is not None:
        box = body_box(mask)
        image, mask = crop(image, box), crop(mask, box)
        label = None if label is None else crop(label, box)
    if settings.target_spacing is not None:
        new_shape = resampled_shape(image.shape[1:], spacing, settings.target_spacing)
        spacing = _effective_spacing(image.shape[1:], spacing, new_shape)
        image = resample(image, new_shape, settings.image_order)
        label = None if label is None else resample(label, new_shape, 0)
        mask = None if mask is None else resample(mask, new_shape, 0)
    image = normalise(image, settings.normalisation, settings.ct_window, mask)
    return PreprocessedCase(
        case_id=case.case_id,
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=None if label is None else np.ascontiguousarray(label, dtype=np.int16),
        spacing=spacing,
        original_shape=(int(case.image.shape[1]), int(case.image.shape[2]), int(case.image.shape[3])),
        original_spacing=(float(case.spacing[0]), float(case.spacing[1]), float(case.spacing[2])),
        crop_box=box,
        intensity_range=intensity_range,
    )


def _effective_spacing(
    shape: tuple[int, ...], spacing: tuple[float, float, float], new_shape: tuple[int, int, int]
) -> tuple[float, float, float]:
    sizes = [s * n / m for s, n, m in zip(spacing, shape, new_shape)]
    return (sizes[0], sizes[1], sizes[2])
