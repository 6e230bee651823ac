"""MLflow tracking: experiments, the study's parent run, one child run per trial.

Metric and tag names are defined here and used everywhere else.

Logging happens in the study driver, from a Ray Tune callback, not inside trials: the
driver receives every rank-0 report anyway, a single writer keeps a SQLite store free of
"database is locked" errors when many trials finish at once, and a resumed or retried
trial finds its existing child run by the ``semiseg.trial_id`` tag instead of opening a
duplicate. An unreachable tracking server produces one warning; the study goes on and
its results stay in Ray's storage.

The one exception is a trial's system metrics (CPU, memory, disk, network, and GPU with
``nvidia-ml-py`` on an NVIDIA machine): they describe the machine the trial runs on, so the
trial process samples them (:func:`system_metrics`, MLflow's ``SystemMetricsMonitor``) and
writes one small batch per sampling interval (:data:`SYSTEM_METRICS_INTERVAL_S`) to the run
the driver opened for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

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
LOGGED_METRIC_PREFIXES = ("train/", "val/", "test/", "time/", "val_postprocessed/", "test_postprocessed/",
                          "postprocessing/")
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
TAG_CACHE_KEY = "semiseg.cache_key"
"""Tag of a trial's dataset input: the full key of the preprocessed cache it trained on."""
TAG_SPLIT = "semiseg.split"
"""Tag of a trial's dataset input: which split of the dataset (``data.split``, and its splits file)."""
TAG_DATASET_CONTEXT = "mlflow.data.context"
DATASET_CONTEXT_TRAINING = "training"
DATASET_TABLE_ARTIFACT = "dataset/cases.json"
"""The trial's cases and their roles, as an MLflow table artifact (one row per case id)."""
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_MODEL_DEVELOPMENT = "custom_model_development"
"""The kind MLflow's UI shows as "Machine learning" (runs table first), not a GenAI project."""
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
"""MLflow 3.17's UI takes the kind of its pages from a workflow type kept in the browser (GenAI by
default), not from the experiment's tag; this query of a UI URL selects machine learning."""
SYSTEM_METRIC_PREFIX = "system/"
SYSTEM_METRICS_INTERVAL_S = 10.0
"""Seconds between two samples of a trial's system metrics (``SEMISEG_SYSTEM_METRICS_INTERVAL`` overrides)."""
SYSTEM_METRICS_INTERVAL_ENV = "SEMISEG_SYSTEM_METRICS_INTERVAL"
ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
CONFIG_ARTIFACT = "config.json"
MAX_PARAMS_PER_BATCH = 100
REDACTED = "***"
_SECRET_QUERY_KEY = re.compile(r"pass|pwd|secret|token|key|credential|auth|signature|sig$|sas|odbc_connect", re.I)
_MIN_SCRUBBED_LENGTH = 3
_SUPPRESS_RUN_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
_KNOWN_URIS: dict[str, str] = {}
"""Redacted URI -> the URI with its secrets, for Trackers unpickled in this process (see ``__setstate__``)."""

HTTP_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "mysql", "sqlite", "mssql")
"""MLflow's ``DATABASE_ENGINES``: SQLAlchemy stores, each also as ``<engine>+<driver>``."""
TRACKING_SCHEMES = ("file", *HTTP_SCHEMES, "databricks", *DATABASE_SCHEMES)
"""The tracking-store schemes MLflow 3 accepts besides plain paths (plugins add theirs by entry point)."""
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "pyodbc": "pyodbc", "pymssql": "pymssql", "pg8000": "pg8000",
                   "mysql": "mysql-connector-python", "mariadb": "mariadb", "asyncpg": "asyncpg"}
"""pip package of a database driver module SQLAlchemy imports."""


