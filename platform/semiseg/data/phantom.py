"""A seeded generator of small MRI-like segmentation datasets ("phantoms").

Each case is a crude MRI slab: a textured body on a dark background, a
deformed ellipsoidal structure of interest (label 1) whose contrast to the
body depends on the acquisition site (clearly, moderately or faintly brighter),
one or two unlabelled distractor blobs of similar intensity, a smooth
multiplicative bias field, Rician noise, a site-dependent intensity scale and
offset, and partial-volume edges (rendered at twice the in-plane resolution,
then average-pooled). Thresholding alone cannot find the structure, and sites
differ, so labelled data is scarce-but-informative: a setting in which
semi-supervised learning can matter.

The dataset is written in the nnU-Net v2 raw layout (see
:mod:`semiseg.data.layout`, written by :mod:`semiseg.data.writer`); the generator's parameters and each case's site
are stored in ``dataset.json`` under ``"semiseg_phantom"``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from semiseg.data.dataset import DatasetLayout
from semiseg.data.errors import DatasetError
from semiseg.data.layout import read_layout
from semiseg.data.writer import write_case, write_dataset_json

GENERATOR_VERSION = 2
PHANTOM_KEY = "semiseg_phantom"
LABELS = {"background": 0, "structure": 1}

# Site properties, cycled when there are more sites than entries.
# All positive: a site whose contrast is inverted relative to every labelled case cannot be
# learned from unlabelled images by any consistency method; a faint site can.
SITE_CONTRAST = (0.45, 0.25, 0.12, 0.35, 0.18, 0.60)
SITE_NOISE = (0.04, 0.06, 0.07, 0.05, 0.07, 0.035)
SITE_SCALE = (1000.0, 450.0, 1800.0, 700.0, 1300.0, 900.0)
SITE_OFFSET = (0.0, 40.0, 15.0, 5.0, 25.0, 60.0)
# Per-channel multipliers of structure and distractor contrast (cycled).
CHANNEL_STRUCTURE_GAIN = (1.0, -0.7, 0.5, -0.4)
CHANNEL_DISTRACTOR_GAIN = (1.0, 0.6, -0.5, 0.8)


@dataclass(frozen=True)
class _Grid:
    """Normalised coordinates in [-1, 1]; in-plane at twice the output resolution."""

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray


@dataclass(frozen=True)
class _Blob:
    """A deformed ellipsoid: centre, radii (normalised units), in-plane angle, harmonics."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]


