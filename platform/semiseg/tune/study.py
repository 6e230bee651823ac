"""The declarative description of a study."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

SearchSpace = Callable[[Any], "Mapping[str, Any] | None"]


@dataclass(frozen=True)
class Study:
    """A study: base configuration, search space, budget and reference baselines.

    Attributes:
        name: experiment name in MLflow and folder name under the runs folder.
        description: one line printed at the start.
        base: dotted-key overrides of the defaults shared by every trial.
        search_space: Optuna define-by-run function ``(trial) -> constants``; it suggests
            dotted keys (``trial.suggest_float("optim.lr", ...)``) and may return derived
            constants (e.g. ``method.ema_decay = 1 - complement``).
        baselines: fixed overrides run once each (e.g. the supervised baseline on the same
            labelled cases), compared with the best searched trial at the end.
        metric, mode: what Tune, ASHA and Optuna optimise.
        num_samples: searched trials by default.
        max_epochs: epochs per trial by default.
        grace_period: epochs before ASHA may stop a trial.
        reduction_factor: ASHA's η.
        startup_trials: random trials before TPE models the space.
        baseline_seeds: seeds per baseline configuration.
        smoke: config overrides applied with ``--smoke`` (a minutes-long check of the path).
        smoke_num_samples: searched trials with ``--smoke``.
        smoke_baseline_seeds: seeds per baseline with ``--smoke``.
    """

    name: str
    description: str
    base: Mapping[str, Any] = field(default_factory=dict)
    search_space: SearchSpace | None = None
    baselines: tuple[Mapping[str, Any], ...] = ()
    metric: str = "val/dice"
    mode: str = "max"
    num_samples: int = 12
    max_epochs: int = 30
    grace_period: int = 5
    reduction_factor: int = 3
    startup_trials: int = 4
    baseline_seeds: int = 2
    smoke: Mapping[str, Any] = field(default_factory=dict)
    smoke_num_samples: int = 2
    smoke_baseline_seeds: int = 1