def redact_uri(uri: str | None) -> str:
    """``uri`` with its secrets replaced by ``***``, safe to print, log, write or send to MLflow.

    The password of the userinfo (``http://user:***@host``, ``postgresql://user:***@host/db``); a
    userinfo without a password, which is usually a token, as a whole (``https://***@host``); and the
    values of query parameters named like a secret (``?password=***``, ``token=``, ``sig=``,
    ``odbc_connect=``...). Plain paths and URIs without secrets come back unchanged.
    """
    if not uri:
        return uri or ""
    from urllib.parse import unquote, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return REDACTED if "@" in uri else uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if colon else f"{REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            key, equals, _ = pair.partition("=")
            pairs.append(f"{key}={REDACTED}" if equals and _SECRET_QUERY_KEY.search(unquote(key)) else pair)
        query = "&".join(pairs)
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def uri_secrets(uri: str | None) -> list[str]:
    """The secret parts of ``uri`` as written and percent-decoded (what :func:`redact_uri` hides)."""
    if not uri:
        return []
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return []
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    for pair in parts.query.split("&") if parts.query else []:
        key, equals, value = pair.partition("=")
        if equals and _SECRET_QUERY_KEY.search(unquote(key)):
            found.append(value)
    secrets = {text for value in found for text in (value, unquote(value), unquote(value.replace("+", " ")))}
    return sorted((s for s in secrets if s), key=len, reverse=True)


def scrub(text: str, *uris: str | None) -> str:
    """``text`` (e.g. an error message) with every secret of ``uris`` replaced by ``***``.

    Secrets shorter than 3 characters are only hidden as part of the whole URI.
    """
    for uri in uris:
        if not uri:
            continue
        text = text.replace(uri, redact_uri(uri))
        for secret in uri_secrets(uri):
            if len(secret) >= _MIN_SCRUBBED_LENGTH:
                text = text.replace(secret, REDACTED)
    return text


@contextlib.contextmanager
def quiet_run_links(uri: str | None) -> Iterator[None]:
    """While inside, MLflow does not print its "View run ... at: <URI>/#/..." links if ``uri`` has secrets.

    MLflow's client prints them when a run on a server ends, with the tracking URI as given,
    credentials included (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``, read at each call, turns
    them off).
    """
    if not uri or redact_uri(uri) == uri:
        yield
        return
    previous = os.environ.get(_SUPPRESS_RUN_LINKS)
    os.environ[_SUPPRESS_RUN_LINKS] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_SUPPRESS_RUN_LINKS, None)
        else:
            os.environ[_SUPPRESS_RUN_LINKS] = previous


def check_tracking_uri(uri: str | None) -> None:
    """Refuse a tracking URI MLflow cannot use, on the driver before anything starts.

    A scheme MLflow does not know, or a database whose SQLAlchemy driver is not importable, is
    a configuration mistake. A server that does not answer is not checked here: it keeps the
    study going with one warning (:meth:`Tracker.reachable`).

    Raises:
        ConfigError: naming the (redacted) URI and the allowed schemes or the package to install.
    """
    from urllib.parse import urlsplit

    from semiseg.config import ConfigError

    if uri is None:
        return
    shown = redact_uri(uri)
    if not uri.strip():
        raise ConfigError("--tracking-uri is empty; give an MLflow URI or leave the flag out")
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as error:
        raise ConfigError(f"--tracking-uri {shown} is not a valid URI ({scrub(str(error), uri)})") from None
    if scheme == "" or (len(scheme) == 1 and scheme.isalpha()):
        return
    engine = scheme.split("+", 1)[0]
    plugins = _tracking_store_plugins()
    if scheme in plugins:
        return
    if scheme not in TRACKING_SCHEMES and not (engine in DATABASE_SCHEMES and scheme.count("+") == 1):
        allowed = ", ".join([*TRACKING_SCHEMES, *sorted(plugins)])
        raise ConfigError(f"--tracking-uri {shown}: MLflow has no tracking store for the scheme {scheme!r}; "
                          f"use a local path or one of {allowed} (databases also as <engine>+<driver>)")
    if engine in DATABASE_SCHEMES:
        _check_database_driver(uri, shown)


def _tracking_store_plugins() -> set[str]:
    """Schemes that installed MLflow plugins register (entry point group ``mlflow.tracking_store``)."""
    from importlib.metadata import entry_points

    return {entry.name.lower() for entry in entry_points(group="mlflow.tracking_store")}


