"""Best values at the edge of a searched range: which, on which scale, and a --range the study CLI accepts."""

from __future__ import annotations

import shlex

import pytest

from semiseg.tune.cli import parse_args
from semiseg.tune.range_edges import LOWER, UPPER, edge_warnings, range_edges
from semiseg.tune.space import MethodChoiceSpace, method_space, resolve

NAMES = ["ema_decay", "optim.lr", "schedule.rampup_epochs", "pretrain_epochs", "consistency_loss"]
MIDDLE = {"method.ema_decay": 0.97, "optim.lr": 1e-3, "schedule.rampup_epochs": 15.0, "method.pretrain_epochs": 10,
          "method.consistency_loss": "mse"}


def space(ranges=None):
    return method_space("mean_teacher", NAMES, ranges or {"ema_decay": (0.9, 0.995)})


def accepted_range(edge):
    """Parse the suggested option with the study CLI and build the widened space from it."""
    args = parse_args("ema_sweep", "", shlex.split(edge.range_option))
    [(name, low, high)] = args.ranges
    resolve("mean_teacher", [name], {name: (low, high)})  # raises ConfigError if the study would refuse it
    return name, low, high


def test_no_warning_in_the_middle_of_every_range():
    assert range_edges(space(), MIDDLE) == []
    assert edge_warnings(space(), MIDDLE) == []


def test_a_log_parameter_at_its_lower_end_is_widened_by_its_own_factor():
    [edge] = range_edges(space(), {**MIDDLE, "optim.lr": 1.2e-4})
    assert (edge.name, edge.key, edge.side) == ("optim.lr", "optim.lr", LOWER)
    assert edge.range_option == "--range optim.lr=1e-06:0.01", "1e-4 / (1e-2 / 1e-4) on the low side"
    assert accepted_range(edge) == ("optim.lr", 1e-6, 1e-2)
    # 1.2e-4 is 4 % of the log width (log 1.2 / log 100) but 0.2 % of the linear one; 1.3e-4 is 5.7 %
    assert range_edges(space(), {**MIDDLE, "optim.lr": 1.3e-4}) == []


def test_a_linear_parameter_at_its_upper_end_is_widened_by_its_width():
    [edge] = range_edges(space(), {**MIDDLE, "schedule.rampup_epochs": 29.0})
    assert (edge.name, edge.side, edge.low, edge.high) == ("schedule.rampup_epochs", UPPER, 0.0, 30.0)
    assert edge.range_option == "--range schedule.rampup_epochs=0:60"
    assert accepted_range(edge) == ("schedule.rampup_epochs", 0.0, 60.0)
    assert edge.message() == ("schedule.rampup_epochs = 29 lies at the upper edge of the searched range 0–30; "
                              "widen it, e.g. --range schedule.rampup_epochs=0:60")
    assert range_edges(space(), {**MIDDLE, "schedule.rampup_epochs": 28.4}) == [], "5.3 % from the end"


def test_ema_decay_is_measured_on_the_log_scale_of_one_minus_the_decay_and_suggested_in_decay_units():
    [low] = range_edges(space(), {**MIDDLE, "method.ema_decay": 0.9135})
    assert low.side == LOWER and low.value == 0.9135
    assert low.message() == ("ema_decay = 0.9135 lies at the lower edge of the searched range 0.9–0.995; "
                             "widen it, e.g. --range ema_decay=0.45:0.995")
    assert accepted_range(low) == ("ema_decay", 0.45, 0.995), "1 - α = 0.1 × 20 leaves (0, 1): halfway to 0"
    assert range_edges(space(), {**MIDDLE, "method.ema_decay": 0.92}) == [], "7.5 % of the log width of 1 - α"
    [high] = range_edges(space(), {**MIDDLE, "method.ema_decay": 0.9949})
    assert high.side == UPPER and high.range_option == "--range ema_decay=0.9:0.99975"
    name, low_bound, high_bound = accepted_range(high)
    assert (1 - high_bound) == pytest.approx((1 - 0.995) / 20), "1 - α divided by the range's own factor"


def test_an_integer_parameter_gets_integer_bounds_and_a_hard_bound_end_gives_no_warning():
    [edge] = range_edges(space(), {**MIDDLE, "method.pretrain_epochs": 20})
    assert edge.range_option == "--range pretrain_epochs=0:40"
    assert accepted_range(edge) == ("pretrain_epochs", 0.0, 40.0)
    assert range_edges(space(), {**MIDDLE, "method.pretrain_epochs": 0}) == [], "0 epochs is the least there is"
    assert range_edges(space(), {**MIDDLE, "schedule.rampup_epochs": 0.5}) == []


def test_several_edges_are_reported_in_key_order_and_categoricals_are_ignored():
    best = {**MIDDLE, "method.ema_decay": 0.9949, "optim.lr": 9.5e-3, "method.consistency_loss": "bce"}
    lines = edge_warnings(space(), best)
    assert [line.split(" ", 1)[0] for line in lines] == ["ema_decay", "optim.lr"]
    assert lines[1].endswith("--range optim.lr=0.0001:1")


def test_a_space_that_chooses_the_method_warns_without_a_range_option():
    choice = MethodChoiceSpace({"mean_teacher": ["ema_decay"], "supervised": []})
    [line] = edge_warnings(choice, {"method.name": "mean_teacher", "method.ema_decay": 0.9001})
    assert line == ("ema_decay = 0.9001 lies at the lower edge of the searched range 0.9–0.9999; "
                    "widen it in the study's search space")
    assert edge_warnings(choice, {"method.name": "supervised"}) == []


def test_ema_sweep_default_range_holds_the_decays_its_former_range_cut_off():
    import sys
    from pathlib import Path

    studies = str(Path(__file__).resolve().parents[1] / "studies")
    sys.path.insert(0, studies)
    try:
        from ema_sweep import STUDY
    finally:
        sys.path.remove(studies)
    sweep = method_space("mean_teacher", ["ema_decay"], STUDY.ranges)
    former = method_space("mean_teacher", ["ema_decay"], {"ema_decay": (0.9, 0.995)})
    for decay in (0.906, 0.910, 0.913):
        assert len(range_edges(former, {"method.ema_decay": decay})) == 1, "at the former range's lower edge"
        assert range_edges(sweep, {"method.ema_decay": decay}) == [], "inside the study's own range"
    steps = STUDY.base["train.max_epochs"] * 20
    assert STUDY.ranges["ema_decay"][1] < 1 - 1 / steps, "above 1 - 1/steps every decay is the same running average"
    assert sweep.default_point(), "the default decay 0.95 still seeds the search"
