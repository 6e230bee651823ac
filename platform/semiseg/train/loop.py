"""The per-worker training loop, shared by in-process trials, Ray Train DDP and tests.

Per epoch: ``steps_per_epoch`` optimiser steps on mixed labelled/unlabelled batches,
validation on whole cases with the method's evaluation model, a checkpoint, and one
report (``epoch`` counts finished epochs; ASHA uses it as its time attribute because it
survives retries, unlike Tune's ``training_iteration``). The loop resumes from the
latest checkpoint it is given. A non-finite loss ends the trial as diverged.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from semiseg.augment import AugmentSettings
from semiseg.config import ConfigError, ExperimentConfig, parse_shape
from semiseg.data.batches import MixedBatchSampler
from semiseg.data.prepared import PreparedData, prepare_split
from semiseg.data.source import prepared_cache_root, preprocess_settings, resolve_dataset
from semiseg.methods import BuildContext, Method, Progress, build_method
from semiseg.schedules import lr_factor
from semiseg.train.contract import CHECKPOINT_FILE, OVERLAY_FILE, config_from_trial
from semiseg.train.evaluate import evaluate_cases, predict_case, summarise_cases
from semiseg.train.overlay import overlay_png
from semiseg.train.optimizers import build_optimizer
from semiseg.train.session import LocalSession, Session, TrainSession, TuneSession, checkpoint_staging

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What survives between epochs and across a resume."""

    epoch: int = 0
    step: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0
    best_eval_state: dict | None = None
    diverged: bool = False
    history: list[dict] = field(default_factory=list)
    best_overlay: bytes | None = None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: run the loop on this worker with DDP across the group."""
    run_training(config, TrainSession())


def tune_trial(config: dict) -> None:
    """Ray Tune entry point for single-worker trials: run the loop in the trial process."""
    run_training(config, TuneSession())


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
    device = _device(session)
    _seed_everything(cfg.train.seed, session.rank)
    data = prepare_split(resolve_dataset(cfg.data), num_labelled=cfg.data.num_labelled,
                         num_validation=cfg.data.num_validation, num_test=cfg.data.num_test,
                         split_seed=cfg.data.split_seed, dims=cfg.data.dims,
                         settings=preprocess_settings(cfg.data), cache_root=prepared_cache_root(cfg.data),
                         loader=cfg.data.loader, memory_budget_mb=cfg.data.memory_budget_mb,
                         stream_buffer_rows=cfg.data.stream_buffer_rows)
    method = build_method(cfg.method["name"], _build_context(cfg, data, device), cfg.method)
    apply_memory_format(method, cfg)
    manual_sync: list[torch.nn.Parameter] = []
    if session.world_size > 1:
        manual_sync = _wrap_ddp(method, device)
    optimizers = _build_optimizers(method, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and device.type == "cuda")
    state = LoopState()
    with session.restored_checkpoint() as folder:
        if folder is not None:
            state = _load_checkpoint(Path(folder), method, optimizers, scaler)
            log.info("resumed from epoch %d", state.epoch)
    model_spec = {"dims": cfg.data.dims, "in_channels": data.in_channels, "num_classes": data.num_classes,
                  "model": dict(vars(cfg.model)), "class_ids": list(data.class_ids)}
    sampler = MixedBatchSampler(data.labelled_images, data.labelled_labels, data.unlabelled_images,
                                labelled_per_batch=cfg.train.labelled_per_batch,
                                unlabelled_per_batch=(cfg.train.batch_size - cfg.train.labelled_per_batch
                                                      if method.uses_unlabelled else 0),
                                rank=session.rank, world_size=session.world_size, seed=cfg.train.seed,
                                patch_size=_patch_size(cfg), foreground_fraction=cfg.train.foreground_fraction,
                                unlabelled_stream=data.unlabelled_stream)
    while state.epoch < cfg.train.max_epochs and not state.diverged:
        metrics = _train_epoch(cfg, method, optimizers, scaler, sampler, state, device,
                               _GradientSync(manual_sync, session.world_size))
        if state.diverged:
            metrics["val/dice"] = 0.0
        else:
            metrics.update(_validate(cfg, method, data, state, session, device))
        state.epoch += 1
        metrics.update({"epoch": state.epoch, "diverged": float(state.diverged),
                        "val/dice_best": max(state.best_dice, 0.0), "best_epoch": state.best_epoch})
        if state.epoch == cfg.train.max_epochs and cfg.train.evaluate_test and not state.diverged:
            metrics.update(_test(cfg, method, data, state, session, device))
        state.history.append(metrics)
        _report(session, metrics, method, optimizers, scaler, state, model_spec)
    return state


def _patch_size(cfg: ExperimentConfig) -> tuple[int, int, int] | None:
    """The 3D training patch, or None for whole samples.

    Raises:
        ConfigError: a patch for 2D training, or not three positive sizes.
    """
    if not cfg.data.patch_size:
        return None
    shape = parse_shape(cfg.data.patch_size, "data.patch_size")
    if cfg.data.dims != 3 or len(shape) != 3:
        raise ConfigError(f"data.patch_size {cfg.data.patch_size!r} needs data.dims=3 and three sizes")
    return shape  # type: ignore[return-value]


def _memory_format(cfg: ExperimentConfig) -> torch.memory_format | None:
    """Channels-last layout for networks and images when ``train.channels_last`` (the default:
    whole training epochs on CPU took 1.06–1.39× less time with it, 2D and 3D, for every
    method measured; and it is what AMP convolutions want on GPUs)."""
    if not cfg.train.channels_last:
        return None
    return torch.channels_last if cfg.data.dims == 2 else torch.channels_last_3d


def apply_memory_format(method: Method, cfg: ExperimentConfig) -> None:
    """Put every network of ``method`` in the layout ``train.channels_last`` asks for (no-op when off).

    The loop's epochs convert each batch's images to the same layout.
    """
    memory_format = _memory_format(cfg)
    if memory_format is not None:
        for module in [*method.trained.values(), *method.frozen.values()]:
            module.to(memory_format=memory_format)


def images_in_layout(batch: Mapping[str, torch.Tensor], memory_format: torch.memory_format
                     ) -> dict[str, torch.Tensor]:
    """``batch`` with its images (``image*`` keys) in ``memory_format``; labels as they are."""
    return {key: value.contiguous(memory_format=memory_format) if key.startswith("image") else value
            for key, value in batch.items()}


def _device(session: Session) -> torch.device:
    if torch.cuda.is_available():
        if isinstance(session, TrainSession):
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda")
    return torch.device("cpu")


def _seed_everything(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 7919 + rank)


def _build_context(cfg: ExperimentConfig, data: PreparedData, device: torch.device) -> BuildContext:
    augment = AugmentSettings(rotation_deg=cfg.train.augment_rotation_deg, scale=cfg.train.augment_scale,
                              shift=cfg.train.augment_shift, noise_std=cfg.train.augment_noise_std,
                              intensity=cfg.train.augment_intensity, spacing=data.training_spacing)
    return BuildContext(dims=cfg.data.dims, in_channels=data.in_channels, num_classes=data.num_classes,
                        model={"name": cfg.model.name, "depth": cfg.model.depth, "width": cfg.model.width,
                               "dropout": cfg.model.dropout, "norm": cfg.model.norm},
                        augment=augment, rampup_epochs=cfg.schedule.rampup_epochs,
                        rampup_shape=cfg.schedule.rampup_shape, seed=cfg.train.seed, device=str(device))


def _wrap_ddp(method: Method, device: torch.device) -> list[torch.nn.Parameter]:
    """Wrap the segmenters in DDP; return the parameters whose gradients the loop averages itself."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    manual: list[torch.nn.Parameter] = []
    for key, module in method.trained.items():
        if key in method.segmenters:
            method.trained[key] = DistributedDataParallel(
                module, device_ids=device_ids, find_unused_parameters=method.ddp_find_unused_parameters)
        else:
            manual.extend(p for p in module.parameters() if p.requires_grad)
    return manual


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flattened buffer.

    Parameters without a gradient on this step contribute zeros, so every rank calls the
    same collective with the same buffer size.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    for param, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if param.grad is None:
            param.grad = synced.clone()
        else:
            param.grad.copy_(synced)


