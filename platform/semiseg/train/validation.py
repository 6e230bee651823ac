"""The loop's evaluations: validation after every epoch (keeping the best epoch's weights and
overlay) and the test of the best epoch's model, each rank evaluating its share of the cases."""

from __future__ import annotations

import copy
import math
import time

import torch

from semiseg.components.parallel import unwrapped
from semiseg.config import ExperimentConfig
from semiseg.data.prepared import EvalCase, PreparedData
from semiseg.methods import Method
from semiseg.tracking import METRIC_VAL_DICE
from semiseg.train.build import patch_size
from semiseg.train.checkpoint import LoopState
from semiseg.train.distributed import gather_from_ranks
from semiseg.train.evaluate import evaluate_cases, predict_case, summarise_cases
from semiseg.train.overlay import overlay_png
from semiseg.train.session import Session


def validate(cfg: ExperimentConfig, method: Method, data: PreparedData, state: LoopState,
             session: Session, device: torch.device) -> dict[str, float]:
    """Validation metrics (``val/*``) of the method's evaluation model; a better Dice than
    ``state.best_dice`` makes this epoch the best one (its weights and, on rank 0, its overlay)."""
    started = time.perf_counter()
    model = method.eval_model()
    metrics = summarise_cases(_evaluate_sharded(model, data.validation, data, cfg, session, device), "val")
    dice = metrics.get(METRIC_VAL_DICE, 0.0)
    if math.isnan(dice):
        dice = 0.0
        metrics[METRIC_VAL_DICE] = 0.0
    if dice > state.best_dice:
        state.best_dice = dice
        state.best_epoch = state.epoch + 1
        state.best_eval_state = copy.deepcopy(unwrapped(model).state_dict())
        if session.rank == 0 and data.validation:
            state.best_overlay = _overlay(model, data.validation[0], cfg, device)
    metrics["time/val_s"] = time.perf_counter() - started
    return metrics


def evaluate_test_set(cfg: ExperimentConfig, method: Method, data: PreparedData, state: LoopState,
                    session: Session, device: torch.device) -> dict[str, float]:
    """Test metrics (``test/*``) of the evaluation model at its best validation epoch."""
    model = copy.deepcopy(unwrapped(method.eval_model()))
    if state.best_eval_state is not None:
        model.load_state_dict(state.best_eval_state)
    return summarise_cases(_evaluate_sharded(model, data.test, data, cfg, session, device), "test")


def _overlay(model: torch.nn.Module, case: EvalCase, cfg: ExperimentConfig, device: torch.device) -> bytes:
    """Image | ground truth | prediction of ``case`` by ``model`` (the best epoch's evaluation model)."""
    was_training = model.training
    model.eval()
    try:
        prediction = predict_case(unwrapped(model), case.image, cfg.data.dims, cfg.train.val_batch_size, device,
                                  cfg.train.amp, patch_size(cfg), cfg.train.val_overlap)
    finally:
        model.train(was_training)
    return overlay_png(case.image, case.label, prediction)


def _evaluate_sharded(model: torch.nn.Module, cases: list[EvalCase], data: PreparedData, cfg: ExperimentConfig,
                      session: Session, device: torch.device) -> list[dict]:
    """Each rank evaluates every ``world_size``-th case; rank results are gathered on all ranks."""
    mine = cases[session.rank::session.world_size]
    results = evaluate_cases(unwrapped(model), mine, data.class_ids, cfg.data.dims, cfg.train.val_batch_size,
                             device, cfg.train.amp, patch_size(cfg), cfg.train.val_overlap)
    return gather_from_ranks(results, session.world_size)
