"""Dotted-key configuration: defaults, method defaults, overrides and errors."""

import pytest

from semiseg.config import ConfigError, coerce, parse_override
from semiseg.methods.registry import experiment_config


def test_flat_round_trip_and_method_defaults():
    cfg = experiment_config({"method.name": "mean_teacher", "optim.lr": "3e-4"})
    flat = cfg.to_flat()
    assert flat["optim.lr"] == pytest.approx(3e-4)
    assert flat["method.ema_decay"] == 0.95
    assert flat["method.pretrain_epochs"] == 0
    assert experiment_config(flat).to_flat() == flat


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'.*lr"):
        experiment_config({"optim.lrr": 1})
    with pytest.raises(ConfigError, match="method.ema_decay.*supervised"):
        experiment_config({"method.name": "supervised", "method.ema_decay": 0.9})
    with pytest.raises(ConfigError, match="unknown configuration key 'lr'"):
        experiment_config({"lr": 1})


def test_values_are_coerced_to_field_types():
    cfg = experiment_config({"train.max_epochs": "7", "train.amp": "true", "method.name": "mean_teacher",
                                      "method.consistency": "2.5"})
    assert cfg.train.max_epochs == 7 and cfg.train.amp is True
    assert cfg.method["consistency"] == 2.5
    with pytest.raises(ConfigError, match="train.max_epochs"):
        experiment_config({"train.max_epochs": "seven"})
    with pytest.raises(ConfigError):
        coerce(2.5, int, "x")


def test_parse_override():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", "1e-3")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")


def test_the_method_section_is_filled_and_checked_from_the_catalogue_it_is_given():
    """The configuration knows methods only through the catalogue passed to it (it imports no method)."""
    from semiseg.config import POSITIVE, ExperimentConfig

    class Declared:
        def __init__(self, default, bounds=None, choices=None):
            self.default, self.bounds, self.choices = default, bounds, choices

    class Catalogue:
        def names(self):
            return ["toy"]

        def hparams(self, name):
            return {"strength": Declared(2.0, POSITIVE), "kind": Declared("a", choices=("a", "b"))}

    cfg = ExperimentConfig.from_flat({"method.name": "toy", "method.kind": "b"}, Catalogue())
    assert cfg.method == {"name": "toy", "strength": 2.0, "kind": "b"}
    with pytest.raises(ConfigError, match=r"method.strength = -1.0 is not allowed: it must be a finite number > 0"):
        ExperimentConfig.from_flat({"method.name": "toy", "method.strength": "-1"}, Catalogue())
    with pytest.raises(ConfigError, match="method.name = 'tyo' is not allowed: choose one of toy"):
        ExperimentConfig.from_flat({"method.name": "tyo"}, Catalogue())