def _check_database_driver(uri: str, shown: str) -> None:
    """The SQLAlchemy dialect of ``uri`` and its driver module import (what MLflow's store will need)."""
    from semiseg.config import ConfigError

    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    except ImportError:
        raise ConfigError(f"--tracking-uri {shown}: a database store needs sqlalchemy (pip install sqlalchemy)"
                          ) from None
    try:
        dialect = make_url(uri).get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"--tracking-uri {shown}: SQLAlchemy knows no driver {uri.split(':', 1)[0]!r}") from None
    except (ArgumentError, ValueError) as error:
        raise ConfigError(f"--tracking-uri {shown} is not a valid database URL ({scrub(str(error), uri)})"
                          ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = (getattr(error, "name", None) or dialect.driver).split(".", 1)[0]
        package = DRIVER_PACKAGES.get(module, module)
        raise ConfigError(f"--tracking-uri {shown}: the database driver {module} of {dialect.name}+{dialect.driver} "
                          f"is not installed ({error}); install it (pip install {package}) or name an installed "
                          f"driver in the scheme ({dialect.name}+<driver>://...)") from None


def default_tracking_uri(runs_root: Path) -> str:
    """SQLite store under the runs folder, as an absolute URI (Ray changes workers' cwd)."""
    return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def venv_executable(name: str) -> str:
    """``name`` beside this Python (the virtual environment's) when it is there, else ``name`` (on PATH):
    a printed hint then works without an activated environment."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def mlflow_ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The command that opens the MLflow UI on a store, bound to loopback only (secrets as ``***``).

    A local store gets the virtual environment's ``mlflow`` (:func:`venv_executable`), so the
    command works as printed without an activated environment; a server is opened in a browser.
    """
    import shlex

    shown = redact_uri(tracking_uri)
    if tracking_uri.startswith(HTTP_SCHEMES):
        return f"open {shown}"
    return shlex.join([venv_executable("mlflow"), "ui", "--backend-store-uri", shown, "--host", "127.0.0.1",
                       "--port", str(port)])


def mlflow_ui_url(tracking_uri: str, experiment_id: str | None, port: int = 5000) -> str:
    """The UI page of an experiment's runs (``.../#/experiments/<id>/runs``), never with credentials.

    On a server, its own address (with its path prefix, without a ``user:password@``: the browser
    asks for them, and the query, which may hold secrets); on a local store, the loopback address of
    :func:`mlflow_ui_command` on ``port``. The query selects MLflow 3.17's machine-learning pages
    (:data:`UI_WORKFLOW_QUERY`). Without an experiment (tracking was off), the UI's home page.
    """
    if tracking_uri.startswith(HTTP_SCHEMES):
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(tracking_uri)
        base = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
    else:
        base = f"http://127.0.0.1:{port}"
    if experiment_id is None:
        return f"{base}/"
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW_QUERY}"


def mlflow_ui_hint(tracking_uri: str, experiment_id: str | None, port: int = 5000) -> str:
    """What to run to see a study in MLflow's UI, as printed: the command, then the experiment's runs page.

    A server needs no command: the hint is ``open <its runs page>``.
    """
    url = mlflow_ui_url(tracking_uri, experiment_id, port)
    if tracking_uri.startswith(HTTP_SCHEMES):
        return f"open {url}"
    return f"{mlflow_ui_command(tracking_uri, port)}\n  then open {url}"


