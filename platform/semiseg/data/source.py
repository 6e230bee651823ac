"""Resolve ``data.dataset`` to a dataset folder: the generated phantom or a user path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from semiseg.config import DataConfig, parse_shape, parse_spacing
from semiseg.data.errors import DatasetError
from semiseg.data.cache import CacheInfo, build_cache, stderr_progress
from semiseg.data.layout import DatasetLayout, read_dataset
from semiseg.data.preprocess import PreprocessSettings
from semiseg.data.phantom import generate_phantom

PHANTOM = "phantom"


def default_cache_dir() -> Path:
    """``$SEMISEG_CACHE`` or ``~/.cache/semiseg``."""
    return Path(os.environ.get("SEMISEG_CACHE", Path.home() / ".cache" / "semiseg"))


def phantom_key(data: DataConfig) -> str:
    """Short hash of the phantom's generation settings (its folder name)."""
    settings = {"cases": data.phantom_cases, "shape": data.phantom_shape,
                "spacing": data.phantom_spacing, "seed": data.phantom_seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def resolve_dataset(data: DataConfig) -> DatasetLayout:
    """Return the layout of the configured dataset, generating the phantom if needed.

    The phantom is generated deterministically from its settings, atomically, into
    ``data.phantom_root`` (or the cache folder); every node of a cluster can generate
    the same one, so no dataset has to be shipped with a job.

    Raises:
        DatasetError: the folder is missing or not a dataset in the nnU-Net v2 raw layout or
            the Medical Segmentation Decathlon layout.
    """
    if data.dataset != PHANTOM:
        extra = Path(data.extra_unlabelled).expanduser().resolve() if data.extra_unlabelled else None
        return read_dataset(Path(data.dataset).expanduser().resolve(), extra)
    root = Path(data.phantom_root) if data.phantom_root else default_cache_dir() / f"phantom-{phantom_key(data)}"
    shape = parse_shape(data.phantom_shape, "data.phantom_shape")
    spacing = parse_spacing(data.phantom_spacing, "data.phantom_spacing")
    if len(shape) != 3 or len(spacing) != 3:
        raise DatasetError.single("data.phantom_shape", "phantom shape and spacing need three axes (X, Y, Z)")
    return generate_phantom(root, num_training=data.phantom_cases, shape=shape, spacing=spacing,
                            seed=data.phantom_seed)


def preprocess_settings(data: DataConfig) -> PreprocessSettings:
    """The preprocessing settings of ``data`` (``data.target_spacing`` and the like).

    Raises:
        ConfigError: a malformed spacing or CT window.
    """
    from semiseg.config import ConfigError

    spacing = parse_spacing(data.target_spacing, "data.target_spacing") if data.target_spacing else None
    try:
        window = tuple(float(v) for v in data.ct_window.split(","))
    except ValueError:
        raise ConfigError(f"data.ct_window: {data.ct_window!r} is not 'lo,hi'") from None
    try:
        return PreprocessSettings(target_spacing=spacing, normalisation=data.normalisation, ct_window=window,
                                  crop_to_body=data.crop_to_body, dims=data.dims, image_order=data.image_order)
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None


def prepared_cache_root(data: DataConfig) -> Path:
    """Where preprocessed Parquet caches live (``data.prepared_cache`` or the cache folder)."""
    return Path(data.prepared_cache).expanduser() if data.prepared_cache else default_cache_dir() / "prepared"


def prepare_cache(data: DataConfig, layout: DatasetLayout) -> CacheInfo:
    """Build (or reuse) the preprocessed cache of ``layout``, showing progress on stderr."""
    return build_cache(layout, preprocess_settings(data), prepared_cache_root(data), progress=stderr_progress())
