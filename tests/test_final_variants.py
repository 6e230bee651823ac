"""The final phase's configurations: each search's best and every baseline, per seed, each once."""

from semiseg.methods.registry import experiment_config
from semiseg.tune import Study
from semiseg.tune.cli import parse_args
from semiseg.tune.results import TrialRow
from semiseg.tune.configs import config_for_method
from semiseg.tune.phases import final_phase_seeds, final_variants


def test_a_baseline_equal_to_the_searched_best_runs_once_per_seed():
    study = Study(name="s", description="", methods={"transform_consistency": ["pretrain_epochs"]},
                  baselines=({"method.name": "transform_consistency", "method.pretrain_epochs": 0},
                             {"method.name": "transform_consistency", "method.pretrain_epochs": 5},
                             {"method.name": "supervised"}))
    base = experiment_config({"method.name": "transform_consistency"}).to_flat()
    best = config_for_method(base, "transform_consistency")
    rows = [TrialRow("a", "search-transform_consistency", "transform_consistency", {}, 30, 0.8, 20, 0.7,
                     "completed", config={**best, "method.pretrain_epochs": 0}),
            TrialRow("b", "search-transform_consistency", "transform_consistency", {}, 30, 0.7, 20, 0.6,
                     "completed", config={**best, "method.pretrain_epochs": 10})]
    variants = final_variants(study, base, rows, final_seeds=2, args=parse_args("s", "", ["--seed", "3"]))
    described = [(v["method.name"], v.get("method.pretrain_epochs"), v["train.seed"]) for v in variants]
    assert described == [("transform_consistency", 0, 4), ("transform_consistency", 0, 5),
                         ("transform_consistency", 5, 4), ("transform_consistency", 5, 5),
                         ("supervised", 0, 4), ("supervised", 0, 5)]


def test_final_seeds_are_fresh_so_no_searched_trial_is_repeated():
    study = Study(name="s", description="", methods={"mean_teacher": ["ema_decay"]},
                  baselines=({"method.name": "supervised"},))
    base = experiment_config({"method.name": "mean_teacher"}).to_flat()
    searched = experiment_config({**config_for_method(base, "mean_teacher"), "method.ema_decay": 0.97,
                                           "train.seed": 7}).to_flat()
    rows = [TrialRow("a", "search-mean_teacher", "mean_teacher", {}, 30, 0.8, 20, 0.7, "completed",
                     config=searched)]
    variants = final_variants(study, base, rows, final_seeds=3, args=parse_args("s", "", ["--seed", "7"]))
    assert searched not in variants
    assert sorted({v["train.seed"] for v in variants}) == [8, 9, 10]
    assert [v["method.name"] for v in variants] == ["mean_teacher"] * 3 + ["supervised"] * 3
    assert all(v["method.ema_decay"] == 0.97 for v in variants if v["method.name"] == "mean_teacher")


def test_without_final_seeds_the_baselines_run_once_with_the_search_seed():
    assert final_phase_seeds(7, 0) == [7]
    assert final_phase_seeds(0, 2) == [1, 2]
    study = Study(name="s", description="", methods={"mean_teacher": ["ema_decay"]},
                  baselines=({"method.name": "supervised"},))
    base = experiment_config({"method.name": "mean_teacher"}).to_flat()
    variants = final_variants(study, base, [], final_seeds=0, args=parse_args("s", "", ["--seed", "7"]))
    assert [(v["method.name"], v["train.seed"]) for v in variants] == [("supervised", 7)]


def test_final_splits_run_every_configuration_on_each_split_with_each_seed():
    study = Study(name="s", description="", methods={"mean_teacher": ["ema_decay"]},
                  baselines=({"method.name": "supervised"},))
    base = experiment_config({"method.name": "mean_teacher"}).to_flat()
    rows = [TrialRow("a", "search", "mean_teacher", {}, 30, 0.8, 20, 0.7, "completed",
                     config={**config_for_method(base, "mean_teacher"), "method.ema_decay": 0.95})]
    variants = final_variants(study, base, rows, final_seeds=2, args=parse_args("s", "", ["--seed", "0"]),
                              final_splits=3)
    described = sorted((v["method.name"], v["data.split"], v["train.seed"]) for v in variants)
    assert described == sorted((method, split, seed) for method in ("mean_teacher", "supervised")
                               for split in range(3) for seed in (1, 2))
    assert {v["method.ema_decay"] for v in variants if v["method.name"] == "mean_teacher"} == {0.95}
