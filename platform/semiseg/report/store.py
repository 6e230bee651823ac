"""Read studies back from an MLflow store into plain dataclasses.

A study is an MLflow experiment (named after the study) holding one parent run per
invocation (tag ``semiseg.role=study``) and one child run per trial (``semiseg.role=trial``,
``mlflow.parentRunId`` pointing at the parent). The report shows the newest invocation
that has trials; older invocations are counted, not mixed in.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlparse

from semiseg.tracking import (METRIC_EPOCH, METRIC_VAL_DICE, METRIC_VAL_DICE_BEST, ROLE_STUDY, ROLE_TRIAL,
                              STATUS_ORPHANED, TAG_METHOD, TAG_PARENT, TAG_PHASE, TAG_ROLE, TAG_STATUS, TAG_TRIAL_ID,
                              health_request, redact_uri, scrub)

RESULTS_ARTIFACT = "results.json"
TAG_OPTUNA_STORAGE = "semiseg.optuna_storage"
METRIC_SUMMARY_BEST = "summary/best_val_dice"
HISTORY_METRICS = (METRIC_VAL_DICE, "time/train_s", "time/val_s")
STATUS_RUNNING = "running"
PHASE_FINAL = "final"
PHASE_SEARCH = "search"
PAGE_SIZE = 1000
HEALTH_TIMEOUT_S = 5.0
_GROUP_LABEL = re.compile(r"^(?P<method>\S+) \[(?P<groups>.*)\]$")


class StoreError(Exception):
    """The MLflow store does not exist, does not answer, or cannot be read."""


class StudyNotFoundError(StoreError):
    """The store has no study (experiment with a study run) of that name."""


@dataclass(frozen=True)
class TrialRun:
    """One trial: a child run with its params, tags, latest metrics and metric histories.

    Attributes:
        run_id: MLflow run id.
        name: MLflow run name.
        method: ``semiseg.method`` tag.
        phase: ``search-<method>``, ``search`` or ``final``.
        trial_id: Ray Tune's trial id.
        status: ``completed``, ``stopped_early``, ``diverged``, ``error``, or ``running``
            while the trial has no status tag yet.
        run_status: MLflow's status (``FINISHED``, ``FAILED``, ``RUNNING``, ...).
        params: the flat trial configuration (strings, as MLflow stores them).
        tags: every tag of the run.
        metrics: the latest value of every metric.
        histories: ``metric -> [(step, value), ...]`` (step = epoch) of the fetched metrics.
    """

    run_id: str
    name: str
    method: str
    phase: str
    trial_id: str
    status: str
    run_status: str
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    histories: Mapping[str, Sequence[tuple[int, float]]] = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        """Whether the trial ran in the final phase (fixed configuration, full length)."""
        return self.phase == PHASE_FINAL

    @property
    def is_search(self) -> bool:
        """Whether the trial was sampled by a search."""
        return self.phase.startswith(PHASE_SEARCH)

    @property
    def seed(self) -> int | None:
        """The trial's ``train.seed`` (None when missing or not an integer)."""
        return _as_int(self.params.get("train.seed"))

    @property
    def best_val_dice(self) -> float:
        """Highest validation Dice of the trial (history, else summary metrics; NaN if none)."""
        values = [v for _, v in self.histories.get(METRIC_VAL_DICE, ()) if math.isfinite(v)]
        if values:
            return max(values)
        for key in (METRIC_SUMMARY_BEST, METRIC_VAL_DICE_BEST, METRIC_VAL_DICE):
            value = self.metrics.get(key)
            if value is not None and math.isfinite(value):
                return float(value)
        return float("nan")

    @property
    def epochs(self) -> int:
        """Epochs the trial ran (its last reported epoch)."""
        steps = [step for step, _ in self.histories.get(METRIC_VAL_DICE, ())]
        if steps:
            return max(steps)
        return int(self.metrics.get(METRIC_EPOCH, 0) or 0)

    def param_float(self, key: str) -> float | None:
        """Param ``key`` as a float, or None when missing or not numeric."""
        try:
            value = float(self.params[key])
        except (KeyError, TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ParentRun:
    """A study invocation: the parent run with its base config, summary metrics and tags."""

    run_id: str
    name: str
    run_status: str
    start_time: int
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model of the study (``semiseg-<study>-<method>``) and its newest version."""

    name: str
    latest_version: str
    run_id: str


@dataclass(frozen=True)
class StudyRecord:
    """Everything the report needs of one study.

    Attributes:
        name: study (experiment) name.
        experiment_id: MLflow experiment id.
        parent: the shown invocation (None when the experiment has trials but no parent run).
        trials: child runs of that invocation.
        results: the parent run's ``results.json`` artifact, when present.
        other_invocations: parent runs of the study that are not shown.
        registered_models: the study's registered models.
    """

    name: str
    experiment_id: str
    parent: ParentRun | None
    trials: Sequence[TrialRun] = ()
    results: Mapping[str, Any] | None = None
    other_invocations: int = 0
    registered_models: Sequence[RegisteredModel] = ()

    @property
    def methods(self) -> list[str]:
        """Methods of the trials, in first-seen order (supervised last)."""
        seen = list(dict.fromkeys(t.method for t in self.trials))
        return [m for m in seen if m != "supervised"] + [m for m in seen if m == "supervised"]

    @property
    def optuna_storage(self) -> str | None:
        """The study's Optuna storage URL (parent tag ``semiseg.optuna_storage``), if recorded."""
        return self.parent.tags.get(TAG_OPTUNA_STORAGE) if self.parent else None

    @property
    def group_by(self) -> list[str]:
        """Config keys that group the final table, from ``results.json`` or the summary metrics."""
        keys: list[str] = []
        for label in (self.results or {}).get("final", {}) or {}:
            match = _GROUP_LABEL.match(str(label))
            if match:
                keys += [part.split("=", 1)[0] for part in match["groups"].split(", ") if "=" in part]
        if not keys and self.parent is not None:
            for name in self.parent.metrics:
                parts = name.split("/")
                if parts[0] == "final" and len(parts) > 3:
                    keys += [part.split(":", 1)[0] for part in parts[2:-1] if ":" in part]
        return list(dict.fromkeys(keys))


class ReportStore:
    """Read-only access to the studies of one MLflow store.

    Args:
        tracking_uri: ``sqlite:////abs/mlflow.db``, ``file:///abs/mlruns``, ``http(s)://host:port``
            or any other URI MLflow understands.
        history_metrics: the metrics whose whole history is fetched per trial.

    Raises:
        StoreError: a local store that does not exist, or a server that does not answer
            (checked first, so that no empty store is created by accident).
    """

    def __init__(self, tracking_uri: str, history_metrics: Sequence[str] = HISTORY_METRICS) -> None:
        check_store(tracking_uri)
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.history_metrics = tuple(history_metrics)
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def study_names(self) -> list[str]:
        """Names of the experiments that hold at least one study run, sorted."""
        names = []
        for experiment in self._call("list experiments", self.client.search_experiments):
            runs = self._call("search runs", self.client.search_runs, [experiment.experiment_id],
                              filter_string=f"tags.`{TAG_ROLE}` = '{ROLE_STUDY}'", max_results=1)
            if runs:
                names.append(experiment.name)
        return sorted(names)

    def load_study(self, name: str) -> StudyRecord:
        """Read the newest invocation of study ``name`` that has trials.

        Raises:
            StudyNotFoundError: no experiment ``name``, or one without semiseg runs.
            StoreError: the store failed while reading.
        """
        experiment = self._call("read the experiment", self.client.get_experiment_by_name, name)
        if experiment is None:
            raise StudyNotFoundError(f"no study {name!r} in the MLflow store {redact_uri(self.tracking_uri)}")
        runs = self._search_all(experiment.experiment_id)
        parents = sorted((r for r in runs if r.data.tags.get(TAG_ROLE) == ROLE_STUDY),
                         key=lambda r: r.info.start_time or 0, reverse=True)
        children = [r for r in runs if r.data.tags.get(TAG_ROLE) == ROLE_TRIAL
                    and r.data.tags.get(TAG_STATUS) != STATUS_ORPHANED]
        if not parents and not children:
            raise StudyNotFoundError(f"experiment {name!r} in {redact_uri(self.tracking_uri)} has no semiseg "
                                     "study runs")
        with_trials = [p for p in parents if any(c.data.tags.get(TAG_PARENT) == p.info.run_id for c in children)]
        chosen = (with_trials or parents or [None])[0]
        if chosen is not None:
            children = [c for c in children if c.data.tags.get(TAG_PARENT) == chosen.info.run_id]
        trials = [self._trial(run) for run in sorted(children, key=lambda r: r.info.start_time or 0)]
        parent = _parent(chosen) if chosen is not None else None
        results = self.read_json(chosen.info.run_id, RESULTS_ARTIFACT) if chosen is not None else None
        return StudyRecord(name=name, experiment_id=experiment.experiment_id, parent=parent, trials=trials,
                           results=results, other_invocations=max(0, len(parents) - 1),
                           registered_models=self._registered_models(name))

    def read_artifact(self, run_id: str, path: str) -> bytes | None:
        """Bytes of artifact ``path`` of a run, or None when the run has no such artifact."""
        try:
            with tempfile.TemporaryDirectory() as folder:
                local = self.client.download_artifacts(run_id, path, folder)
                return Path(local).read_bytes()
        except Exception:  # noqa: BLE001 - a missing or unreadable artifact is an empty state, not an error
            return None

    def read_json(self, run_id: str, path: str) -> dict[str, Any] | None:
        """A JSON artifact of a run as a dict, or None when missing or malformed."""
        data = self.read_artifact(run_id, path)
        if data is None:
            return None
        try:
            payload = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return payload if isinstance(payload, dict) else None

    def _trial(self, run: Any) -> TrialRun:
        tags = dict(run.data.tags)
        histories = {}
        for key in self.history_metrics:
            if key in run.data.metrics:
                history = self._call("read a metric history", self.client.get_metric_history, run.info.run_id, key)
                points = {}
                for metric in history:
                    points[int(metric.step)] = float(metric.value)
                histories[key] = sorted(points.items())
        return TrialRun(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id,
                        method=tags.get(TAG_METHOD, run.data.params.get("method.name", "?")),
                        phase=tags.get(TAG_PHASE, "?"), trial_id=tags.get(TAG_TRIAL_ID, "?"),
                        status=tags.get(TAG_STATUS, STATUS_RUNNING), run_status=run.info.status,
                        params=dict(run.data.params), tags=tags, metrics=dict(run.data.metrics),
                        histories=histories)

    def _search_all(self, experiment_id: str) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = self._call("search runs", self.client.search_runs, [experiment_id], max_results=PAGE_SIZE,
                              page_token=token)
            runs += list(page)
            token = getattr(page, "token", None)
            if not token:
                return runs

    def _registered_models(self, study: str) -> list[RegisteredModel]:
        try:
            models = self.client.search_registered_models(filter_string=f"name LIKE 'semiseg-{study}-%'")
            found = []
            for model in models:
                versions = self.client.search_model_versions(f"name = '{model.name}'")
                newest = max(versions, key=lambda v: int(v.version), default=None)
                found.append(RegisteredModel(name=model.name, latest_version=str(newest.version) if newest else "-",
                                             run_id=(newest.run_id or "") if newest else ""))
            return sorted(found, key=lambda m: m.name)
        except Exception:  # noqa: BLE001 - a store without a model registry simply has no models to show
            return []

    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any client failure becomes one clear StoreError
            raise StoreError(f"MLflow store {redact_uri(self.tracking_uri)} failed to {action}: "
                             f"{scrub(str(error), self.tracking_uri)}") from None


def check_store(tracking_uri: str) -> None:
    """Check that a store exists (local) or answers ``/health`` (server), without creating one.

    Raises:
        StoreError: naming the missing file or folder, or the server that did not answer.
    """
    parsed = urlparse(tracking_uri)
    shown = redact_uri(tracking_uri)
    if parsed.scheme in ("http", "https"):
        try:
            if not health_request(tracking_uri, HEALTH_TIMEOUT_S):
                raise StoreError(f"MLflow server {shown} answered /health without OK")
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise StoreError(f"MLflow server {shown} does not answer ({scrub(str(error), tracking_uri)})") from None
        return
    local = local_store_path(tracking_uri)
    if local is not None and not local.exists():
        raise StoreError(f"no MLflow store at {local} (from {shown})")


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder of a ``sqlite:///``, ``file:`` or plain-path store; None for other URIs."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0]))
    if tracking_uri.startswith("sqlite:"):
        return None
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(tracking_uri).expanduser()
    return None


def _parent(run: Any) -> ParentRun:
    return ParentRun(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, run_status=run.info.status,
                     start_time=int(run.info.start_time or 0), params=dict(run.data.params),
                     tags=dict(run.data.tags), metrics=dict(run.data.metrics))


def _as_int(text: Any) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None
