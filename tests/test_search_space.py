"""The search-space protocol: the library's spaces implement it, a plain function is refused before Ray."""

import pytest

from semiseg.config import ConfigError
from semiseg.tune import Study
from semiseg.tune.checks import check_searches
from semiseg.tune.cli import parse_args
from semiseg.tune.configs import searches
from semiseg.tune.space import MethodChoiceSpace, SearchSpace, method_space


def _plain_space(trial):
    trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)


def test_the_library_spaces_are_search_spaces():
    single = method_space("mean_teacher", ["ema_decay"])
    choice = MethodChoiceSpace({"mean_teacher": ["ema_decay"], "supervised": []})
    assert isinstance(single, SearchSpace) and isinstance(choice, SearchSpace)
    assert (single.chooses_method, dict(single.methods)) == (False, {"mean_teacher": ["ema_decay"]})
    assert (choice.chooses_method, list(choice.methods)) == (True, ["mean_teacher", "supervised"])
    assert choice.keys == ["method.name", "method.ema_decay"] and choice.default_point() == {}


def test_a_method_choosing_space_searches_over_a_base_without_method_keys():
    study = Study(name="s", description="", search_space=MethodChoiceSpace({"mean_teacher": ["ema_decay"]}))
    (search,) = searches(study, {"method.name": "supervised", "method.x": 1, "optim.lr": 0.1})
    assert (search.phase, search.base) == ("search", {"optim.lr": 0.1})


def test_a_plain_function_is_refused_with_what_a_space_needs():
    study = Study(name="s", description="", search_space=_plain_space)
    with pytest.raises(ConfigError, match=r"study s: search_space must be a semiseg.tune.space.SearchSpace .*"
                                          r"default_point\(\).* got function '_plain_space'"):
        check_searches(study, parse_args("s", "", []))
