"""The per-worker training loop, shared by in-process trials, Ray Train DDP and tests.

Per epoch: ``steps_per_epoch`` optimiser steps on mixed labelled/unlabelled batches,
validation on whole cases with the method's evaluation model, a checkpoint, and one
report (``epoch`` counts finished epochs; ASHA uses it as its time attribute because it
survives retries, unlike Tune's ``training_iteration``). The loop resumes from the
latest checkpoint it is given. A non-finite loss ends the trial as diverged.

The jobs around it have their own modules: what a trial builds from its configuration
(:mod:`~semiseg.train.build`), optimisers (:mod:`~semiseg.train.optimizers`), several workers
(:mod:`~semiseg.train.distributed`), validation and test (:mod:`~semiseg.train.validation`)
and the checkpoint (:mod:`~semiseg.train.checkpoint`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from semiseg.config import ExperimentConfig
from semiseg.data.batches import MixedBatchSampler
from semiseg.methods import Method, build_method
from semiseg.schedules import lr_factor
from semiseg.tracking import METRIC_DIVERGED, METRIC_EPOCH, METRIC_VAL_DICE, METRIC_VAL_DICE_BEST
from semiseg.train.build import (apply_memory_format, batch_sampler, build_context, images_in_layout, memory_format,
                                 model_spec, prepare_data)
from semiseg.train.checkpoint import LoopState, load_checkpoint, save_checkpoint
from semiseg.train.contract import DATASET_KEY, config_from_trial
from semiseg.train.distributed import GradientSync, ddp_device_ids, finite_on_every_rank, training_device
from semiseg.train.optimizers import backward_and_step, build_optimizers, set_learning_rate
from semiseg.train.session import LocalSession, Session, TrainSession, TuneSession, checkpoint_staging
from semiseg.train.system_metrics import trial_system_metrics
from semiseg.train.validation import evaluate_test_set, validate

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: run the loop on this worker with DDP across the group (its machine's
    system metrics to the trial's MLflow run)."""
    session = TrainSession()
    with trial_system_metrics(session):
        run_training(config, session)


def tune_trial(config: dict) -> None:
    """Ray Tune entry point for single-worker trials: run the loop in the trial process (its machine's
    system metrics to the trial's MLflow run)."""
    session = TuneSession()
    with trial_system_metrics(session):
        run_training(config, session)


def run_training(config: Mapping[str, Any], session: Session | None = None) -> LoopState:
    """Train one configuration, reporting every epoch to ``session``.

    Args:
        config: flat dotted-key configuration (see :mod:`semiseg.config`).
        session: where to report; a :class:`LocalSession` when None.

    Returns:
        The final loop state (history of reported metrics, best epoch).
    """
    session = session or LocalSession()
    cfg = config_from_trial(config)
    torch.set_num_threads(max(1, cfg.train.threads))
    device = training_device(session)
    torch.manual_seed(cfg.train.seed * 7919 + session.rank)
    data = prepare_data(cfg, config.get(DATASET_KEY))
    method = build_method(cfg.method["name"], build_context(cfg, data, device), cfg.method)
    apply_memory_format(method, cfg)
    sync = GradientSync(method.wrap_for_ddp(ddp_device_ids(device)) if session.world_size > 1 else [],
                        session.world_size)
    optimizers = build_optimizers(method, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and device.type == "cuda")
    state = LoopState()
    with session.restored_checkpoint() as folder:
        if folder is not None:
            state = load_checkpoint(Path(folder), method, optimizers, scaler)
            log.info("resumed from epoch %d", state.epoch)
    spec = model_spec(cfg, data, method)
    sampler = batch_sampler(cfg, data, method, session.rank, session.world_size)
    while state.epoch < cfg.train.max_epochs and not state.diverged:
        metrics = train_epoch(cfg, method, optimizers, scaler, sampler, state, device, sync)
        if state.diverged:
            metrics[METRIC_VAL_DICE] = 0.0
        else:
            metrics.update(validate(cfg, method, data, state, session, device))
        state.epoch += 1
        metrics.update({METRIC_EPOCH: state.epoch, METRIC_DIVERGED: float(state.diverged),
                        METRIC_VAL_DICE_BEST: max(state.best_dice, 0.0), "best_epoch": state.best_epoch})
        if state.epoch == cfg.train.max_epochs and cfg.train.evaluate_test and not state.diverged:
            test = evaluate_test_set(cfg, method, data, state, session, device)
            metrics.update(test.metrics)
            spec["postprocessing"] = test.spec_entry()
        state.history.append(metrics)
        _report(session, metrics, method, optimizers, scaler, state, spec)
    return state


def train_epoch(cfg: ExperimentConfig, method: Method, optimizers: dict[str, torch.optim.Optimizer],
                scaler: torch.amp.GradScaler, sampler: MixedBatchSampler, state: LoopState,
                device: torch.device, sync: GradientSync) -> dict[str, float]:
    """``train.steps_per_epoch`` steps of epoch ``state.epoch``; returns its ``train/*`` metrics
    (``state.diverged`` set, and the epoch cut short, on a non-finite loss on any rank)."""
    method.train()
    steps, max_epochs = cfg.train.steps_per_epoch, cfg.train.max_epochs
    sums: dict[str, float] = {}
    started = time.perf_counter()
    amp = cfg.train.amp and device.type == "cuda"
    method.begin_epoch(state.epoch)
    pretraining = method.progress(state.step, state.epoch, max_epochs).stage == "pretrain"
    step_fn = method.pretrain_step if pretraining else method.training_step
    layout = memory_format(cfg)
    for index, batch in enumerate(sampler.epoch(state.epoch, steps, device)):
        batch = batch if layout is None else images_in_layout(batch, layout)
        epoch = state.epoch + index / steps
        set_learning_rate(optimizers, lr_factor(epoch, max_epochs, cfg.optim.warmup_epochs, cfg.optim.lr_schedule))
        progress = method.progress(state.step, epoch, max_epochs)
        with torch.autocast(device.type, enabled=amp):
            output = step_fn(batch, progress)
        total = sum(output.objectives.values())
        if not finite_on_every_rank(total.detach(), sync.world_size):
            log.warning("non-finite loss at epoch %.2f: the trial ends as diverged", epoch)
            state.diverged = True
            break
        backward_and_step(output.objectives, optimizers, scaler, cfg.optim.grad_clip, sync)
        method.after_step(progress)
        state.step += 1
        for key, value in output.logs.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
    means = sync.average_logs({key: value / max(1, index + 1 if steps else 1) for key, value in sums.items()})
    sync.broadcast_buffers(method)
    method.end_epoch(state.epoch, means)
    return {**{f"train/{key}": value for key, value in means.items()},
            "train/lr": cfg.optim.lr * lr_factor(state.epoch + 1, max_epochs, cfg.optim.warmup_epochs,
                                                 cfg.optim.lr_schedule),
            "train/pretraining": float(pretraining), "time/train_s": time.perf_counter() - started}


def _report(session: Session, metrics: dict, method: Method, optimizers: dict[str, torch.optim.Optimizer],
            scaler: torch.amp.GradScaler, state: LoopState, model_spec: dict | None = None) -> None:
    """Report the epoch's metrics; rank 0 with a checkpoint of the trial state."""
    clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
    if session.rank != 0:
        session.report(clean, None)
        return
    with checkpoint_staging() as folder:
        save_checkpoint(folder, method, optimizers, scaler, state, model_spec)
        session.report(clean, str(folder))
