"""The contract between a study's runner (:mod:`semiseg.tune`) and the trials it runs (:mod:`semiseg.train`).

A trial receives one flat dict: dotted config keys (``optim.lr``), plus keys the runner adds
for itself, which start with :data:`PRIVATE_PREFIX` (where Ray keeps results, a whole fixed
configuration under :data:`VARIANT_KEY`), and Optuna's derived parameters under
:data:`SEARCH_PREFIX`. A trial writes its state to :data:`CHECKPOINT_FILE` (and the best
epoch's overlay to :data:`OVERLAY_FILE`) in each checkpoint folder, which the runner reads
back to register models. Both sides import these names from here; ``train/`` never imports
``tune/``.
"""

from __future__ import annotations

from typing import Any, Mapping

from semiseg.config import ExperimentConfig
from semiseg.methods.registry import experiment_config

PRIVATE_PREFIX = "_"
"""Keys of a trial's dict that are the runner's, not configuration."""
VARIANT_KEY = "_variant"
"""A fixed phase grids over whole configurations, each stored under this key."""
STORAGE_KEY = "_storage_path"
"""Where Ray keeps a study's results and checkpoints (a DDP trial's Train run stores there too)."""
DATASET_KEY = "_dataset"
"""The dataset the driver resolved, validated and preprocessed once: its cache folder and key
(:func:`semiseg.data.source.dataset_handover`); a trial opens that cache instead of scanning and
fingerprinting the dataset again (:func:`semiseg.data.source.configured_split`)."""
SEARCH_PREFIX = "search"
"""Optuna parameters that are not config keys (e.g. ``search/1-method.ema_decay``)."""
CHECKPOINT_FILE = "state.pt"
"""The trial state in each checkpoint folder (weights, optimisers, loop state, model spec)."""
OVERLAY_FILE = "overlay.png"
"""The best epoch's prediction overlay in each checkpoint folder."""


def expand_trial_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's flat dotted-key config: a fixed variant (:data:`VARIANT_KEY`) merged in.

    Fixed phases grid over whole configurations stored under the variant key; searched
    trials carry their keys at the top level.
    """
    flat = dict(config)
    flat.update(flat.pop(VARIANT_KEY, None) or {})
    return flat


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration keys of ``config``, without the runner's private keys and Optuna's own."""
    return {key: value for key, value in config.items()
            if not key.startswith(PRIVATE_PREFIX) and key != SEARCH_PREFIX and not key.startswith(f"{SEARCH_PREFIX}/")}


def config_from_trial(config: Mapping[str, Any]) -> ExperimentConfig:
    """The typed configuration of a trial's dict (variant expanded, private keys ignored).

    Raises:
        ConfigError: a key or value the configuration refuses.
    """
    return experiment_config(public_config(expand_trial_config(config)))