def health_request(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    """Whether the ``http(s)://`` MLflow server of ``tracking_uri`` answers ``/health`` with 200.

    Authenticates as MLflow's REST client does: MLflow hands the whole URI to ``requests``, which
    sends a userinfo ``user:password@`` as HTTP Basic auth (over MLflow's own header); otherwise
    MLflow sends ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (or its credentials file) as Basic
    auth, or ``MLFLOW_TRACKING_TOKEN`` as a Bearer token. The requested URL never carries the
    userinfo (urllib cannot parse it). TLS follows ``MLFLOW_TRACKING_INSECURE_TLS`` and
    ``MLFLOW_TRACKING_SERVER_CERT_PATH``.

    Raises:
        OSError: the server does not answer (``urllib.error.URLError``, timeouts), or answers an
            HTTP error status (``urllib.error.HTTPError``, e.g. 401 for refused credentials).
    """
    import base64
    import ssl
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    from mlflow.utils.credentials import get_default_host_creds

    parts = urlsplit(tracking_uri)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    url = urlunsplit((parts.scheme, hostport, f"{parts.path.rstrip('/')}/health", "", ""))
    creds = get_default_host_creds(url)
    user, colon, password = userinfo.partition(":")
    headers = {}
    if at and colon:
        basic = (unquote(user), unquote(password))
    else:
        basic = (creds.username, creds.password) if creds.username and creds.password else None
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    elif creds.token:
        headers["Authorization"] = f"Bearer {creds.token}"
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=creds.server_cert_path or None)
        if creds.ignore_tls_verification:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
        return response.status == 200


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
        if redact_uri(tracking_uri) != tracking_uri:
            _KNOWN_URIS[redact_uri(tracking_uri)] = tracking_uri

    @property
    def display_uri(self) -> str:
        """The tracking URI with its secrets as ``***`` (for messages)."""
        return redact_uri(self.tracking_uri)

    def __getstate__(self) -> dict:
        """Pickle without the client and without the URI's secrets.

        Tune pickles callbacks, and so this tracker, into ``tuner.pkl`` in the study's storage.
        A tracker unpickled in a process that built one with the full URI (a resumed study: the
        URI comes from the command line again) gets the secrets back in :meth:`__setstate__`.
        """
        state = dict(self.__dict__)
        state["_client"] = None
        state["tracking_uri"] = redact_uri(self.tracking_uri)
        return state

    def __setstate__(self, state: dict) -> None:
        """Restore, with the full URI when this process knows it."""
        self.__dict__.update(state)
        self.tracking_uri = _KNOWN_URIS.get(self.tracking_uri, self.tracking_uri)

    def reachable(self, timeout_s: float = 5.0) -> bool:
        """For an ``http(s)://`` store, whether its ``/health`` answers within ``timeout_s``.

        A store that does not answer disables tracking with one warning now, instead of
        every later call waiting through MLflow's retries.
        """
        if not self.enabled or not self.tracking_uri.startswith(("http://", "https://")):
            return self.enabled
        try:
            ok = health_request(self.tracking_uri, timeout_s)
        except (OSError, ValueError) as error:
            ok, reason = False, error
        else:
            reason = "no OK from /health"
        if not ok:
            self.enabled = False
            warnings.warn(f"MLflow at {self.display_uri} is unreachable ({scrub(str(reason), self.tracking_uri)}); "
                          "tracking is off for this study, results stay in Ray's storage", RuntimeWarning,
                          stacklevel=2)
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
            with quiet_run_links(self.tracking_uri):
                return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracking failure must not stop the study
            if _is_rejected_request(error):
                warnings.warn(f"MLflow at {self.display_uri} rejected a request to {action} "
                              f"({scrub(str(error), self.tracking_uri)})", RuntimeWarning, stacklevel=2)
                return None
            self.enabled = False
            warnings.warn(f"MLflow at {self.display_uri} failed while trying to {action} "
                          f"({scrub(str(error), self.tracking_uri)}); "
                          "tracking is off for the rest of this study, results stay in Ray's storage",
                          RuntimeWarning, stacklevel=2)
            return None

    def experiment_id(self, name: str) -> str | None:
        """Id of the experiment ``name``, created if missing, tagged as model development.

        The tag (:data:`TAG_EXPERIMENT_KIND`) makes MLflow's UI treat it as machine learning, not
        as a GenAI project; an experiment of an older study without the tag gets it now.
        """
        kind = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_MODEL_DEVELOPMENT}

        def get_or_create() -> str:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                if TAG_EXPERIMENT_KIND not in experiment.tags:
                    self.client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND,
                                                   EXPERIMENT_KIND_MODEL_DEVELOPMENT)
                return experiment.experiment_id
            location = None
            if self.artifact_root is not None and not self.tracking_uri.startswith(("http://", "https://")):
                location = (self.artifact_root / name).resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location, tags=kind)

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

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Store the file ``path`` as an artifact of the run (under the folder ``artifact_path`` when given)."""
        self._guard("log an artifact", lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_dataset(self, run_id: str, name: str, source: str, digest: str, cases: Mapping[str, list[str]],
                    tags: Mapping[str, str]) -> None:
        """Log a dataset as an input of the run, and its rows as the table :data:`DATASET_TABLE_ARTIFACT`.

        Args:
            run_id: the run.
            name, source, digest: what MLflow's UI shows of the dataset (digest: at most 36 characters).
            cases: the table, column name -> values (e.g. ``case_id`` and ``role``).
            tags: tags of the input besides its context (:data:`DATASET_CONTEXT_TRAINING`).
        """
        def log() -> None:
            import mlflow.data
            import pandas as pd
            from mlflow.entities import DatasetInput, InputTag

            table = pd.DataFrame(dict(cases))
            with warnings.catch_warnings():
                # MLflow registers local folders under two schemes and says so on each resolution
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                dataset = mlflow.data.from_pandas(table, source=source, name=name, digest=digest)
            input_tags = [InputTag(TAG_DATASET_CONTEXT, DATASET_CONTEXT_TRAINING),
                          *(InputTag(key, str(value)) for key, value in tags.items())]
            self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=input_tags)])
            self.client.log_table(run_id, table, DATASET_TABLE_ARTIFACT)

        self._guard("log the dataset", log)

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


def system_metrics_interval() -> float:
    """Seconds between samples of a trial's system metrics: ``$SEMISEG_SYSTEM_METRICS_INTERVAL`` or 10.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    from semiseg.config import ConfigError

    text = os.environ.get(SYSTEM_METRICS_INTERVAL_ENV, "").strip()
    if not text:
        return SYSTEM_METRICS_INTERVAL_S
    try:
        interval = float(text)
    except ValueError:
        interval = math.nan
    if not (math.isfinite(interval) and interval > 0):
        raise ConfigError(f"{SYSTEM_METRICS_INTERVAL_ENV}={text!r}: give the seconds between samples "
                          "as a positive number")
    return interval


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S,
                   node: str | None = None) -> Iterator[None]:
    """While inside, this machine's CPU, memory, disk, network (and NVIDIA GPU) go to the run as ``system/*``.

    MLflow's ``SystemMetricsMonitor`` samples every ``interval_s`` seconds in a thread and logs
    each sample at the next step of the run's system metrics (a retried trial continues its
    steps). On leaving, the thread is stopped and joined (a reused trial process keeps none)
    and one last sample, of the time since the previous one, is logged, so a trial shorter
    than the interval still has its values. Utilisations are the whole machine's, as MLflow
    measures them (trials sharing a machine see each other). GPU metrics need ``nvidia-ml-py``
    and an NVIDIA driver; CPU and memory need ``psutil``. Monitoring is best effort: a failure
    to start it, or to log, is a warning in the log and never stops the caller.

    Args:
        run_id: the MLflow run.
        tracking_uri: its store (with its secrets: this process writes to it).
        interval_s: seconds between samples.
        node: a name for this machine when several log to one run (``system/<node>/...``).
    """
    monitor = _start_monitor(run_id, tracking_uri, interval_s, node)
    try:
        yield
    finally:
        if monitor is not None:
            _finish_monitor(monitor, tracking_uri)


def _start_monitor(run_id: str, tracking_uri: str, interval_s: float, node: str | None):
    """A started ``SystemMetricsMonitor``, or None (logged) when MLflow cannot monitor here."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=True, node_id=node, tracking_uri=tracking_uri)
    except Exception as error:  # noqa: BLE001 - system metrics never stop a trial
        log.warning("no system metrics for run %s: %s", run_id, scrub(str(error), tracking_uri))
        return None
    monitor.start()
    return monitor


def _finish_monitor(monitor: Any, tracking_uri: str) -> None:
    """Stop and join the monitor's thread, then log one sample of the time since its last one."""
    monitor.finish()
    try:
        for sampler in monitor.monitors:
            sampler.clear_metrics()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as error:  # noqa: BLE001 - the last sample is not worth failing a trial
        log.warning("the last system metrics sample was not logged: %s", scrub(str(error), tracking_uri))
