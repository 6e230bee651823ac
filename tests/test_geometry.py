"""Tests of the inverse of preprocessing: arrays on the network's grid back onto the input's grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data import LoadedCase
from semiseg.data.geometry import (
    CaseGeometry,
    labels_from_probabilities,
    preprocess_image,
    restore_labels,
    restore_probabilities,
)
from semiseg.data.preprocess import PreprocessSettings, crop, preprocess_case, resample, spacing_of, to_canonical
from semiseg.metrics import binary_metrics

SPACING = (0.8, 1.1, 3.0)
CLASSES = (0, 1, 2, 3)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def oblique_lps_affine() -> np.ndarray:
    """Voxel-to-world of an LPS file, rotated 20 deg about X and 15 deg about Z, spacing (0.8, 1.1, 3)."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0, 20.0) @ _rotation(2, 15.0) @ np.diag([-SPACING[0], -SPACING[1], SPACING[2]])
    affine[:3, 3] = (40.0, 25.0, -30.0)
    return affine


def permuted_affine() -> np.ndarray:
    """An oblique file whose voxel axes run S, L, P (axes permuted and flipped)."""
    affine = np.eye(4)
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    affine[:3, :3] = _rotation(1, 12.0) @ axes @ np.diag(SPACING)
    affine[:3, 3] = (-5.0, 60.0, 12.0)
    return affine