def _build_optimizers(method: Method, cfg: ExperimentConfig) -> dict[str, torch.optim.Optimizer]:
    optimizers = {}
    for group, params in method.optimizer_groups().items():
        optimizers[group] = build_optimizer(cfg.optim.name, params, cfg.optim.lr, cfg.optim.weight_decay)
        for param_group in optimizers[group].param_groups:
            param_group["base_lr"] = param_group["lr"]
    return optimizers


def _train_epoch(cfg: ExperimentConfig, method: Method, optimizers: dict[str, torch.optim.Optimizer],
                 scaler: torch.amp.GradScaler, sampler: MixedBatchSampler, state: LoopState,
                 device: torch.device, sync: "_GradientSync") -> dict[str, float]:
    method.train()
    steps = cfg.train.steps_per_epoch
    sums: dict[str, float] = {}
    started = time.perf_counter()
    amp = cfg.train.amp and device.type == "cuda"
    pretrain_epochs = method.params.pretrain_epochs
    pretraining = state.epoch < pretrain_epochs
    if pretrain_epochs > 0 and state.epoch == pretrain_epochs:
        method.begin_semi_supervised()
    step_fn = method.pretrain_step if pretraining else method.training_step
    memory_format = _memory_format(cfg)
    for index, batch in enumerate(sampler.epoch(state.epoch, steps, device)):
        if memory_format is not None:
            batch = images_in_layout(batch, memory_format)
        epoch = state.epoch + index / steps
        factor = lr_factor(epoch, cfg.train.max_epochs, cfg.optim.warmup_epochs, cfg.optim.lr_schedule)
        for optimizer in optimizers.values():
            for param_group in optimizer.param_groups:
                param_group["lr"] = param_group["base_lr"] * factor
        progress = Progress(step=state.step, epoch=epoch, max_epochs=cfg.train.max_epochs,
                            stage_epoch=max(0.0, epoch - pretrain_epochs),
                            stage="pretrain" if pretraining else "semi")
        with torch.autocast(device.type, enabled=amp):
            output = step_fn(batch, progress)
        total = sum(output.objectives.values())
        if not _finite_on_every_rank(total.detach(), sync.world_size):
            log.warning("non-finite loss at epoch %.2f: the trial ends as diverged", epoch)
            state.diverged = True
            break
        _backward_and_step(output.objectives, optimizers, scaler, cfg.optim.grad_clip, sync)
        method.after_step(progress)
        state.step += 1
        for key, value in output.logs.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
    done = max(1, index + 1 if steps else 1)
    means = sync.average_logs({key: value / done for key, value in sums.items()})
    sync.broadcast_buffers(method)
    method.end_epoch(state.epoch, means)
    metrics = {f"train/{key}": value for key, value in means.items()}
    metrics["train/lr"] = cfg.optim.lr * lr_factor(state.epoch + 1, cfg.train.max_epochs,
                                                   cfg.optim.warmup_epochs, cfg.optim.lr_schedule)
    metrics["train/pretraining"] = float(pretraining)
    metrics["time/train_s"] = time.perf_counter() - started
    return metrics


