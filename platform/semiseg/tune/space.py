"""Optuna search spaces built from the hyperparameters that methods declare."""

from __future__ import annotations

from typing import Any, Iterable

from semiseg.methods.base import HParam
from semiseg.methods.registry import method_hparams

SEARCH_PREFIX = "search"


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


class MethodSpace:
    """A define-by-run space over some of a method's declared hyperparameters.

    A class rather than a closure, so that Tune can pickle the searcher's state into its
    experiment checkpoint (``--resume``).

    Args:
        method: registered method name.
        keys: hyperparameter names (without ``method.``).

    Raises:
        KeyError: a key the method does not declare.
    """

    def __init__(self, method: str, keys: Iterable[str]) -> None:
        declared = method_hparams(method)
        self.method = method
        self.keys = list(keys)
        missing = [k for k in self.keys if k not in declared]
        if missing:
            raise KeyError(f"method {method!r} declares no {missing}; it has {sorted(declared)}")

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Suggest every key; return the derived constants."""
        declared = method_hparams(self.method)
        constants: dict[str, Any] = {}
        for key in self.keys:
            constants.update(suggest(trial, f"method.{key}", declared[key]))
        return constants


def method_space(method: str, keys: Iterable[str]) -> MethodSpace:
    """A picklable define-by-run space over ``keys`` of ``method`` (see :class:`MethodSpace`)."""
    return MethodSpace(method, keys)
