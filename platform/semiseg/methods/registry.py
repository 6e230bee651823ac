"""Registry of methods by name: one file per method in :mod:`semiseg.methods`."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Mapping

from semiseg.config import ConfigError, ExperimentConfig, check_value, coerce
from semiseg.methods.base import BuildContext, HParam, Method, MethodParams, declared_hparams

_NOT_METHODS = {"base", "registry", "components", "ema_teacher_base", "discriminator_base"}
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a method under ``cls.name`` (its file's name)."""
    module_name = cls.__module__.rsplit(".", 1)[-1]
    if cls.name != module_name:
        raise ValueError(f"method {cls.__name__} is named {cls.name!r} but lives in {module_name}.py; "
                         "a method is registered under its file's name")
    if not issubclass(cls.Params, MethodParams):
        raise TypeError(f"method {cls.name!r}: Params must extend MethodParams")
    declared_hparams(cls.Params)
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_METHODS:
            importlib.import_module(f"semiseg.methods.{info.name}")


def method_names() -> list[str]:
    """Names of all registered methods, sorted."""
    _discover()
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    """Return the method class registered as ``name``.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    _discover()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_hparams(name: str) -> dict[str, HParam]:
    """Declared hyperparameters of a method, including those every method has (``pretrain_epochs``)."""
    return declared_hparams(get_method(name).Params)


def method_defaults(name: str) -> dict[str, Any]:
    """Default values of a method's hyperparameters."""
    return {key: hp.default for key, hp in method_hparams(name).items()}


def method_params(name: str, values: Mapping[str, Any]) -> MethodParams:
    """The typed, checked hyperparameters of method ``name``: its defaults overridden by ``values``.

    Args:
        name: a registered method.
        values: hyperparameter name → value (strings from a command line are converted);
            a ``name`` entry is ignored.

    Raises:
        KeyError: unknown method.
        ConfigError: a hyperparameter the method does not declare, or a value of the wrong
            type, outside its bounds or not one of its choices (naming ``method.<key>``).
    """
    declared = method_hparams(name)
    unknown = sorted(set(values) - set(declared) - {"name"})
    if unknown:
        raise ConfigError(f"method {name!r} has no hyperparameter(s) {unknown}; it has {sorted(declared)}")
    checked: dict[str, Any] = {}
    for key, declaration in declared.items():
        value = coerce(values.get(key, declaration.default), type(declaration.default), f"method.{key}")
        check_value(f"method.{key}", value, declaration.bounds, declaration.choices)
        checked[key] = value
    return get_method(name).Params(**checked)


def build_method(name: str, context: BuildContext, params: Mapping[str, Any] | MethodParams) -> Method:
    """Instantiate a registered method with its checked hyperparameters.

    Args:
        name: a registered method.
        context: what the method builds its networks with.
        params: its typed parameters, or a mapping of overrides of its defaults.

    Raises:
        KeyError: unknown method.
        ConfigError: see :func:`method_params`.
    """
    cls = get_method(name)
    if not isinstance(params, MethodParams):
        params = method_params(name, params)
    elif type(params) is not cls.Params:
        raise ConfigError(f"method {name!r} takes {cls.Params.__name__}, not {type(params).__name__}")
    return cls(context, params)


class RegisteredMethods:
    """The registered methods as a configuration sees them (a :class:`semiseg.config.MethodCatalogue`)."""

    def names(self) -> list[str]:
        """Names of all registered methods, sorted."""
        return method_names()

    def hparams(self, name: str) -> dict[str, HParam]:
        """Declared hyperparameters of method ``name``."""
        return method_hparams(name)


REGISTERED_METHODS = RegisteredMethods()
"""The catalogue of the registered methods that :class:`ExperimentConfig` fills and checks the method section with."""


def experiment_config(flat: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """:meth:`ExperimentConfig.from_flat` with the registered methods: the configuration of dotted keys
    ``flat`` (the defaults when None), the chosen method's declared defaults filled in.

    Raises:
        ConfigError: see :meth:`ExperimentConfig.from_flat`.
    """
    return ExperimentConfig.from_flat(flat or {}, REGISTERED_METHODS)
