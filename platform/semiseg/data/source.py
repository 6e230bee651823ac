"""Resolve ``data.dataset`` to a dataset folder (the generated phantom or a user path), and
prepare the configured split of it, once per study.

**Resolved once, on the study driver.** The driver resolves the dataset, validates it,
fingerprints it and builds (or reuses) its preprocessed cache (:func:`prepare_cache`), then
hands that cache to every trial (:func:`dataset_handover`, under the trial-config key
:data:`semiseg.train.contract.DATASET_KEY`). A trial given a handover opens the cache
directly (:func:`configured_split`): it neither lists nor fingerprints the dataset again, so
files changed during a study are not seen by its trials. It falls back to resolving (and
building the cache, as a trial run on its own does) when the handover is absent, was made
for other data settings (a searched ``data.*`` key), or its cache is not at that path any
more or holds another key (deleted, or a node that does not share the cache folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from semiseg.config import DataConfig, parse_shape, parse_spacing
from semiseg.data.cache import CachedDataset, CacheInfo, build_cache, printed_progress
from semiseg.data.dataset import DatasetLayout
from semiseg.data.errors import DatasetError
from semiseg.data.formats import read_dataset
from semiseg.data.phantom import generate_phantom
from semiseg.data.prepared import PreparedData, prepare_cached_split, prepare_split
from semiseg.data.preprocess import PreprocessSettings

PHANTOM = "phantom"
log = logging.getLogger(__name__)


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
    """Build (or reuse) the preprocessed cache of ``layout``, printing progress on stdout (a study's
    stderr holds only what needs attention)."""
    return build_cache(layout, preprocess_settings(data), prepared_cache_root(data),
                       progress=printed_progress(stream=sys.stdout))


def dataset_handover(data: DataConfig, info: CacheInfo) -> dict[str, str]:
    """What the study driver hands its trials about a dataset it resolved and prepared.

    Args:
        data: The data settings the cache was prepared with.
        info: The cache :func:`prepare_cache` built or reused for them.

    Returns:
        ``{"cache": folder, "key": cache key, "source": digest of the data settings}``:
        plain strings, so the trial config stays JSON-ready.
    """
    return {"cache": str(info.path), "key": info.key, "source": _source_digest(data)}


def open_handover(data: DataConfig, handover: Mapping[str, Any] | None) -> CachedDataset | None:
    """The cache of a handover, when it fits ``data`` and is still complete at its path.

    Args:
        data: The trial's data settings.
        handover: From :func:`dataset_handover`, or None outside a study.

    Returns:
        The cache; None when there is no handover, it was made for other data settings, or
        its folder holds no complete cache of its key (then the caller resolves the dataset).
    """
    if not handover or handover.get("source") != _source_digest(data):
        return None
    try:
        dataset = CachedDataset(handover["cache"])
    except DatasetError as error:
        log.info("the study's prepared dataset is not usable here (%s); resolving the dataset again", error)
        return None
    if dataset.manifest.get("key") != handover.get("key"):
        log.info("the study's prepared dataset %s holds another cache key; resolving the dataset again",
                 handover["cache"])
        return None
    return dataset


def configured_split(data: DataConfig, handover: Mapping[str, Any] | None = None) -> PreparedData:
    """The configured split of the configured dataset, preprocessed, for a trial.

    From the cache the study driver handed over when :func:`open_handover` accepts it;
    otherwise the dataset is resolved and fingerprinted and its cache built or reused
    (:func:`resolve_dataset`, :func:`~semiseg.data.prepared.prepare_split`).

    Args:
        data: The trial's data settings.
        handover: The driver's :func:`dataset_handover`, or None (a trial run on its own).

    Returns:
        The prepared split.

    Raises:
        DatasetError: the dataset or a split budget cannot be used.
        ConfigError: malformed preprocessing settings.
    """
    split = {"num_labelled": data.num_labelled, "num_validation": data.num_validation,
             "num_test": data.num_test, "split_seed": data.split_seed, "loader": data.loader,
             "memory_budget_mb": data.memory_budget_mb, "stream_buffer_rows": data.stream_buffer_rows,
             "split_index": data.split, "splits_file": data.splits_file}
    dataset = open_handover(data, handover)
    if dataset is not None:
        return prepare_cached_split(dataset, **split)
    return prepare_split(resolve_dataset(data), dims=data.dims, settings=preprocess_settings(data),
                         cache_root=prepared_cache_root(data), **split)


def _source_digest(data: DataConfig) -> str:
    """Digest of what picks a dataset's cache: the dataset (or phantom), the extra unlabelled
    folder, the cache folder and the preprocessing settings (``data.dims`` among them)."""
    source = {"dataset": data.dataset, "extra_unlabelled": data.extra_unlabelled,
              "phantom": [data.phantom_root, data.phantom_cases, data.phantom_shape, data.phantom_spacing,
                          data.phantom_seed],
              "cache_root": str(prepared_cache_root(data)), "settings": preprocess_settings(data).to_dict()}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
