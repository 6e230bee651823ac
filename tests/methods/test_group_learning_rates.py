"""A method's optimiser group may train at its own learning rate (a discriminator's ``disc_lr``)."""

from __future__ import annotations

import pytest

from semiseg.methods import build_method
from semiseg.methods.registry import experiment_config
from semiseg.train.optimizers import build_optimizers, set_learning_rate


def test_the_discriminator_trains_at_its_own_rate_and_follows_the_schedule(tiny_context):
    cfg = experiment_config({"method.name": "adversarial", "method.disc_lr": 2e-4, "optim.lr": 3e-3})
    method = build_method("adversarial", tiny_context(2), cfg.method)
    optimizers = build_optimizers(method, cfg)
    assert optimizers["main"].param_groups[0]["lr"] == pytest.approx(3e-3)
    assert optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(2e-4)
    set_learning_rate(optimizers, 0.5)
    assert optimizers["main"].param_groups[0]["lr"] == pytest.approx(1.5e-3)
    assert optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_methods_without_their_own_rates_use_optim_lr_everywhere(tiny_context):
    cfg = experiment_config({"method.name": "cross_pseudo_supervision", "optim.lr": 7e-4})
    method = build_method("cross_pseudo_supervision", tiny_context(2), cfg.method)
    rates = {group: optimizer.param_groups[0]["lr"] for group, optimizer in build_optimizers(method, cfg).items()}
    assert rates and all(rate == pytest.approx(7e-4) for rate in rates.values())
