"""A trial's system metrics, sampled by the trial process on the machine it runs on.

The study driver opens each trial's MLflow run in its Tune callback's ``on_trial_start``,
which Tune calls before it sends the trial process its first ``train`` call (a new process,
or a reused one after ``reset_config``). The callback shares where the run is (run id,
tracking URI, sampling interval) in the Ray cluster's key-value store under the trial's id
(:func:`share_trial_run`); the trial reads it as its loop starts (:func:`trial_system_metrics`)
and samples its machine into that run until the loop ends. The store is the cluster's
(every node reads it) and in memory: a tracking URI's secrets never reach the trial config
that Tune writes to the study's storage. Tune's own registry of trainables uses the same store.

Without Ray, or without a shared run (tracking off, an unreachable store, a trial run on its
own), a trial runs unmonitored.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Iterator

from semiseg.tracking import system_metrics
from semiseg.train.session import Session

log = logging.getLogger(__name__)
KV_NAMESPACE = "semiseg"
"""Namespace of semiseg's entries in Ray's key-value store."""


def _key(trial_id: str) -> bytes:
    return f"mlflow-run/{trial_id}".encode()


def _kv() -> Any | None:
    """Ray's key-value store module when this process is connected to Ray, else None."""
    try:
        from ray.experimental import internal_kv
    except ImportError:
        return None
    return internal_kv if internal_kv._internal_kv_initialized() else None


def share_trial_run(trial_id: str, run_id: str, tracking_uri: str, interval_s: float) -> bool:
    """Tell the trial ``trial_id`` its MLflow run, store and sampling interval (driver side).

    Returns:
        Whether it was shared (False without a Ray connection).
    """
    kv = _kv()
    if kv is None:
        return False
    record = {"run_id": run_id, "tracking_uri": tracking_uri, "interval_s": float(interval_s)}
    kv._internal_kv_put(_key(trial_id), json.dumps(record).encode(), overwrite=True, namespace=KV_NAMESPACE)
    return True


def withdraw_trial_run(trial_id: str) -> None:
    """Forget what :func:`share_trial_run` shared for ``trial_id`` (its trial ended)."""
    kv = _kv()
    if kv is not None:
        kv._internal_kv_del(_key(trial_id), namespace=KV_NAMESPACE)


def shared_trial_run(trial_id: str) -> dict[str, Any] | None:
    """What the driver shared for ``trial_id``: ``{"run_id", "tracking_uri", "interval_s"}``, or None."""
    kv = _kv()
    if kv is None:
        return None
    value = kv._internal_kv_get(_key(trial_id), namespace=KV_NAMESPACE)
    return json.loads(value) if value else None


@contextlib.contextmanager
def trial_system_metrics(session: Session) -> Iterator[None]:
    """While inside, this machine's system metrics go to the trial's MLflow run (when it has one).

    Each rank of a multi-worker trial samples its own machine, under ``system/rank_<r>/``.
    The sampling thread is stopped and joined on leaving (trial processes are reused).
    """
    trial_id = getattr(session, "trial_id", None)
    shared = shared_trial_run(trial_id) if trial_id else None
    if shared is None:
        yield
        return
    node = f"rank_{session.rank}" if session.world_size > 1 else None
    with system_metrics(shared["run_id"], shared["tracking_uri"], shared["interval_s"], node):
        yield
