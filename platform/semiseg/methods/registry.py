"""Registry of methods by name: one file per method in :mod:`semiseg.methods`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from semiseg.methods.base import COMMON_HPARAMS, BuildContext, HParam, Method

_NOT_METHODS = {"base", "registry", "components"}
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a method under ``cls.name`` (its file's name)."""
    module_name = cls.__module__.rsplit(".", 1)[-1]
    if cls.name != module_name:
        raise ValueError(f"method {cls.__name__} is named {cls.name!r} but lives in {module_name}.py; "
                         "a method is registered under its file's name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    import semiseg.methods as package

    for info in pkgutil.iter_modules(package.__path__):
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
    return {**COMMON_HPARAMS, **get_method(name).hparams}


def method_defaults(name: str) -> dict[str, Any]:
    """Default values of a method's hyperparameters."""
    return {key: hp.default for key, hp in method_hparams(name).items()}


def build_method(name: str, context: BuildContext, params: Mapping[str, Any]) -> Method:
    """Instantiate a registered method with its defaults overridden by ``params``.

    Raises:
        KeyError: unknown method.
        ValueError: a parameter the method does not declare.
    """
    cls = get_method(name)
    declared = method_hparams(name)
    unknown = set(params) - set(declared) - {"name"}
    if unknown:
        raise ValueError(f"method {name!r} has no hyperparameter(s) {sorted(unknown)}; "
                         f"it has {sorted(declared)}")
    merged = {**method_defaults(name), **{k: v for k, v in params.items() if k != "name"}}
    return cls(context, merged)
