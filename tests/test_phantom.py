"""Tests of the seeded MRI-like phantom generator."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from semiseg.data import DatasetError, generate_phantom, load_case, read_layout, validate_layout
from semiseg.data import phantom as phantom_module
from semiseg.data.phantom import phantom_sites

SMALL = {"num_training": 6, "num_test": 2, "shape": (40, 36, 6), "spacing": (0.8, 0.9, 2.5)}


def _arrays(layout):
    return {c.case_id: load_case(c, layout.class_ids) for c in layout.training + layout.test}


@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> object:
    """A phantom at the default in-plane size: 9 cases, 3 sites."""
    return generate_phantom(tmp_path_factory.mktemp("mri") / "ds", num_training=9, num_test=1, seed=5)


def _contrast(image: np.ndarray, label: np.ndarray) -> float:
    """(structure mean - surrounding body mean) / surrounding body mean, in-plane ring of 3 voxels."""
    inside = label.astype(bool)
    ring = ndimage.binary_dilation(inside, np.ones((7, 7, 1), bool)) & ~inside
    return float((image[inside].mean() - image[ring].mean()) / image[ring].mean())


def test_same_seed_gives_identical_arrays_and_other_seed_differs(tmp_path: Path) -> None:
    first = _arrays(generate_phantom(tmp_path / "a", seed=11, **SMALL))
    again = _arrays(generate_phantom(tmp_path / "b", seed=11, **SMALL))
    other = _arrays(generate_phantom(tmp_path / "c", seed=12, **SMALL))
    assert list(first) == list(again) == list(other)
    for case_id, case in first.items():
        assert case.image.tobytes() == again[case_id].image.tobytes()
        assert not np.array_equal(case.image, other[case_id].image)
        if case.label is not None:
            assert case.label.tobytes() == again[case_id].label.tobytes()


def test_layout_shapes_dtypes_and_spacing_round_trip(tmp_path: Path) -> None:
    layout = generate_phantom(tmp_path / "ds", seed=1, **SMALL)
    assert layout.labelled_ids == tuple(f"phantom_{k:03d}" for k in range(6))
    assert layout.unlabelled_ids == ()
    assert [c.case_id for c in layout.test] == ["phantom_test_000", "phantom_test_001"]
    assert all(c.label_path is None for c in layout.test)
    assert layout.channel_names == {"0": "MRI"}
    assert layout.labels == {"background": 0, "structure": 1}
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["numTraining"] == 6
    for case in _arrays(layout).values():
        assert case.image.shape == (1, 40, 36, 6)
        assert case.image.dtype == np.float32
        assert case.spacing == pytest.approx((0.8, 0.9, 2.5))
        assert np.all(np.isfinite(case.image))
    zooms = nib.load(str(layout.training[0].image_paths[0])).header.get_zooms()
    assert tuple(float(z) for z in zooms) == pytest.approx((0.8, 0.9, 2.5))
    label = load_case(layout.training[0]).label
    assert label.dtype == np.int16 and label.shape == (40, 36, 6)
    validate_layout(layout)


def test_labels_are_binary_with_plausible_structure_size(mri) -> None:
    fractions = []
    for case in _arrays(mri).values():
        if case.label is None:
            continue
        assert set(np.unique(case.label)) == {0, 1}
        fractions.append(case.label.mean())
    assert 0.01 <= np.mean(fractions) <= 0.2
    assert min(fractions) > 0.003 and max(fractions) < 0.3


def test_structure_varies_smoothly_along_z_and_misses_some_slices(mri) -> None:
    missing_somewhere = False
    for case in _arrays(mri).values():
        if case.label is None:
            continue
        areas = case.label.sum(axis=(0, 1))
        present = np.flatnonzero(areas)
        assert len(present) >= 2
        assert np.all(np.diff(present) == 1), "structure slices must be contiguous"
        missing_somewhere |= len(present) < case.label.shape[2]
        peak = int(np.argmax(areas))
        assert np.all(np.diff(areas[: peak + 1]) >= -0.1 * areas[peak])
        assert np.all(np.diff(areas[peak:]) <= 0.1 * areas[peak])
    assert missing_somewhere


def test_structure_contrast_depends_on_site(mri) -> None:
    sites = phantom_sites(mri)
    assert [sites[f"phantom_{k:03d}"] for k in range(9)] == [0, 1, 2] * 3
    by_site: dict[int, list[float]] = {}
    for case_id, case in _arrays(mri).items():
        if case.label is not None:
            by_site.setdefault(sites[case_id], []).append(_contrast(case.image[0], case.label))
    means = sorted(float(np.mean(v)) for v in by_site.values())
    assert len(means) == 3
    assert 0.03 < min(means) < 0.18, f"one site must show the structure only faintly: {means}"
    assert max(means) > 0.3
    assert min(np.diff(means)) > 0.08, f"site contrasts too similar: {means}"


def test_single_threshold_does_not_segment_the_structure(mri) -> None:
    best_dice = []
    for case in list(_arrays(mri).values())[:6]:
        image, inside = case.image[0], case.label.astype(bool)
        dice = 0.0
        for q in np.quantile(image, np.linspace(0.02, 0.98, 33)):
            for mask in (image > q, image < q):
                dice = max(dice, 2 * np.sum(mask & inside) / (mask.sum() + inside.sum()))
        best_dice.append(dice)
    assert np.median(best_dice) < 0.8
    assert max(best_dice) < 0.95


def _largest_bright_blob_away_from_structure(image: np.ndarray, label: np.ndarray) -> int:
    """Voxels in the largest blob >20% brighter than its bias-corrected surroundings, off the structure."""
    inside = label.astype(bool)
    ring = ndimage.binary_dilation(inside, np.ones((7, 7, 1), bool)) & ~inside
    smooth = ndimage.uniform_filter(image, size=(3, 3, 1))
    body = smooth > 0.5 * image[ring].mean()
    weight = (body & ~ndimage.binary_dilation(inside, np.ones((5, 5, 1), bool))).astype(np.float32)
    local = ndimage.gaussian_filter(image * weight, (10, 10, 0)) / np.maximum(
        ndimage.gaussian_filter(weight, (10, 10, 0)), 1e-3)
    far = ~ndimage.binary_dilation(inside, np.ones((9, 9, 3), bool))
    core = ndimage.binary_erosion(body, np.ones((7, 7, 1), bool))
    blobs, count = ndimage.label((smooth / np.maximum(local, 1e-3) > 1.2) & far & core)
    return int(np.bincount(blobs.ravel())[1:].max()) if count else 0


def test_bright_site_cases_contain_unlabelled_distractor_blobs(mri) -> None:
    sites = phantom_sites(mri)
    sizes = [
        _largest_bright_blob_away_from_structure(case.image[0], case.label)
        for case_id, case in _arrays(mri).items()
        if case.label is not None and sites[case_id] == 0
    ]
    assert len(sizes) == 3
    assert sum(size >= 30 for size in sizes) >= 2, f"too few distractors: {sizes}"


def test_two_dimensional_mode(tmp_path: Path) -> None:
    layout = generate_phantom(tmp_path / "ds", num_training=3, num_test=1, shape=(32, 32, 1),
                              spacing=(0.5, 0.5, 1.0), seed=2)
    for case in _arrays(layout).values():
        assert case.image.shape == (1, 32, 32, 1)
        assert case.spacing == pytest.approx((0.5, 0.5, 1.0))
        if case.label is not None:
            assert case.label.shape == (32, 32, 1)
            assert 0.01 < case.label.mean() < 0.3


def test_multichannel_cases_have_distinct_channels(tmp_path: Path) -> None:
    layout = generate_phantom(tmp_path / "ds", num_training=2, num_test=0, shape=(24, 24, 4),
                              num_channels=2, seed=3)
    assert layout.num_channels == 2
    assert layout.channel_names == {"0": "MRI", "1": "MRI_1"}
    case = load_case(layout.training[0])
    assert case.image.shape == (2, 24, 24, 4)
    assert not np.allclose(case.image[0], case.image[1])


def test_same_parameters_reuse_and_other_parameters_regenerate(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    generate_phantom(root, seed=4, **SMALL)
    image = root / "imagesTr" / "phantom_000_0000.nii.gz"
    def stamps() -> tuple[int, int, int]:
        return ((root / "dataset.json").stat().st_mtime_ns, image.stat().st_mtime_ns, image.stat().st_ino)

    first = stamps()
    before = load_case(read_layout(root).training[0]).image
    generate_phantom(root, seed=4, **SMALL)
    assert stamps() == first
    layout = generate_phantom(root, seed=5, **SMALL)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["semiseg_phantom"]["params"]["seed"] == 5
    assert not np.array_equal(load_case(layout.training[0]).image, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "temporary folders left behind"


def _generate_small(root: str) -> list[str]:
    return list(generate_phantom(root, seed=6, **SMALL).labelled_ids)


def test_concurrent_generation_of_the_same_phantom(tmp_path: Path) -> None:
    root = str(tmp_path / "shared")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_generate_small, [root] * 3)
    assert results == [[f"phantom_{k:03d}" for k in range(6)]] * 3
    validate_layout(read_layout(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"], "temporary folders left behind"


def test_incomplete_phantom_is_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    generate_phantom(root, seed=4, **SMALL)
    (root / "imagesTs" / "phantom_test_001_0000.nii.gz").unlink()
    layout = generate_phantom(root, seed=4, **SMALL)
    assert len(layout.test) == 2


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write_case(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write_case(*args, **kwargs)

    real_write_case = phantom_module.write_case
    monkeypatch.setattr(phantom_module, "write_case", failing_write_case)
    with pytest.raises(KeyboardInterrupt):
        generate_phantom(tmp_path / "ds", seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_phantom(tmp_path: Path) -> None:
    root = tmp_path / "real_data"
    root.mkdir()
    (root / "notes.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not a semiseg phantom"):
        generate_phantom(root, seed=0, **SMALL)
    assert (root / "notes.txt").read_text() == "precious"


def test_invalid_parameters_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spacing"):
        generate_phantom(tmp_path / "ds", spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="num_training"):
        generate_phantom(tmp_path / "ds", num_training=0)
