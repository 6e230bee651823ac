"""Optuna search spaces built from declared hyperparameters.

A space searches dotted config keys. Method hyperparameters take their ranges from the
method's declaration (its paper's defaults and ranges); the shared training keys that
studies search (learning rate, ramp-up length, weight decay) take theirs from
:data:`CONFIG_RANGES`. Spaces are classes, not closures, so that Tune can pickle the
searcher's state into its experiment checkpoint (``--resume``). Every space implements
:class:`SearchSpace`, the interface the runner uses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from semiseg.config import SETTING_BOUNDS, ConfigError, check_value
from semiseg.train.contract import SEARCH_PREFIX
from semiseg.methods.base import HParam
from semiseg.methods.registry import method_hparams

CONFIG_RANGES: dict[str, HParam] = {
    "optim.lr": HParam(2e-3, low=1e-4, high=1e-2, log=True, bounds=SETTING_BOUNDS["optim.lr"],
                       help="learning rate (Perone: 6e-4)"),
    "optim.weight_decay": HParam(1e-4, low=1e-6, high=1e-2, log=True, bounds=SETTING_BOUNDS["optim.weight_decay"],
                                 help="L2 / decoupled weight decay"),
    "schedule.rampup_epochs": HParam(10.0, low=0.0, high=30.0, bounds=SETTING_BOUNDS["schedule.rampup_epochs"],
                                     help="epochs of the sigmoid ramp-up of the unsupervised weight"),
}


@runtime_checkable
class SearchSpace(Protocol):
    """What a study searches: an Optuna define-by-run space over dotted config keys.

    A space must be picklable (a class instance, not a closure): Tune pickles the searcher,
    and so its space, into the experiment checkpoint of a study that can resume.

    Attributes:
        keys: the dotted config keys it suggests (columns of the progress lines and tables).
        chooses_method: whether it searches ``method.name`` itself; the base configuration
            of its trials then has no ``method.*`` keys.
        methods: method name → the names searched when that method trains (one entry for
            a space of one method).
    """

    keys: list[str]
    chooses_method: bool

    @property
    def methods(self) -> Mapping[str, Sequence[str]]:
        """Method name → the names searched when that method trains."""

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Suggest every key on ``trial`` (an ``optuna.Trial``); return the derived constants."""

    def default_point(self) -> dict[str, Any]:
        """Optuna parameters of a known-good first trial ({} when there is none)."""


def complement_name(key: str) -> str:
    """Optuna parameter name of a hyperparameter searched as ``1 - value`` on a log scale."""
    return f"{SEARCH_PREFIX}/1-{key}"


def suggest(trial: Any, key: str, hparam: HParam) -> dict[str, Any]:
    """Suggest one hyperparameter from its declared range.

    Args:
        trial: an ``optuna.Trial``.
        key: dotted config key, used as the Optuna parameter name.
        hparam: the declaration with the range.

    Returns:
        Derived constants to merge into the config (for complement-searched keys), else {}.

    Raises:
        ValueError: the hyperparameter has no search range.
    """
    if not hparam.searchable:
        raise ValueError(f"{key} has no default search range; give one in the study")
    if hparam.choices is not None:
        trial.suggest_categorical(key, list(hparam.choices))
        return {}
    if hparam.complement:
        complement = trial.suggest_float(complement_name(key), 1.0 - float(hparam.high),
                                         1.0 - float(hparam.low), log=True)
        return {key: 1.0 - complement}
    if isinstance(hparam.default, int) and not isinstance(hparam.default, bool):
        trial.suggest_int(key, int(hparam.low), int(hparam.high), log=hparam.log)
    else:
        trial.suggest_float(key, float(hparam.low), float(hparam.high), log=hparam.log)
    return {}


def optuna_params(key: str, hparam: HParam, value: Any) -> dict[str, Any]:
    """The Optuna parameters that make a trial suggest ``value`` for ``key`` (for seed points)."""
    if hparam.complement:
        return {complement_name(key): 1.0 - float(value)}
    return {key: value}


def resolve(method: str, names: Iterable[str], ranges: Mapping[str, tuple[float, float]] | None = None
            ) -> dict[str, HParam]:
    """Dotted keys and declarations of ``names`` for ``method``.

    A name without a dot is one of the method's hyperparameters (``ema_decay``); a dotted
    name is a config key with a range in :data:`CONFIG_RANGES` (``optim.lr``). ``ranges``
    (name → (low, high)) replaces the declared range of the names it lists.

    Raises:
        KeyError: a name the method does not declare, or a config key without a range.
        ConfigError: a replacement range the hyperparameter cannot take (see :func:`with_range`).
    """
    declared = method_hparams(method)
    ranges = ranges or {}
    resolved: dict[str, HParam] = {}
    for name in names:
        if "." in name:
            if name not in CONFIG_RANGES:
                raise KeyError(f"no default range for {name!r}; searchable config keys: {sorted(CONFIG_RANGES)}")
            key, hparam = name, CONFIG_RANGES[name]
        elif name in declared:
            key, hparam = f"method.{name}", declared[name]
        else:
            raise KeyError(f"method {method!r} declares no {name!r}; it has {sorted(declared)}")
        resolved[key] = with_range(name, hparam, ranges[name]) if name in ranges else hparam
    return resolved


