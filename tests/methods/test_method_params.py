"""Every method's hyperparameters: a frozen dataclass of declared fields, checked once, received typed.

Driven by the registry: a new method's declarations are checked here without new test code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from semiseg.config import ConfigError
from semiseg.methods import MethodParams, build_method, get_method, method_names, method_params
from semiseg.methods.base import HPARAM_METADATA, declared_hparams, hparam
from semiseg.methods.registry import method_hparams

NAMES = method_names()


@pytest.mark.parametrize("name", NAMES)
def test_params_are_a_frozen_dataclass_whose_fields_are_all_declared(name):
    params_type = get_method(name).Params
    assert issubclass(params_type, MethodParams) and dataclasses.is_dataclass(params_type)
    assert params_type.__dataclass_params__.frozen
    fields = dataclasses.fields(params_type)
    assert "pretrain_epochs" in {f.name for f in fields}, "every method can pretrain"
    assert all(HPARAM_METADATA in f.metadata for f in fields)
    assert list(method_hparams(name)) == [f.name for f in fields]


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_search_ranges_lie_inside_the_declared_values(name):
    for key, declared in method_hparams(name).items():
        if declared.choices is not None:
            assert declared.default in declared.choices, f"{name}.{key}"
            continue
        if isinstance(declared.default, str):
            continue
        if declared.bounds is not None:
            assert declared.bounds.contains(declared.default), f"{name}.{key}"
        if declared.searchable:
            assert declared.low < declared.high, f"{name}.{key}"
            if declared.bounds is not None:
                assert declared.bounds.contains(declared.low) and declared.bounds.contains(declared.high)
            if declared.complement:
                assert 0.0 < declared.low < declared.high < 1.0


@pytest.mark.parametrize("name", NAMES)
def test_the_method_receives_its_typed_parameters(name, tiny_context):
    method = build_method(name, tiny_context(num_classes=3), {"pretrain_epochs": "2"})
    assert type(method.params) is get_method(name).Params
    assert method.params.pretrain_epochs == 2 and isinstance(method.params.pretrain_epochs, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.params.pretrain_epochs = 3
    assert method_params(name, {}) == get_method(name).Params()


@pytest.mark.parametrize("name", NAMES)
def test_every_bounded_hyperparameter_refuses_a_value_outside_its_bounds(name):
    bounded = {key: d for key, d in method_hparams(name).items() if d.bounds is not None and d.choices is None}
    for key, declared in bounded.items():
        below = declared.bounds.low - 1 if declared.bounds.low is not None else None
        above = declared.bounds.high + 1 if declared.bounds.high is not None else None
        for value in (v for v in (below, above, math.nan) if v is not None):
            value = int(value) if isinstance(declared.default, int) and not math.isnan(value) else value
            if isinstance(declared.default, int) and isinstance(value, float):
                continue
            with pytest.raises(ConfigError, match=rf"method\.{key} = .* is not allowed: it must be"):
                method_params(name, {key: value})


@pytest.mark.parametrize("name,key", [(n, k) for n in NAMES for k, d in method_hparams(n).items()
                                      if d.choices is not None])
def test_every_choice_refuses_a_value_outside_its_choices(name, key):
    with pytest.raises(ConfigError, match=rf"method\.{key} = 'bogus' is not allowed"):
        method_params(name, {key: "bogus"})
    allowed = method_hparams(name)[key].choices
    for value in allowed:
        assert getattr(method_params(name, {key: str(value).lower()}), key) == value


def test_unknown_hyperparameters_and_wrong_types_are_refused_with_the_key(tiny_context):
    with pytest.raises(ConfigError, match=r"no hyperparameter\(s\) \['ema_decy'\]"):
        method_params("mean_teacher", {"ema_decy": 0.9})
    with pytest.raises(ConfigError, match=r"method\.mc_passes = 'eight' is not allowed: it must be an integer"):
        method_params("ua_mean_teacher", {"mc_passes": "eight"})
    with pytest.raises(ConfigError, match=r"method\.mc_passes = 2\.5 .*integer"):
        method_params("ua_mean_teacher", {"mc_passes": 2.5})
    with pytest.raises(ConfigError, match="takes MeanTeacherParams"):
        build_method("mean_teacher", tiny_context(num_classes=3), method_params("supervised", {}))


def test_a_declaration_that_breaks_its_own_bounds_or_type_fails_where_it_is_written():
    from semiseg.config import UNIT_OPEN

    with pytest.raises(ConfigError, match="default = 1.5 is not allowed"):
        hparam(1.5, bounds=UNIT_OPEN)
    with pytest.raises(ConfigError, match="search range end = 2.0 is not allowed"):
        hparam(0.5, low=0.1, high=2.0, bounds=UNIT_OPEN)

    @dataclasses.dataclass(frozen=True)
    class WrongType(MethodParams):
        steps: int = hparam(1.5)

    with pytest.raises(TypeError, match="default 1.5 is not int"):
        declared_hparams(WrongType)
