"""Resolve ``data.dataset`` to a dataset folder: the generated phantom or a user path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from semiseg.config import DataConfig, parse_shape, parse_spacing
from semiseg.data.errors import DatasetError
from semiseg.data.layout import DatasetLayout, read_layout
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
        DatasetError: the folder is missing or not a dataset in the nnU-Net raw layout.
    """
    if data.dataset != PHANTOM:
        return read_layout(Path(data.dataset).expanduser().resolve())
    root = Path(data.phantom_root) if data.phantom_root else default_cache_dir() / f"phantom-{phantom_key(data)}"
    shape = parse_shape(data.phantom_shape, "data.phantom_shape")
    spacing = parse_spacing(data.phantom_spacing, "data.phantom_spacing")
    if len(shape) != 3 or len(spacing) != 3:
        raise DatasetError.single("data.phantom_shape", "phantom shape and spacing need three axes (X, Y, Z)")
    return generate_phantom(root, num_training=data.phantom_cases, shape=shape, spacing=spacing,
                            seed=data.phantom_seed)
