"""A small 3-label 3D dataset on disk: anisotropic voxels, an oblique affine in LPS orientation.

What real data looks like to the geometry code (and what the phantom is not): the voxel axes are
not the world axes, the first two point left and posterior (nibabel's ``LPS``), the slices are
three times thicker than the pixels, and there are three foreground structures: an organ (1),
a lesion inside it (2) and a vessel beside it (3).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
SPACING = (0.9, 1.2, 3.0)
SHAPE = (40, 36, 12)


def oblique_lps_affine(spacing: tuple[float, float, float] = SPACING, degrees: float = 18.0) -> np.ndarray:
    """A voxel-to-world affine whose axes point left, posterior and superior, rotated ``degrees``
    about two axes, with voxel size ``spacing`` mm and a non-zero origin."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees * 0.6)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = about_z @ about_x @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = (12.5, -40.0, 7.25)
    return affine


def case_arrays(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One case: a float32 image and its int label map (0..3), structures placed by ``seed``."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3) * np.array([1, 1, 0.3])
    radii = np.array([11.0, 9.0, 3.6]) * rng.uniform(0.85, 1.15)
    organ = (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
             + ((z - centre[2]) / radii[2]) ** 2) <= 1.0
    lesion = (((x - centre[0] - 3) / 4.0) ** 2 + ((y - centre[1]) / 3.5) ** 2 + ((z - centre[2]) / 1.8) ** 2) <= 1.0
    vessel_x = centre[0] - radii[0] - 4
    vessel = ((x - vessel_x) ** 2 + (y - centre[1] - 4) ** 2) <= 2.2 ** 2
    label = np.zeros(shape, np.int16)
    label[organ] = 1
    label[lesion & organ] = 2
    label[vessel & ~organ] = 3
    means = np.array([0.0, 100.0, 160.0, 230.0])
    image = means[label] + rng.normal(0, 12.0, shape) + 20.0 * x / shape[0]
    return image.astype(np.float32), label


def write_dataset(root: Path, num_training: int = 12, num_test: int = 3, seed: int = 0) -> Path:
    """Write the dataset in the nnU-Net raw layout (``imagesTr``, ``labelsTr``, ``imagesTs``) and the
    test cases' reference labels in ``labelsTs`` (outside nnU-Net's layout, for scoring)."""
    affine = oblique_lps_affine()
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    cases = [("imagesTr", "labelsTr", f"multi_{i:03d}", seed * 1000 + i) for i in range(num_training)]
    cases += [("imagesTs", "labelsTs", f"multi_test_{i:03d}", seed * 1000 + 500 + i) for i in range(num_test)]
    for images, labels, case_id, case_seed in cases:
        image, label = case_arrays(case_seed)
        image_nii = nib.Nifti1Image(image, affine)
        image_nii.set_qform(affine, code=1)
        image_nii.set_sform(affine, code=2)
        nib.save(image_nii, str(root / images / f"{case_id}_0000.nii.gz"))
        label_nii = nib.Nifti1Image(label.astype(np.uint8), affine)
        label_nii.set_qform(affine, code=1)
        label_nii.set_sform(affine, code=2)
        nib.save(label_nii, str(root / labels / f"{case_id}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "MultiClassLPS", "channel_names": {"0": "MRI"}, "labels": LABELS,
        "numTraining": num_training, "file_ending": ".nii.gz"}))
    return root