def with_range(name: str, hparam: HParam, bounds: tuple[float, float]) -> HParam:
    """``hparam`` searched over ``bounds`` instead of its declared range.

    Raises:
        ConfigError: a categorical hyperparameter, ``low >= high``, a non-positive bound on
            a log scale, a complement-searched bound outside (0, 1), or a bound outside the
            values the hyperparameter may take at all (its declared bounds).
    """
    low, high = float(bounds[0]), float(bounds[1])
    if hparam.choices is not None:
        raise ConfigError(f"range for {name}: it is categorical ({list(hparam.choices)}), not a range")
    if not low < high:
        raise ConfigError(f"range for {name}: low {low:g} must be below high {high:g}")
    if hparam.complement and not 0.0 < low < high < 1.0:
        raise ConfigError(f"range for {name}: both bounds must lie in (0, 1) (it is searched as 1 - value on a "
                          f"log scale), got {low:g}:{high:g}")
    if hparam.log and low <= 0.0:
        raise ConfigError(f"range for {name}: it is searched on a log scale, so low must be > 0, got {low:g}")
    for end in (low, high):
        check_value(f"range for {name}: bound", end, hparam.bounds)
    return replace(hparam, low=low, high=high)


class MethodSpace:
    """A define-by-run space over some hyperparameters of one method (a :class:`SearchSpace`).

    Args:
        method: registered method name.
        names: method hyperparameter names (``ema_decay``) or dotted config keys (``optim.lr``).
        ranges: name → (low, high) replacing declared ranges (e.g. a study's narrower EMA decays).

    Raises:
        KeyError, ConfigError: see :func:`resolve`.
    """

    chooses_method = False

    def __init__(self, method: str, names: Iterable[str], ranges: Mapping[str, tuple[float, float]] | None = None
                 ) -> None:
        self.method = method
        self.names = list(names)
        self.ranges = {name: (float(low), float(high)) for name, (low, high) in (ranges or {}).items()
                       if name in self.names}
        self.keys = list(resolve(method, self.names, self.ranges))

    @property
    def methods(self) -> dict[str, list[str]]:
        """The one method and its searched names."""
        return {self.method: list(self.names)}

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Suggest every key; return the derived constants."""
        constants: dict[str, Any] = {}
        for key, hparam in resolve(self.method, self.names, self.ranges).items():
            constants.update(suggest(trial, key, hparam))
        return constants

    def default_point(self) -> dict[str, Any]:
        """Optuna parameters of the papers' defaults (a known-good first trial).

        Raises:
            ConfigError: a default outside a replaced range (widen the range, or do not seed
                the search with the defaults).
        """
        point: dict[str, Any] = {}
        for key, hparam in resolve(self.method, self.names, self.ranges).items():
            numeric = hparam.choices is None and isinstance(hparam.default, (int, float))
            if numeric and not hparam.low <= float(hparam.default) <= hparam.high:
                raise ConfigError(f"the default {key} = {hparam.default} lies outside the searched range "
                                  f"{hparam.low:g}:{hparam.high:g}; widen the range or set seed_with_defaults=False")
            point.update(optuna_params(key, hparam, hparam.default))
        return point


class MethodChoiceSpace:
    """A conditional space: the method is searched, and each method's own keys only when chosen
    (a :class:`SearchSpace`).

    Args:
        methods: method name → names to search when that method is chosen.
    """

    chooses_method = True

    def __init__(self, methods: Mapping[str, Sequence[str]]) -> None:
        self.methods = {name: list(names) for name, names in methods.items()}
        self.keys = ["method.name"] + sorted({key for name, names in self.methods.items()
                                              for key in resolve(name, names)})

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Suggest the method, then its keys."""
        method = trial.suggest_categorical("method.name", list(self.methods))
        constants: dict[str, Any] = {}
        for key, hparam in resolve(method, self.methods[method]).items():
            constants.update(suggest(trial, key, hparam))
        return constants

    def default_point(self) -> dict[str, Any]:
        """No single known-good point across methods."""
        return {}


def method_space(method: str, names: Iterable[str], ranges: Mapping[str, tuple[float, float]] | None = None
                 ) -> MethodSpace:
    """A picklable define-by-run space over ``names`` of ``method`` (see :class:`MethodSpace`)."""
    return MethodSpace(method, names, ranges)