def generate_phantom(
    root: str | os.PathLike[str],
    *,
    num_training: int = 40,
    num_test: int = 4,
    shape: tuple[int, int, int] = (96, 96, 12),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    num_sites: int = 3,
    seed: int = 0,
    num_channels: int = 1,
) -> DatasetLayout:
    """Write a phantom dataset (or reuse an identical one) and return its layout.

    All training cases are labelled; test cases (imagesTs) have no labels.
    Case ``k`` belongs to site ``k % num_sites``. The same parameters give
    byte-identical voxel arrays. Generation happens in a temporary sibling
    folder that is renamed into place, so an interrupted run never leaves a
    half-written dataset.

    Args:
        root: The dataset folder to create.
        num_training: Number of training cases (``phantom_000``, ...).
        num_test: Number of test cases (``phantom_test_000``, ...).
        shape: Voxels along X, Y, Z; ``Z == 1`` gives 2D cases.
        spacing: Voxel size in mm along X, Y, Z.
        num_sites: Number of acquisition sites with different contrast.
        seed: Seed of all randomness.
        num_channels: Image channels per case.

    Returns:
        The dataset's layout, as from :func:`semiseg.data.layout.read_layout`.

    Raises:
        ValueError: On invalid parameters.
        DatasetError: If ``root`` exists, is not empty and is not a phantom
            (it is never overwritten then).
    """
    params = _params(num_training, num_test, shape, spacing, num_sites, seed, num_channels)
    root = Path(root)
    existing = _matching_phantom(root, params)
    if existing is not None:
        return existing
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_phantom(tmp, params)
        _install(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_layout(root)


def phantom_sites(layout: DatasetLayout) -> dict[str, int]:
    """Read each case's site from a phantom's ``dataset.json``.

    Args:
        layout: A phantom dataset.

    Returns:
        Case id to site index, for training and test cases.

    Raises:
        DatasetError: If the dataset is not a phantom.
    """
    meta = _phantom_meta(layout.root)
    if meta is None:
        raise DatasetError.single(layout.root / "dataset.json", f"no {PHANTOM_KEY!r} entry; not a phantom")
    return {str(k): int(v) for k, v in meta["sites"].items()}


# --------------------------------------------------------------------------- parameters / reuse


def _params(
    num_training: int,
    num_test: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    num_sites: int,
    seed: int,
    num_channels: int,
) -> dict[str, Any]:
    shape_list = [int(s) for s in shape]
    spacing_list = [float(s) for s in spacing]
    if len(shape_list) != 3 or min(shape_list[:2]) < 8 or shape_list[2] < 1:
        raise ValueError(f"shape must be (X, Y, Z) with X, Y >= 8 and Z >= 1, got {shape}")
    if len(spacing_list) != 3 or min(spacing_list) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    if num_training < 1 or num_test < 0 or num_sites < 1 or num_channels < 1:
        raise ValueError(
            "need num_training >= 1, num_test >= 0, num_sites >= 1, num_channels >= 1; got "
            f"{num_training}, {num_test}, {num_sites}, {num_channels}"
        )
    return {
        "generator_version": GENERATOR_VERSION,
        "num_training": int(num_training),
        "num_test": int(num_test),
        "shape": shape_list,
        "spacing": spacing_list,
        "num_sites": int(num_sites),
        "seed": int(seed),
        "num_channels": int(num_channels),
    }


def _phantom_meta(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = meta.get(PHANTOM_KEY) if isinstance(meta, dict) else None
    return entry if isinstance(entry, dict) else None


def _matching_phantom(root: Path, params: dict[str, Any]) -> DatasetLayout | None:
    """Return the layout at ``root`` if it is a complete phantom made with ``params``."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    meta = _phantom_meta(root)
    if meta is None:
        raise DatasetError.single(
            root,
            "folder exists and is not a semiseg phantom; refusing to overwrite it "
            "(choose another folder or remove it)",
        )
    if meta.get("params") != params:
        return None
    try:
        layout = read_layout(root)
    except DatasetError:
        return None
    complete = (
        len(layout.labelled_ids) == params["num_training"]
        and not layout.unlabelled_ids
        and len(layout.test) == params["num_test"]
    )
    return layout if complete else None


def _install(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    """Move the generated dataset ``tmp`` to ``root``, replacing a stale phantom.

    When another process installs the same phantom first, its copy is kept (and
    never deleted under the feet of a process already using it).
    """
    if _matching_phantom(root, params) is not None:
        return
    _discard(root)
    try:
        os.rename(tmp, root)
    except OSError:
        if _matching_phantom(root, params) is None:
            raise


def _discard(root: Path) -> None:
    """Remove an empty folder or a stale phantom at ``root`` (renamed away first, then deleted)."""
    try:
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
            return
        trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex}"
        os.rename(root, trash)
    except OSError:
        return  # another process removed or replaced it first
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- writing


def _case_ids(prefix: str, count: int) -> list[str]:
    width = max(3, len(str(max(count - 1, 0))))
    return [f"{prefix}{k:0{width}d}" for k in range(count)]


def _write_phantom(folder: Path, params: dict[str, Any]) -> None:
    shape = tuple(params["shape"])
    spacing = tuple(params["spacing"])
    train_rng, test_rng = np.random.default_rng(params["seed"]).spawn(2)
    sites: dict[str, int] = {}
    for split, rng, ids in (
        ("Tr", train_rng, _case_ids("phantom_", params["num_training"])),
        ("Ts", test_rng, _case_ids("phantom_test_", params["num_test"])),
    ):
        for k, (case_id, case_rng) in enumerate(zip(ids, rng.spawn(len(ids)))):
            site = k % params["num_sites"]
            image, label = render_case(case_rng, shape, site, params["num_channels"])
            write_case(folder, case_id, image, label if split == "Tr" else None, spacing, split=split)
            sites[case_id] = site
    write_dataset_json(
        folder,
        name=f"semiseg_phantom_seed{params['seed']}",
        channel_names=_channel_names(params["num_channels"]),
        labels=LABELS,
        num_training=params["num_training"],
        extra={PHANTOM_KEY: {"params": params, "sites": sites}},
    )


def _channel_names(num_channels: int) -> dict[str, str]:
    return {str(c): "MRI" if c == 0 else f"MRI_{c}" for c in range(num_channels)}


# --------------------------------------------------------------------------- rendering


def render_case(
    rng: np.random.Generator, shape: tuple[int, int, int], site: int, num_channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom case in memory.

    Args:
        rng: The case's random generator (all randomness comes from it).
        shape: Voxels along X, Y, Z.
        site: Acquisition site index (selects contrast, noise, scale, offset).
        num_channels: Image channels.

    Returns:
        ``(image, label)``: float32 ``[C, X, Y, Z]`` and int16 ``[X, Y, Z]``
        with values 0 (background) and 1 (structure).
    """
    grid = _grid(shape)
    body = _body_mask(rng, grid)
    structure = _sample_structure(rng, shape[2] == 1)
    distractors = _sample_distractors(rng, structure, shape[2] == 1)
    structure_fine = _blob_mask(structure, grid)
    distractor_fine = [_blob_mask(d, grid) for d in distractors]
    label = (_pool(structure_fine.astype(np.float32)) >= 0.5).astype(np.int16)
    contrast = SITE_CONTRAST[site % len(SITE_CONTRAST)] + rng.uniform(-0.04, 0.04)
    distractor_contrast = [contrast + rng.normal(0.0, 0.06)]
    distractor_contrast += [rng.uniform(-0.35, 0.5) for _ in distractors[1:]]
    texture = _texture(rng, shape)
    bias = _bias_field(rng, shape)
    channels = []
    for channel in range(num_channels):
        tissue = _tissue(body, structure_fine, distractor_fine, contrast, distractor_contrast, channel)
        channels.append(_acquire(rng, tissue * texture * bias, site))
    return np.stack(channels).astype(np.float32), label


def _grid(shape: tuple[int, int, int]) -> _Grid:
    def axis(n: int) -> np.ndarray:
        return ((np.arange(n) + 0.5) / n * 2.0 - 1.0).astype(np.float32)

    x, y, z = shape
    w = axis(z) if z > 1 else np.zeros(1, dtype=np.float32)
    return _Grid(axis(2 * x)[:, None, None], axis(2 * y)[None, :, None], w[None, None, :])


def _pool(fine: np.ndarray) -> np.ndarray:
    """Average 2x2 in-plane blocks: partial-volume down-sampling."""
    x2, y2, z = fine.shape
    return fine.reshape(x2 // 2, 2, y2 // 2, 2, z).mean(axis=(1, 3))


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * u + s * v, -s * u + c * v


def _body_mask(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    a, b = rng.uniform(0.8, 0.93), rng.uniform(0.78, 0.9)
    taper = 1.0 - rng.uniform(0.0, 0.08) * grid.w**2
    ur, vr = _rotate(grid.u, grid.v, rng.uniform(-0.3, 0.3))
    return (ur / a) ** 2 + (vr / b) ** 2 <= taper**2


def _random_harmonics(rng: np.random.Generator, strength: float) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, rng.uniform(0.0, strength), rng.uniform(0.0, 2 * np.pi)) for k in (2, 3, 4))


def _sample_structure(rng: np.random.Generator, flat: bool) -> _Blob:
    r = np.sqrt(rng.uniform(0.0, 1.0)) * 0.28
    phi = rng.uniform(0.0, 2 * np.pi)
    centre_w = 0.0 if flat else rng.uniform(-0.3, 0.3)
    radii = (rng.uniform(0.2, 0.32), rng.uniform(0.2, 0.32), rng.uniform(0.55, 0.95))
    return _Blob((r * np.cos(phi), r * np.sin(phi), centre_w), radii, rng.uniform(0, np.pi),
                 _random_harmonics(rng, 0.07))


def _sample_distractors(rng: np.random.Generator, structure: _Blob, flat: bool) -> list[_Blob]:
    """One or two small blobs inside the body, kept clear of the structure and of each other."""
    blobs: list[_Blob] = []
    keep_out = [(structure.centre[0], structure.centre[1], max(structure.radii[:2]) * 1.25)]
    for _ in range(int(rng.integers(1, 3))):
        blob = _place_distractor(rng, keep_out, flat)
        if blob is not None:
            blobs.append(blob)
            keep_out.append((blob.centre[0], blob.centre[1], max(blob.radii[:2]) * 1.2))
    return blobs


def _place_distractor(
    rng: np.random.Generator, keep_out: list[tuple[float, float, float]], flat: bool
) -> _Blob | None:
    for _attempt in range(50):
        radius = rng.uniform(0.07, 0.14)
        r, phi = np.sqrt(rng.uniform(0.0, 1.0)) * 0.55, rng.uniform(0.0, 2 * np.pi)
        cu, cv = r * np.cos(phi), r * np.sin(phi)
        if all(np.hypot(cu - ou, cv - ov) > radius * 1.2 + reach + 0.1 for ou, ov, reach in keep_out):
            radii = (radius, radius * rng.uniform(0.7, 1.3), rng.uniform(0.3, 0.8))
            centre_w = 0.0 if flat else rng.uniform(-0.5, 0.5)
            return _Blob((cu, cv, centre_w), radii, rng.uniform(0, np.pi), _random_harmonics(rng, 0.05))
    return None


def _blob_mask(blob: _Blob, grid: _Grid) -> np.ndarray:
    """Boolean mask of a deformed ellipsoid: radius modulated by angular harmonics."""
    pu, pv = _rotate(grid.u - blob.centre[0], grid.v - blob.centre[1], blob.angle)
    pu, pv = pu / blob.radii[0], pv / blob.radii[1]
    pw = (grid.w - blob.centre[2]) / blob.radii[2]
    theta = np.arctan2(pv, pu)
    modulation = 1.0 + sum(a * np.cos(k * theta + phase) for k, a, phase in blob.harmonics)
    return pu**2 + pv**2 + pw**2 <= modulation**2


def _tissue(
    body: np.ndarray,
    structure: np.ndarray,
    distractors: list[np.ndarray],
    contrast: float,
    distractor_contrast: list[float],
    channel: int,
) -> np.ndarray:
    """Noise-free relative intensity at output resolution: body 1, background 0."""
    gain = CHANNEL_STRUCTURE_GAIN[channel % len(CHANNEL_STRUCTURE_GAIN)]
    dgain = CHANNEL_DISTRACTOR_GAIN[channel % len(CHANNEL_DISTRACTOR_GAIN)]
    relative = 1.0 + gain * contrast * structure.astype(np.float32)
    for mask, d in zip(distractors, distractor_contrast):
        relative = relative + dgain * d * (mask & ~structure)
    return _pool((body * relative).astype(np.float32))


def _coarse_axes(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised output-resolution coordinates, broadcastable to ``shape``."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) if n > 1 else np.zeros(1, np.float32) for n in shape)
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _texture(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth multiplicative tissue texture: low-frequency waves plus smoothed noise."""
    u, v, w = (a.ravel() for a in _coarse_axes(shape))
    freq = rng.uniform(-3.0, 3.0, size=(6, 3))
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi, size=(6, 1)))
    eu, ev, ew = (np.exp(1j * np.pi * np.outer(freq[:, i], a)) for i, a in enumerate((u, v, w)))
    waves = np.einsum("kx,ky,kz->xyz", eu, ev, ew * phase).real.astype(np.float32)
    speckle = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (1.5, 1.5, 0.7))
    speckle /= max(float(speckle.std()), 1e-6)
    return 1.0 + 0.025 * waves + 0.03 * speckle


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random quadratic polynomial."""
    u, v, w = _coarse_axes(shape)
    terms = (u, v, w, u * u, v * v, u * v, u * w, v * w)
    coefficients = rng.normal(0.0, 0.12, size=len(terms))
    return np.exp(sum(c * t for c, t in zip(coefficients, terms))).astype(np.float32)


def _acquire(rng: np.random.Generator, signal: np.ndarray, site: int) -> np.ndarray:
    """Apply Rician noise and the site's intensity scale and offset."""
    sigma = SITE_NOISE[site % len(SITE_NOISE)]
    real = signal + rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=signal.shape).astype(np.float32)
    scale = SITE_SCALE[site % len(SITE_SCALE)] * rng.uniform(0.9, 1.1)
    return scale * np.sqrt(real**2 + imag**2) + SITE_OFFSET[site % len(SITE_OFFSET)]
