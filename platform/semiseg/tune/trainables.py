"""The function each Tune trial runs: the loop in-process, or a Ray Train DDP run."""

from __future__ import annotations

from typing import Any, Callable

from ray import tune

from semiseg.train.contract import STORAGE_KEY
from semiseg.train.loop import train_loop_per_worker, tune_trial as run_tune_trial
from semiseg.train.session import DDP_RUN_PREFIX
from semiseg.tune.failures import deterministic_errors_end_the_trial

DDP_DRIVER_MEMORY = 256 * 1024 ** 2
"""The DDP trial's driver only waits on its worker group: it reserves memory, not a CPU,
so that N workers of one CPU each fit on N CPUs (Tune rejects an all-zero request)."""


def make_trainable(workers_per_trial: int, cpus_per_worker: int, gpus_per_worker: float,
                   metric: str = "val/dice") -> Callable[[dict], None] | Any:
    """The trainable of a study, with its resource request.

    One worker: :func:`semiseg.train.loop.tune_trial` runs inside the trial process
    (no worker group to start; it asks for the worker's CPUs and GPU fraction).
    Several workers: a small driver builds a ``TorchTrainer`` (DDP; gloo on CPU, nccl on
    GPU) named after the trial, so a retried trial resumes from the Train run's latest
    checkpoint, and forwards rank 0's reports to Tune.

    Retries are Tune's (the study's ``FailureConfig``): the Train run has ``max_failures=0``,
    because Ray Train would restart the worker group for any error, a deterministic one too.
    A deterministic error (see :mod:`semiseg.tune.failures`) is reported once as the trial's
    last result, with ``metric`` as NaN, so that Tune does not retry it.
    """
    if workers_per_trial == 1:
        resources = {"cpu": cpus_per_worker, "gpu": gpus_per_worker}

        def tune_trial(config: dict) -> None:
            with deterministic_errors_end_the_trial(metric):
                run_tune_trial(config)

        return tune.with_resources(tune_trial, resources)

    def ddp_trial(config: dict) -> None:
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_id = tune.get_context().get_trial_id()
        resources = {"CPU": cpus_per_worker}
        if gpus_per_worker > 0:
            resources["GPU"] = gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if gpus_per_worker > 0 else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers_per_trial, use_gpu=gpus_per_worker > 0,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(name=f"{DDP_RUN_PREFIX}{trial_id}", storage_path=config[STORAGE_KEY],
                                           callbacks=[TuneReportCallback()],
                                           failure_config=ray.train.FailureConfig(max_failures=0)),
        )
        with deterministic_errors_end_the_trial(metric):
            trainer.fit()

    return tune.with_resources(ddp_trial, {"cpu": 0, "memory": DDP_DRIVER_MEMORY})
