"""Ramp-ups, EMA-decay schedule and learning-rate schedule."""

import math

import pytest

from semiseg.schedules import ema_decay_at, lr_factor, rampup


def test_sigmoid_rampup_values():
    assert rampup(0, 10) == pytest.approx(math.exp(-5))
    assert rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert rampup(10, 10) == 1.0 and rampup(50, 10) == 1.0


def test_rampups_are_monotonic_and_bounded():
    for shape in ("sigmoid", "linear", "cosine"):
        values = [rampup(e / 4, 10, shape) for e in range(60)]
        assert all(b >= a for a, b in zip(values, values[1:])), shape
        assert 0.0 <= values[0] < 0.01 and values[-1] == 1.0
    assert rampup(0, 0) == 1.0
    with pytest.raises(ValueError, match="ramp-up shape"):
        rampup(1, 10, "step")


def test_ema_decay_schedule_switches_and_warms_up():
    assert ema_decay_at(0, 0.0, 0.99, 0.999, 50, warmup=True) == 0.0
    assert ema_decay_at(9, 1.0, 0.99, 0.999, 50, warmup=True) == pytest.approx(0.9)
    assert ema_decay_at(10_000, 10.0, 0.99, 0.999, 50) == 0.99
    assert ema_decay_at(10_000, 50.0, 0.99, 0.999, 50) == 0.999
    assert ema_decay_at(10_000, 60.0, 0.99, 0.0, 50) == 0.99


def test_lr_warmup_then_cosine():
    assert lr_factor(0.5, 10, 1, "cosine") == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(1, 10, 1, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 1, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(5, 10, 0, "constant") == 1.0
