"""Study-level search ranges: a study (or ``--range``) narrows a declared range, checked before Ray starts."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from semiseg.config import ConfigError
from semiseg.tune import Study
from semiseg.tune.cli import parse_args, parse_range
from semiseg.tune.checks import check_searches, search_ranges
from semiseg.tune.space import complement_name, method_space, resolve

REPO = Path(__file__).resolve().parents[1]


def test_a_replaced_range_bounds_every_suggestion():
    space = method_space("mean_teacher", ["ema_decay", "optim.lr"], {"ema_decay": (0.9, 0.995)})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    decays = []
    for _ in range(200):
        trial = study.ask()
        decays.append(space(trial)["method.ema_decay"])
        study.tell(trial, 0.0)
    assert 0.9 <= min(decays) and max(decays) <= 0.995
    assert max(decays) > 0.99, "the range is searched up to its top, not only the declared default"
    distribution = study.trials[0].distributions[complement_name("method.ema_decay")]
    assert distribution.log and distribution.low == pytest.approx(0.005) and distribution.high == pytest.approx(0.1)
    lr = study.trials[0].distributions["optim.lr"]
    assert (lr.low, lr.high) == (1e-4, 1e-2), "names without a replaced range keep the declared one"


def test_ranges_for_other_names_are_ignored_by_a_space_and_the_declaration_is_untouched():
    space = method_space("mean_teacher", ["consistency"], {"ema_decay": (0.9, 0.95)})
    assert space.ranges == {} and space.keys == ["method.consistency"]
    assert resolve("mean_teacher", ["ema_decay"])["method.ema_decay"].high == 0.9999


@pytest.mark.parametrize(("name", "bounds", "message"), [
    ("ema_decay", (0.99, 0.95), "low 0.99 must be below high 0.95"),
    ("ema_decay", (0.9, 1.0), r"must lie in \(0, 1\)"),
    ("optim.lr", (0.0, 1e-2), "log scale, so low must be > 0"),
    ("consistency_loss", (0.0, 1.0), "categorical"),
])
def test_impossible_ranges_name_the_hyperparameter_and_the_problem(name, bounds, message):
    with pytest.raises(ConfigError, match=f"range for {name}: .*{message}"):
        resolve("mean_teacher", [name], {name: bounds})


def test_a_default_outside_the_range_cannot_seed_the_search():
    with pytest.raises(ConfigError, match=r"default method.ema_decay = 0.95 lies outside .*0.98:0.99"):
        method_space("mean_teacher", ["ema_decay"], {"ema_decay": (0.98, 0.99)}).default_point()


def test_command_line_ranges_override_the_study_and_unknown_names_are_refused():
    study = Study(name="s", description="", methods={"mean_teacher": ["ema_decay", "consistency"]},
                  ranges={"ema_decay": (0.9, 0.995)})
    args = parse_args("s", "", ["--range", "ema_decay=0.99:0.9995", "--range", "consistency=0.5:5"])
    assert args.ranges == (("ema_decay", 0.99, 0.9995), ("consistency", 0.5, 5.0))
    assert search_ranges(study, args) == {"ema_decay": (0.99, 0.9995), "consistency": (0.5, 5.0)}
    assert search_ranges(study, parse_args("s", "", [])) == {"ema_decay": (0.9, 0.995)}
    with pytest.raises(ConfigError, match=r"range for optim.lr, which no search of it searches; .*consistency"):
        search_ranges(study, parse_args("s", "", ["--range", "optim.lr=1e-4:1e-3"]))
    with pytest.raises(ConfigError, match="outside the searched range"):
        check_searches(study, parse_args("s", "", ["--range", "ema_decay=0.99:0.999"]))


@pytest.mark.parametrize("text", ["ema_decay", "ema_decay=0.9", "=0.9:0.99", "ema_decay=a:b"])
def test_malformed_range_options_are_refused(text):
    with pytest.raises(ConfigError, match="--range"):
        parse_range(text)
    with pytest.raises(SystemExit):
        parse_args("s", "", ["--range", text])


def test_ema_sweep_searches_below_the_plateau_of_its_schedule():
    sys.path.insert(0, str(REPO / "studies"))
    try:
        from ema_sweep import STUDY
    finally:
        sys.path.remove(str(REPO / "studies"))
    low, high = STUDY.ranges["ema_decay"]
    steps = STUDY.base["train.max_epochs"] * 20
    assert low == 0.5 and high < 1 - 1 / steps, "above 1 - 1/steps every decay is the same running average"
    assert low <= 0.95 <= high, "the default decay seeds the search"


def test_a_bad_range_on_a_study_script_exits_2_before_ray_starts(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "studies" / "ema_sweep.py"), "--storage-path",
                             str(tmp_path / "runs"), "--range", "ema_decay=0.99:0.98"], capture_output=True, text=True)
    assert result.returncode == 2 and "range for ema_decay: low 0.99 must be below high 0.98" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()
