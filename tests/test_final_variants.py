"""The final phase's configurations: each search's best and every baseline, per seed, each once."""

from semiseg.config import ExperimentConfig
from semiseg.tune import Study
from semiseg.tune.cli import parse_args
from semiseg.tune.results import TrialRow
from semiseg.tune.runner import _config_for_method, _final_variants


def test_a_baseline_equal_to_the_searched_best_runs_once_per_seed():
    study = Study(name="s", description="", methods={"transform_consistency": ["pretrain_epochs"]},
                  baselines=({"method.name": "transform_consistency", "method.pretrain_epochs": 0},
                             {"method.name": "transform_consistency", "method.pretrain_epochs": 5},
                             {"method.name": "supervised"}))
    base = ExperimentConfig.from_flat({"method.name": "transform_consistency"}).to_flat()
    best = _config_for_method(base, "transform_consistency")
    rows = [TrialRow("a", "search-transform_consistency", "transform_consistency", {}, 30, 0.8, 20, 0.7,
                     "completed", config={**best, "method.pretrain_epochs": 0}),
            TrialRow("b", "search-transform_consistency", "transform_consistency", {}, 30, 0.7, 20, 0.6,
                     "completed", config={**best, "method.pretrain_epochs": 10})]
    variants = _final_variants(study, base, rows, final_seeds=2, args=parse_args("s", "", ["--seed", "3"]))
    described = [(v["method.name"], v.get("method.pretrain_epochs"), v["train.seed"]) for v in variants]
    assert described == [("transform_consistency", 0, 3), ("transform_consistency", 0, 4),
                         ("transform_consistency", 5, 3), ("transform_consistency", 5, 4),
                         ("supervised", 0, 3), ("supervised", 0, 4)]
