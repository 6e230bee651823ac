"""The declarative description of a study."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from semiseg.config import ConfigError

if TYPE_CHECKING:  # the spaces import the methods (and torch); a study script stays light
    from semiseg.tune.space import SearchSpace


@dataclass(frozen=True)
class Study:
    """A study: base configuration, searches, baselines, final re-runs and budget.

    Attributes:
        name: experiment name in MLflow and folder name under the runs folder.
        description: one line printed at the start.
        base: dotted-key overrides of the defaults shared by every trial.
        search_space: a :class:`semiseg.tune.space.SearchSpace` (e.g. a ``MethodSpace`` or a
            ``MethodChoiceSpace``) for one search over ``base``: an Optuna define-by-run space
            that suggests dotted keys and may return derived constants (e.g.
            ``method.ema_decay = 1 - complement``). A plain function is refused before Ray
            starts: the runner needs the space's keys and seed point.
        methods: method name → names to search (method hyperparameters like ``ema_decay``
            or config keys like ``optim.lr``); one search per method with the same trial
            budget (a method with no names runs at its defaults only, in the final phase).
        ranges: name → (low, high) replacing the declared search range of a searched name
            in every search that names it (``--range`` on the command line overrides it).
        baselines: fixed overrides (e.g. the supervised model on the same labelled cases),
            run in the final phase with the same seeds as the searched winners.
        baseline_methods: methods run at their defaults in the final phase, each with every
            one of ``baseline_variants`` (a grid of baselines, e.g. every method at every
            labelled budget); ``--methods`` replaces them with any registered methods.
        baseline_variants: overrides each of ``baseline_methods`` runs with (none: once each).
        final_seeds: seeds of the final phase; the top ``final_top_k`` configurations of each
            search are re-run with each seed next to the baselines (0: only the baselines,
            once), so results are reported as mean (std), not as one lucky trial. The seeds
            are fresh ones, after the search's (``--seed`` + 1 onwards; see
            :func:`semiseg.tune.phases.final_phase_seeds`).
        final_top_k: configurations of each search re-run in the final phase.
        group_by: config keys that, with the method, group the final table (e.g.
            ``data.num_labelled`` for label-efficiency curves).
        seed_with_defaults: the first trial of each search runs the papers' defaults
            (Optuna then models the space around a known-good point).
        metric, mode: what Tune, ASHA and Optuna optimise.
        num_samples: searched trials (per search) by default.
        grace_period: epochs before ASHA may stop a trial.
        reduction_factor: ASHA's η.
        startup_trials: random trials before TPE models the space.
        smoke: config overrides applied with ``--smoke`` (a minutes-long check of the path).
        smoke_num_samples: searched trials with ``--smoke``.
        smoke_final_seeds: final seeds with ``--smoke``.
        smoke_baselines: baselines with ``--smoke`` (default: ``baselines``).
        smoke_baseline_methods, smoke_baseline_variants: the grid with ``--smoke`` (default: the
            study's).
    """

    name: str
    description: str
    base: Mapping[str, Any] = field(default_factory=dict)
    search_space: SearchSpace | None = None
    methods: Mapping[str, Sequence[str]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    baselines: tuple[Mapping[str, Any], ...] = ()
    baseline_methods: tuple[str, ...] = ()
    baseline_variants: tuple[Mapping[str, Any], ...] = ()
    final_seeds: int = 0
    final_top_k: int = 1
    group_by: tuple[str, ...] = ()
    seed_with_defaults: bool = True
    metric: str = "val/dice"
    mode: str = "max"
    num_samples: int = 12
    grace_period: int = 5
    reduction_factor: int = 3
    startup_trials: int = 4
    smoke: Mapping[str, Any] = field(default_factory=dict)
    smoke_num_samples: int = 2
    smoke_final_seeds: int = 1
    smoke_baselines: tuple[Mapping[str, Any], ...] | None = None
    smoke_baseline_methods: tuple[str, ...] | None = None
    smoke_baseline_variants: tuple[Mapping[str, Any], ...] | None = None

    def restricted_to(self, names: Sequence[str]) -> "Study":
        """This study with only the methods ``names`` (its baselines kept); for a study whose
        baselines are a grid (``baseline_methods``), the grid's methods become ``names``, which
        may be any registered methods (names are checked with the configurations, before Ray).

        Raises:
            ConfigError: a name that is not one of the study's methods, or a study that
                searches one method without a ``methods`` table.
        """
        if not names:
            return self
        if not self.methods and self.baseline_methods:
            chosen = tuple(names)
            return replace(self, baseline_methods=chosen,
                           smoke_baseline_methods=None if self.smoke_baseline_methods is None else chosen)
        if not self.methods:
            raise ConfigError(f"--methods: study {self.name!r} has no method table to choose from")
        unknown = [name for name in names if name not in self.methods]
        if unknown:
            raise ConfigError(f"--methods: {', '.join(unknown)} not in study {self.name!r} "
                              f"(its methods: {', '.join(self.methods)})")
        return replace(self, methods={name: self.methods[name] for name in self.methods if name in names})