def _finite_on_every_rank(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on all ranks (a collective decision, so no rank is left waiting)."""
    finite = torch.isfinite(loss).to(torch.float32).reshape(1)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


@dataclass
class _GradientSync:
    params: list[torch.nn.Parameter]
    world_size: int

    def __call__(self) -> None:
        if self.world_size > 1:
            average_gradients(self.params, self.world_size)

    def broadcast_buffers(self, method: Method) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, EMA teachers' buffers).

        Each rank updates BatchNorm statistics from its own batches; without this, ranks
        would validate and checkpoint slightly different models.
        """
        if self.world_size == 1 or not dist.is_initialized():
            return
        for module in [*method.trained.values(), *method.frozen.values()]:
            for buffer in _unwrapped(module).buffers():
                dist.broadcast(buffer, src=0)

    def average_logs(self, means: dict[str, float]) -> dict[str, float]:
        """Epoch means averaged over ranks, so epoch-level method state (ALW) agrees everywhere."""
        if self.world_size == 1 or not dist.is_initialized() or not means:
            return means
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values)}


def _backward_and_step(objectives: dict[str, torch.Tensor], optimizers: dict[str, torch.optim.Optimizer],
                       scaler: torch.amp.GradScaler, grad_clip: float, sync: _GradientSync) -> None:
    names = list(objectives)
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    for position, name in enumerate(names):
        optimizer = optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        retain = position < len(names) - 1
        scaler.scale(objectives[name]).backward(inputs=params, retain_graph=retain)
    sync()
    for name in names:
        optimizer = optimizers[name]
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        scaler.step(optimizer)
    scaler.update()