def _saved(tmp_path: Path, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Write and reload a NIfTI file so the affine is exactly what a reader sees."""
    path = tmp_path / "case.nii.gz"
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
    return nib.load(path)


def _scene(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image with a zero background around a body, and 3 random labels inside the body."""
    rng = np.random.default_rng(seed)
    body = tuple(slice(2, n - 3) for n in shape)
    image = np.zeros(shape, dtype=np.float32)
    image[body] = rng.uniform(50.0, 150.0, size=image[body].shape)
    labels = np.zeros(shape, dtype=np.int16)
    labels[body] = rng.integers(0, 4, size=labels[body].shape)
    return image, labels


def _blobs(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A body image and smooth ellipsoidal classes (in world mm) of a few thousand mm^3 each."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = (affine @ np.array([*(np.array(shape) - 1) / 2.0, 1.0]))[:3]
    offset = world - centre
    radius = np.sqrt(((offset / np.array([20.0, 16.0, 14.0])) ** 2).sum(axis=-1))
    labels = np.zeros(shape, dtype=np.int16)
    labels[radius < 1.0] = 1
    inner = np.sqrt((((offset - (6.0, 0.0, 2.0)) / np.array([9.0, 8.0, 8.0])) ** 2).sum(axis=-1))
    labels[inner < 1.0] = 2
    side = np.sqrt((((offset - (-9.0, 3.0, -3.0)) / np.array([6.0, 7.0, 7.0])) ** 2).sum(axis=-1))
    labels[side < 1.0] = 3
    image = np.where(radius < 1.3, 100.0 + 10.0 * labels, 0.0).astype(np.float32)
    return image, labels


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([(labels == c) for c in CLASSES]).astype(np.float32)


def _network_probabilities(one_hot: np.ndarray, affine: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """The one-hot map carried to the preprocessed grid as a network's softmax would lie there."""
    canonical, _, _ = to_canonical(one_hot, None, affine)
    if geometry.crop_box is not None:
        canonical = crop(canonical, geometry.crop_box)
    return resample(canonical, geometry.preprocessed_shape, 1)


@pytest.mark.parametrize("crop_to_body", [False, True])
@pytest.mark.parametrize("make_affine", [oblique_lps_affine, permuted_affine])
def test_round_trip_without_resampling_is_exact(tmp_path, crop_to_body, make_affine) -> None:
    image, labels = _scene((14, 12, 7), seed=3)
    loaded = _saved(tmp_path, labels, make_affine())
    affine = loaded.affine
    settings = PreprocessSettings(target_spacing=None, crop_to_body=crop_to_body, normalisation="zscore")
    preprocessed, geometry = preprocess_image(image[None], affine, settings)

    reference = preprocess_case(LoadedCase("c", image[None], labels, spacing_of(affine), affine), settings)
    assert np.array_equal(preprocessed, reference.image)
    assert geometry.input_shape == (14, 12, 7) and not geometry.resampled
    assert geometry.preprocessed_shape == preprocessed.shape[1:] == reference.label.shape
    assert (geometry.crop_box is not None) == crop_to_body
    if crop_to_body:
        assert sorted(geometry.cropped_shape) == [2, 7, 9]
    assert sorted(geometry.canonical_shape) == sorted(geometry.input_shape)

    restored = restore_labels(reference.label, geometry)
    assert restored.shape == labels.shape
    assert np.array_equal(restored, labels)

    probabilities = restore_probabilities(_one_hot(reference.label), geometry)
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, *labels.shape)
    assert np.array_equal(labels_from_probabilities(probabilities, CLASSES), labels)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-6)


@pytest.mark.parametrize("make_affine", [oblique_lps_affine, permuted_affine])
def test_round_trip_with_resampling_keeps_every_class(tmp_path, make_affine) -> None:
    shape = (56, 40, 14)
    affine = _saved(tmp_path, np.zeros(shape, np.int16), make_affine()).affine
    image, labels = _blobs(shape, affine)
    settings = PreprocessSettings(target_spacing=(1.0, 1.0, 1.0), crop_to_body=True, normalisation="zscore_nonzero")
    preprocessed, geometry = preprocess_image(image[None], affine, settings)
    assert geometry.resampled and geometry.crop_box is not None
    assert geometry.preprocessed_shape == preprocessed.shape[1:]
    np.testing.assert_allclose(geometry.spacing, (1.0, 1.0, 1.0), atol=0.1)

    network = _network_probabilities(_one_hot(labels), affine, geometry)
    probabilities = restore_probabilities(network, geometry)
    assert probabilities.shape == (4, *shape)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    restored = labels_from_probabilities(probabilities, CLASSES)
    assert restored.shape == shape
    for value in (1, 2, 3):
        dice = binary_metrics(restored == value, labels == value, SPACING)["dice"]
        assert dice >= 0.99, f"class {value}: Dice {dice:.4f}"

    nearest = restore_labels(labels_from_probabilities(network, CLASSES), geometry)
    assert nearest.shape == shape and set(np.unique(nearest)) <= set(CLASSES)
    for value in (1, 2, 3):
        assert binary_metrics(nearest == value, labels == value, SPACING)["dice"] >= 0.95


def test_outside_the_crop_is_background(tmp_path) -> None:
    image, _ = _scene((14, 12, 7), seed=5)
    affine = _saved(tmp_path, image, oblique_lps_affine()).affine
    settings = PreprocessSettings(target_spacing=(1.5, 1.5, 2.0), crop_to_body=True)
    _, geometry = preprocess_image(image[None], affine, settings)
    uniform = np.full((3, *geometry.preprocessed_shape), 1.0 / 3.0, dtype=np.float32)
    probabilities = restore_probabilities(uniform, geometry)
    outside = image == 0
    assert outside.any()
    assert np.all(probabilities[0][outside] == 1.0) and np.all(probabilities[1:, outside] == 0.0)
    np.testing.assert_allclose(probabilities[:, 2:-3, 2:-3, 2:-3], 1.0 / 3.0, atol=1e-6)
    labels = restore_labels(np.full(geometry.preprocessed_shape, 2, np.int16), geometry)
    assert np.all(labels[outside] == 0) and np.all(labels[2:-3, 2:-3, 2:-3] == 2)


def test_preprocess_image_equals_training_preprocessing(tmp_path) -> None:
    rng = np.random.default_rng(11)
    image, labels = _blobs((40, 30, 10), oblique_lps_affine())
    channels = np.stack([image, np.where(image > 0, rng.normal(300.0, 40.0, image.shape), 0.0)]).astype(np.float32)
    affine = _saved(tmp_path, labels, oblique_lps_affine()).affine
    settings = PreprocessSettings(target_spacing=(1.0, 1.0, 1.5), crop_to_body=True,
                                  normalisation="zscore_nonzero", image_order=3)
    preprocessed, geometry = preprocess_image(channels, affine, settings)
    training = preprocess_case(LoadedCase("c", channels, labels, spacing_of(affine), affine), settings)
    assert preprocessed.dtype == np.float32
    assert np.array_equal(preprocessed, training.image)
    assert geometry.crop_box == training.crop_box and geometry.spacing == training.spacing
    assert geometry.preprocessed_shape == training.label.shape
    assert np.array_equal(geometry.input_affine, affine)


def test_orientation_record_matches_nibabel(tmp_path) -> None:
    affine = _saved(tmp_path, np.zeros((5, 6, 7), np.int16), permuted_affine()).affine
    image = np.random.default_rng(0).normal(size=(1, 5, 6, 7)).astype(np.float32)
    _, geometry = preprocess_image(image, affine, PreprocessSettings())
    assert nib.aff2axcodes(affine) == ("S", "L", "P")
    assert geometry.canonical_shape == (6, 7, 5)
    assert nib.as_closest_canonical(nib.Nifti1Image(image[0], affine)).shape == geometry.canonical_shape


def test_wrong_shapes_are_refused(tmp_path) -> None:
    image, _ = _scene((14, 12, 7), seed=1)
    _, geometry = preprocess_image(image[None], oblique_lps_affine(), PreprocessSettings())
    with pytest.raises(ValueError, match=r"preprocessed to \(14, 12, 7\)"):
        restore_probabilities(np.zeros((4, 14, 12, 6), np.float32), geometry)
    with pytest.raises(ValueError, match=r"preprocessed to \(14, 12, 7\)"):
        restore_labels(np.zeros((12, 14, 7), np.int16), geometry)
    with pytest.raises(ValueError, match=r"\[C, X, Y, Z\]"):
        preprocess_image(image, oblique_lps_affine(), PreprocessSettings())


def test_labels_from_probabilities_maps_non_contiguous_ids() -> None:
    probabilities = np.zeros((4, 2, 1, 1), np.float32)
    probabilities[3, 0] = 0.9
    probabilities[1, 1] = 0.6
    labels = labels_from_probabilities(probabilities, [0, 1, 2, 4])
    assert labels.dtype == np.int16 and labels[:, 0, 0].tolist() == [4, 1]
    with pytest.raises(ValueError, match="one class id per channel"):
        labels_from_probabilities(probabilities, [0, 1, 2])
