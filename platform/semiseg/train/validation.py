"""The loop's evaluations: validation after every epoch (keeping the best epoch's weights and
overlay) and, at the end, the test of the best epoch's model with and without the post-processing
chosen on the validation cases; each rank evaluates its share of the cases."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from semiseg.components.parallel import unwrapped
from semiseg.config import ExperimentConfig
from semiseg.data.prepared import EvalCase, PreparedData
from semiseg.methods import Method
from semiseg.metrics import multiclass_metrics
from semiseg.postprocess import apply_postprocessing, choice_from_dice_pairs, class_dice_pairs
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
    metrics = summarise_cases(_evaluate_sharded(model, data.validation, data, cfg, session, device), "val",
                              label_names=_label_names(data))
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


@dataclass
class TestEvaluation:
    """The end-of-training evaluation of the best epoch's model.

    Attributes:
        metrics: ``test/*`` (raw predictions), ``test_postprocessed/*`` (after the chosen
            post-processing), ``val_postprocessed/dice`` (and per class) and
            ``postprocessing/<label name>`` (1.0 where the largest component is kept, else 0.0).
        postprocessing: foreground class id -> whether only its largest component is kept.
    """

    metrics: dict[str, float]
    postprocessing: dict[int, bool]

    def spec_entry(self) -> dict[str, bool]:
        """The choice as the model spec stores it: ``{"<class id>": bool}`` (JSON-ready keys)."""
        return {str(class_id): keep for class_id, keep in self.postprocessing.items()}


def evaluate_test_set(cfg: ExperimentConfig, method: Method, data: PreparedData, state: LoopState,
                      session: Session, device: torch.device) -> TestEvaluation:
    """Test metrics of the evaluation model at its best validation epoch, raw and post-processed
    (see :func:`evaluate_with_postprocessing`)."""
    model = copy.deepcopy(unwrapped(method.eval_model()))
    if state.best_eval_state is not None:
        model.load_state_dict(state.best_eval_state)
    return evaluate_with_postprocessing(model, data, cfg, session, device)


def evaluate_with_postprocessing(model: torch.nn.Module, data: PreparedData, cfg: ExperimentConfig,
                                 session: Session, device: torch.device) -> TestEvaluation:
    """Choose the post-processing on the validation cases, then score the test cases with and without it.

    The validation cases are predicted as validation predicts them; per case and foreground class,
    the Dice raw and after keeping the largest component (:func:`semiseg.postprocess.class_dice_pairs`)
    is gathered from every rank, so that every rank decides the same choice from the same values
    (:func:`semiseg.postprocess.choice_from_dice_pairs`). Each test case is predicted once and
    scored twice: as predicted (``test/*``) and after the choice (``test_postprocessed/*``).
    """
    foreground = [c for c in data.class_ids if c != 0]
    names = _label_names(data)
    pairs = gather_from_ranks([class_dice_pairs(prediction, case.label, foreground)
                               for case, prediction in _predict_share(model, data.validation, cfg, session, device)],
                              session.world_size)
    choice = choice_from_dice_pairs(pairs, foreground)
    gathered = gather_from_ranks([_raw_and_postprocessed_scores(case, prediction, choice, foreground)
                                  for case, prediction in _predict_share(model, data.test, cfg, session, device)],
                                 session.world_size)
    metrics = summarise_cases([case["raw"] for case in gathered], "test", label_names=names)
    metrics.update(summarise_cases([case["processed"] for case in gathered], "test_postprocessed", label_names=names))
    metrics.update(_postprocessed_validation_dice(pairs, choice, names))
    metrics.update({f"postprocessing/{names[c]}": float(keep) for c, keep in choice.items()})
    return TestEvaluation(metrics, choice)


def _raw_and_postprocessed_scores(case: EvalCase, prediction: np.ndarray, choice: dict[int, bool],
                                  foreground: list[int]) -> dict[str, dict]:
    """``{"raw": metrics, "processed": metrics}`` of one predicted case (the same scores when the
    choice filters no class)."""
    raw = {"case_id": case.case_id, **multiclass_metrics(prediction, case.label, case.spacing, foreground)}
    if not any(choice.values()):
        return {"raw": raw, "processed": raw}
    processed = multiclass_metrics(apply_postprocessing(prediction, choice), case.label, case.spacing, foreground)
    return {"raw": raw, "processed": {"case_id": case.case_id, **processed}}


def _postprocessed_validation_dice(pairs: Sequence[dict[int, tuple[float, float]]], choice: dict[int, bool],
                                   names: dict[int, str]) -> dict[str, float]:
    """``val_postprocessed/dice``: the mean over validation cases of the mean Dice over the classes
    present in the prediction or the reference, after the chosen post-processing; and per class
    (``val_postprocessed/dice/<label name>``). NaN when no case has any class."""
    chosen = [{c: pair[1] if choice[c] else pair[0] for c, pair in case.items()} for case in pairs]
    out = {"val_postprocessed/dice": _nanmean([_nanmean(list(case.values())) for case in chosen])}
    for class_id in choice:
        out[f"val_postprocessed/dice/{names[class_id]}"] = _nanmean([case[class_id] for case in chosen])
    return out


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _label_names(data: PreparedData) -> dict[int, str]:
    """Class id -> label name for every class (its id as text where the data names none)."""
    names = getattr(data, "label_names", None) or {}
    return {int(c): str(names.get(int(c), c)) for c in data.class_ids}


def _predict_share(model: torch.nn.Module, cases: Sequence[EvalCase], cfg: ExperimentConfig, session: Session,
                   device: torch.device) -> Iterator[tuple[EvalCase, np.ndarray]]:
    """This rank's share of ``cases`` (every ``world_size``-th), each with its predicted label map,
    predicted as validation predicts (the model in eval mode meanwhile)."""
    network = unwrapped(model)
    was_training = network.training
    network.eval()
    try:
        for case in cases[session.rank::session.world_size]:
            yield case, predict_case(network, case.image, cfg.data.dims, cfg.train.val_batch_size, device,
                                     cfg.train.amp, patch_size(cfg), cfg.train.val_overlap)
    finally:
        network.train(was_training)


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