def _validate(cfg: ExperimentConfig, method: Method, data: PreparedData, state: LoopState,
              session: Session, device: torch.device) -> dict[str, float]:
    started = time.perf_counter()
    model = method.eval_model()
    per_case = _evaluate_sharded(model, data.validation, data, cfg, session, device)
    metrics = summarise_cases(per_case, "val")
    dice = metrics.get("val/dice", 0.0)
    if math.isnan(dice):
        dice = 0.0
        metrics["val/dice"] = 0.0
    if dice > state.best_dice:
        state.best_dice = dice
        state.best_epoch = state.epoch + 1
        state.best_eval_state = copy.deepcopy(_unwrapped(model).state_dict())
        if session.rank == 0 and data.validation:
            state.best_overlay = _overlay(model, data.validation[0], cfg, device)
    metrics["time/val_s"] = time.perf_counter() - started
    return metrics


def _overlay(model: torch.nn.Module, case, cfg: ExperimentConfig, device: torch.device) -> bytes:
    """Image | ground truth | prediction of ``case`` by ``model`` (the best epoch's evaluation model)."""
    was_training = model.training
    model.eval()
    try:
        prediction = predict_case(_unwrapped(model), case.image, cfg.data.dims, cfg.train.val_batch_size, device,
                                  cfg.train.amp, _patch_size(cfg), cfg.train.val_overlap)
    finally:
        model.train(was_training)
    return overlay_png(case.image, case.label, prediction)


def _test(cfg: ExperimentConfig, method: Method, data: PreparedData, state: LoopState, session: Session,
          device: torch.device) -> dict[str, float]:
    """Test metrics of the evaluation model at its best validation epoch."""
    model = copy.deepcopy(_unwrapped(method.eval_model()))
    if state.best_eval_state is not None:
        model.load_state_dict(state.best_eval_state)
    per_case = _evaluate_sharded(model, data.test, data, cfg, session, device)
    return summarise_cases(per_case, "test")


def _evaluate_sharded(model: torch.nn.Module, cases: list, data: PreparedData, cfg: ExperimentConfig,
                      session: Session, device: torch.device) -> list[dict]:
    """Each rank evaluates every ``world_size``-th case; rank results are gathered on all ranks."""
    mine = cases[session.rank::session.world_size]
    results = evaluate_cases(_unwrapped(model), mine, data.class_ids, cfg.data.dims, cfg.train.val_batch_size,
                             device, cfg.train.amp, _patch_size(cfg), cfg.train.val_overlap)
    if session.world_size > 1 and dist.is_initialized():
        gathered: list[list[dict]] = [[] for _ in range(session.world_size)]
        dist.all_gather_object(gathered, results)
        results = [case for rank_results in gathered for case in rank_results]
    return results


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _report(session: Session, metrics: dict, method: Method, optimizers: dict[str, torch.optim.Optimizer],
            scaler: torch.amp.GradScaler, state: LoopState, model_spec: dict | None = None) -> None:
    clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
    if session.rank != 0:
        session.report(clean, None)
        return
    with checkpoint_staging() as folder:
        payload = {"method": method.state_dict(),
                   "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                   "scaler": scaler.state_dict(),
                   "torch_rng": torch.get_rng_state(),
                   "loop": _plain({"epoch": state.epoch, "step": state.step, "best_dice": state.best_dice,
                                   "best_epoch": state.best_epoch, "diverged": state.diverged,
                                   "history": state.history}),
                   "best_eval_state": state.best_eval_state,
                   "model_spec": _plain(model_spec)}
        tmp = folder / (CHECKPOINT_FILE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, folder / CHECKPOINT_FILE)
        if state.best_overlay is not None:
            (folder / OVERLAY_FILE).write_bytes(state.best_overlay)
        session.report(clean, str(folder))


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers.

    Checkpoints are read with ``torch.load(weights_only=True)`` (a checkpoint in shared storage
    must not be able to run code), whose unpickler refuses numpy scalars such as the
    ``numpy.float64`` a metric can be.
    """
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _load_checkpoint(folder: Path, method: Method, optimizers: dict[str, torch.optim.Optimizer],
                     scaler: torch.amp.GradScaler) -> LoopState:
    payload = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    method.load_state_dict(payload["method"])
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][key])
        for param_group in optimizer.param_groups:
            param_group.setdefault("base_lr", param_group["lr"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["torch_rng"])
    loop = payload["loop"]
    overlay = folder / OVERLAY_FILE
    return LoopState(epoch=loop["epoch"], step=loop["step"], best_dice=loop["best_dice"],
                     best_epoch=loop["best_epoch"], best_eval_state=payload["best_eval_state"],
                     diverged=loop["diverged"], history=list(loop["history"]),
                     best_overlay=overlay.read_bytes() if overlay.exists() else None)
