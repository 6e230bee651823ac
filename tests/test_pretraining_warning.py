"""A study whose pretraining fills a whole trial says so before Ray starts (once per method)."""

from __future__ import annotations

import logging

from semiseg.methods.registry import experiment_config
from semiseg.tune import Study
from semiseg.tune.checks import check_trained_configs
from semiseg.tune.cli import parse_args


def _warnings(caplog, study: Study, argv: list[str]) -> list[str]:
    args = parse_args("x", "y", argv)
    base = experiment_config({**study.base, "train.max_epochs": args.max_epochs or 30}).to_flat()
    with caplog.at_level(logging.WARNING, logger="semiseg.study"):
        check_trained_configs(study, args, base)
    return [r.getMessage() for r in caplog.records if "pretrain_epochs" in r.getMessage()]


def test_pretraining_that_fills_the_trial_is_warned_once_per_method(caplog):
    study = Study(name="s", description="", methods={"pretext_pretrain": [], "mean_teacher": []},
                  baselines=({"method.name": "pretext_pretrain", "train.seed": 3},))
    lines = _warnings(caplog, study, ["--max-epochs", "10"])
    assert lines == ["pretext_pretrain: method.pretrain_epochs = 10 fills all train.max_epochs = 10 epochs, so its "
                     "segmenter never trains on labels; lower method.pretrain_epochs or raise --max-epochs"]


def test_pretraining_shorter_than_the_trial_is_not_warned(caplog):
    study = Study(name="s", description="", methods={"pretext_pretrain": [], "contrastive_pretrain": []})
    assert _warnings(caplog, study, ["--max-epochs", "11"]) == []
