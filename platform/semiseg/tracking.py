"""MLflow tracking: experiments, the study's parent run, one child run per trial.

Metric and tag names are defined here and used everywhere else.

Logging happens in the study driver, from a Ray Tune callback, not inside trials: the
driver receives every rank-0 report anyway, a single writer keeps a SQLite store free of
"database is locked" errors when many trials finish at once, and a resumed or retried
trial finds its existing child run by the ``semiseg.trial_id`` tag instead of opening a
duplicate. An unreachable tracking server produces one warning; the study goes on and
its results stay in Ray's storage.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

METRIC_EPOCH = "epoch"
METRIC_DIVERGED = "diverged"
METRIC_LOSS = "train/loss"
METRIC_LOSS_SUP = "train/loss_sup"
METRIC_LOSS_CONS = "train/loss_cons"
METRIC_CONS_WEIGHT = "train/cons_weight"
METRIC_VAL_DICE = "val/dice"
METRIC_VAL_DICE_BEST = "val/dice_best"
METRIC_VAL_HD95 = "val/hd95"
METRIC_TEST_DICE = "test/dice"
LOGGED_METRIC_PREFIXES = ("train/", "val/", "test/", "time/")
LOGGED_METRIC_KEYS = (METRIC_EPOCH, METRIC_DIVERGED, "best_epoch")

TAG_STUDY = "semiseg.study"
TAG_METHOD = "semiseg.method"
TAG_ROLE = "semiseg.role"
TAG_PHASE = "semiseg.phase"
TAG_TRIAL_ID = "semiseg.trial_id"
TAG_STATUS = "semiseg.status"
STATUS_ORPHANED = "orphaned"
TAG_DATASET = "semiseg.dataset"
TAG_PARENT = "mlflow.parentRunId"
TAG_OPTUNA_STORAGE = "semiseg.optuna_storage"
TAG_STORAGE_PATH = "semiseg.storage_path"
ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
CONFIG_ARTIFACT = "config.json"
MAX_PARAMS_PER_BATCH = 100


def default_tracking_uri(runs_root: Path) -> str:
    """SQLite store under the runs folder, as an absolute URI (Ray changes workers' cwd)."""
    return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def mlflow_ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The command that opens the MLflow UI on a store, bound to loopback only."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {port}"


def loggable_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a trial report that go to MLflow (finite numbers under known names)."""
    metrics = {}
    for key, value in result.items():
        if not (key.startswith(LOGGED_METRIC_PREFIXES) or key in LOGGED_METRIC_KEYS):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key] = float(value)
    return metrics


class Tracker:
    """A guarded MLflow client: the first failure warns and disables further logging.

    Args:
        tracking_uri: any MLflow URI (``sqlite:///abs/path.db``, ``http://host:5000``).
        artifact_root: where a new experiment on a local store keeps artifacts.
    """

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.enabled = True
        self._client = None

    def __getstate__(self) -> dict:
        """Pickle without the client (Tune pickles callbacks into its experiment state)."""
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def reachable(self, timeout_s: float = 5.0) -> bool:
        """For an ``http(s)://`` store, whether its ``/health`` answers within ``timeout_s``.

        A store that does not answer disables tracking with one warning now, instead of
        every later call waiting through MLflow's retries.
        """
        if not self.enabled or not self.tracking_uri.startswith(("http://", "https://")):
            return self.enabled
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.tracking_uri.rstrip('/')}/health", timeout=timeout_s) as response:
                ok = response.status == 200
        except OSError as error:
            ok, reason = False, error
        else:
            reason = "no OK from /health"
        if not ok:
            self.enabled = False
            warnings.warn(f"MLflow at {self.tracking_uri} is unreachable ({reason}); tracking is off for this "
                          "study, results stay in Ray's storage", RuntimeWarning, stacklevel=2)
        return ok

    @property
    def client(self):
        """The underlying :class:`mlflow.MlflowClient` (created on first use)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _guard(self, action: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracking failure must not stop the study
            if _is_rejected_request(error):
                warnings.warn(f"MLflow at {self.tracking_uri} rejected a request to {action} ({error})",
                              RuntimeWarning, stacklevel=2)
                return None
            self.enabled = False
            warnings.warn(f"MLflow at {self.tracking_uri} failed while trying to {action} ({error}); "
                          "tracking is off for the rest of this study, results stay in Ray's storage",
                          RuntimeWarning, stacklevel=2)
            return None

    def experiment_id(self, name: str) -> str | None:
        """Id of the experiment ``name``, created if missing."""
        def get_or_create() -> str:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            location = None
            if self.artifact_root is not None and not self.tracking_uri.startswith(("http://", "https://")):
                location = (self.artifact_root / name).resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location)

        return self._guard("open the experiment", get_or_create)

    def find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        """Id of the newest run carrying all ``tags``, or None."""
        runs = self.find_runs(experiment_id, tags, newest_only=True)
        return runs[0].info.run_id if runs else None

    def find_runs(self, experiment_id: str, tags: Mapping[str, str], newest_only: bool = False) -> list[Any]:
        """The runs carrying all ``tags``, newest first (MLflow ``Run`` objects; empty when unreachable)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self._guard("search runs", lambda: list(self.client.search_runs(
            [experiment_id], filter_string=query, max_results=1 if newest_only else 5000,
            order_by=["attributes.start_time DESC"]))) or []

    def start_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str | None:
        """Create a run and return its id."""
        return self._guard("create a run", lambda: self.client.create_run(
            experiment_id, run_name=run_name, tags=dict(tags)).info.run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in batches (MLflow accepts at most 100 per call); values as strings."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in sorted(params.items())]

        def log_all() -> None:
            for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

        self._guard("log params", log_all)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics at ``step`` (the epoch)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
        self._guard("log metrics", lambda: self.client.log_batch(run_id, metrics=items) if items else None)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags on a run."""
        def set_all() -> None:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, str(value))

        self._guard("set tags", set_all)

    def log_json(self, run_id: str, payload: Any, name: str) -> None:
        """Store ``payload`` as a JSON artifact ``name`` of the run."""
        def log() -> None:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / name
                path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
                self.client.log_artifact(run_id, str(path))

        self._guard("log an artifact", log)

    def log_file(self, run_id: str, path: Path) -> None:
        """Store the file ``path`` as an artifact of the run."""
        self._guard("log an artifact", lambda: self.client.log_artifact(run_id, str(path)))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        self._guard("end a run", lambda: self.client.set_terminated(run_id, status=status))


def _is_rejected_request(error: Exception) -> bool:
    """A request the store understood and refused (bad name or value): the store itself works."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in {"INVALID_PARAMETER_VALUE",
                                                                       "RESOURCE_ALREADY_EXISTS"}


def metric_name(text: str) -> str:
    """``text`` with the characters MLflow refuses in metric names replaced by ``_``."""
    readable = text.replace(" [", "/").replace("]", "").replace(", ", "/").replace("=", ":")
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", readable)


def flatten_for_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The trial config's dotted keys (without Tune's or the runner's private keys)."""
    return {k: v for k, v in config.items() if "." in k and not k.startswith("_")}


def trial_tags(study: str, method: str, trial_id: str, phase: str, parent_run_id: str | None,
               dataset: str) -> dict[str, str]:
    """Tags of a trial's child run."""
    tags = {TAG_ROLE: ROLE_TRIAL, TAG_STUDY: study, TAG_METHOD: method, TAG_TRIAL_ID: trial_id,
            TAG_PHASE: phase, TAG_DATASET: dataset}
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    return tags


def study_tags(study: str, methods: Iterable[str], dataset: str) -> dict[str, str]:
    """Tags of a study's parent run."""
    return {TAG_ROLE: ROLE_STUDY, TAG_STUDY: study, TAG_METHOD: ",".join(sorted(set(methods))),
            TAG_DATASET: dataset}
