"""Where the training loop reports to: Ray Tune (in-process trial), Ray Train (DDP), or nothing.

The loop is written once against :class:`Session`; the study runner picks the
implementation: a single-worker trial runs the loop inside the Tune trial process (no
Ray Train worker group to start), a multi-worker trial runs it under Ray Train's
``TorchTrainer``, and tests and benchmarks run it without Ray.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

DDP_RUN_PREFIX = "ddp-"
"""A multi-worker trial's Ray Train run is named ``ddp-<Tune trial id>`` (:mod:`semiseg.tune.trainables`)."""


class Session(Protocol):
    """The loop's view of its runtime."""

    rank: int
    world_size: int
    trial_id: str | None
    """The Tune trial this loop runs for, None outside Tune."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Report an epoch's metrics and, optionally, a checkpoint folder."""

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest checkpoint folder to resume from, or None."""


class LocalSession:
    """No Ray: keeps reports in memory and checkpoints under ``checkpoint_root``.

    Used by tests, benchmarks and ``python -m semiseg.train`` debugging runs.
    """

    rank = 0
    world_size = 1
    trial_id = None

    def __init__(self, checkpoint_root: str | Path | None = None) -> None:
        self.reports: list[dict] = []
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.latest: Path | None = None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Keep ``metrics``; copy the checkpoint to ``checkpoint_root/epoch_N`` atomically."""
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_root:
            target = self.checkpoint_root / f"epoch_{int(metrics['epoch']):04d}"
            staging = self.checkpoint_root / f".{target.name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint_dir, staging)
            if target.exists():
                shutil.rmtree(target)
            staging.replace(target)
            self.latest = target

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """The newest ``epoch_N`` folder under ``checkpoint_root``, if any."""
        if self.checkpoint_root is None or not self.checkpoint_root.exists():
            yield None
            return
        folders = sorted(p for p in self.checkpoint_root.glob("epoch_*") if p.is_dir())
        yield folders[-1] if folders else None


class TuneSession:
    """Inside a Ray Tune function trainable (one worker, in-process)."""

    rank = 0
    world_size = 1

    @property
    def trial_id(self) -> str | None:
        """The Tune trial's id."""
        from ray import tune

        return tune.get_context().get_trial_id()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """``ray.tune.report`` with the checkpoint folder."""
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """The trial's latest checkpoint (set by Tune on a retry or a resumed study)."""
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)


class TrainSession:
    """Inside a Ray Train worker (DDP); every rank reports, rank 0 with the checkpoint."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        name = context.get_experiment_name()
        self.trial_id = name[len(DDP_RUN_PREFIX):] if name.startswith(DDP_RUN_PREFIX) else None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """``ray.train.report`` on every rank (Ray Train requires all ranks to call it)."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Path | None]:
        """The run's latest checkpoint (a retried or resumed Train run)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)


@contextlib.contextmanager
def checkpoint_staging() -> Iterator[Path]:
    """A temporary folder to write a checkpoint into before reporting it."""
    folder = Path(tempfile.mkdtemp(prefix="semiseg-ckpt-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
