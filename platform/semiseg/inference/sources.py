"""Where ``semiseg-predict --model`` finds its model bundles.

``--model`` is one of:

- a study folder ``<state_dir>/<study>`` (the folder holding ``models/index.json``), or the state
  folder above it when that holds exactly one study: the best model of ``--method`` (without it:
  of the method whose best model has the highest validation Dice), or with ``--ensemble`` every
  model of that method's final phase (its seeds and labelled splits);
- ``runs:/<run_id>`` (or ``runs:/<run_id>/<artifact path>``; default :data:`RUN_ARTIFACT`): the
  bundle logged with an MLflow run;
- ``models:/<name>/<version>`` or ``models:/<name>@<alias>``: a registered model version, whose
  run holds the bundle;
- a ``model.pt`` file (or a folder holding one).

The index of a study (written when the study exports its models) is
``{"study", "best": {"<method>": "<path>"}, "models": [{"path", "method", "group", "phase",
"seed", "split", "val_dice"}, ...]}`` with paths relative to the study folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from semiseg.inference.bundle import ModelBundle, load_bundle
from semiseg.tracking import scrub

INDEX_FILE = Path("models") / "index.json"
"""A study's model index, relative to the study folder."""

BUNDLE_FILE = "model.pt"
"""The file name of a bundle."""

RUN_ARTIFACT = "semiseg_model/model.pt"
"""The artifact path of the bundle in an MLflow run."""

FINAL_PHASE = "final"
"""The ``phase`` of the models trained by a study's final phase."""

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
"""The environment variable read when ``--tracking-uri`` is not given."""

DOWNLOAD_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
"""MLflow's switch of its download progress bar."""


class ModelSourceError(ValueError):
    """``--model`` names nothing usable; the message says what and why, on one line."""


ResolvedModel = Path | ModelBundle
"""A bundle file to read, or a bundle already read (downloaded from MLflow)."""


def resolve_model(model: str, method: str | None = None, ensemble: bool = False,
                  tracking_uri: str | None = None) -> list[ResolvedModel]:
    """The bundles ``--model`` names (see the module docstring).

    Args:
        model: A study folder, a state folder with one study, ``runs:/...``, ``models:/...`` or a bundle file.
        method: For a study: the method whose models to use (default: the best one's).
        ensemble: For a study: every final-phase model of the method instead of its best model.
        tracking_uri: MLflow tracking URI for ``runs:/`` and ``models:/`` (default: ``$MLFLOW_TRACKING_URI``).

    Returns:
        Bundle paths (study folders, files) or bundles read from MLflow, at least one.

    Raises:
        ModelSourceError: Nothing usable (the message names ``model`` and the problem).
    """
    if model.startswith(("runs:/", "models:/")):
        if method is not None or ensemble:
            raise ModelSourceError(f"--method and --ensemble choose among a study's models; {model} is one model")
        return [_mlflow_bundle(model, _tracking_uri(model, tracking_uri))]
    path = Path(model).expanduser()
    if path.is_file():
        _single_model_options(path, method, ensemble)
        return [path]
    if not path.is_dir():
        raise ModelSourceError(f"--model {model}: no such file or folder (expected a study folder, "
                               "a model.pt file, runs:/<run id> or models:/<name>/<version>)")
    study = _study_folder(path)
    if study is None:
        if (path / BUNDLE_FILE).is_file():
            _single_model_options(path / BUNDLE_FILE, method, ensemble)
            return [path / BUNDLE_FILE]
        raise ModelSourceError(f"--model {model}: the folder holds no {INDEX_FILE.as_posix()}, no study folder "
                               f"with one and no {BUNDLE_FILE} (a study writes its index when it finishes)")
    return study_models(study, method, ensemble)


def study_models(study: Path, method: str | None = None, ensemble: bool = False) -> list[Path]:
    """The bundle files of a study folder: the best model of ``method``, or its final-phase models.

    Raises:
        ModelSourceError: An unreadable index, an unknown method, an ensemble without a final phase,
            or a listed file that is missing.
    """
    index = read_index(study)
    chosen = method if method is not None else best_method(index, study)
    if chosen not in index["best"] and not any(entry.get("method") == chosen for entry in index["models"]):
        raise ModelSourceError(f"study {study}: no model of method {chosen!r}; "
                               f"its methods: {', '.join(sorted(index['best'])) or 'none'}")
    if ensemble:
        entries = [entry for entry in index["models"]
                   if entry.get("method") == chosen and entry.get("phase") == FINAL_PHASE]
        if not entries:
            raise ModelSourceError(f"study {study}: this study's final phase did not run for {chosen} "
                                   "(no final-phase models in its index); predict with its best model "
                                   "(without --ensemble) or run the study's final phase")
        entries.sort(key=lambda entry: (_sort_key(entry.get("split")), _sort_key(entry.get("seed"))))
        paths = [study / entry["path"] for entry in entries]
    else:
        if chosen not in index["best"]:
            raise ModelSourceError(f"study {study}: its index names no best model for {chosen!r}")
        paths = [study / index["best"][chosen]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ModelSourceError(f"study {study}: model file(s) listed in {INDEX_FILE.as_posix()} are missing: "
                               + ", ".join(missing))
    return paths


def read_index(study: Path) -> dict[str, Any]:
    """A study's ``models/index.json``, checked for the keys :func:`study_models` reads.

    Raises:
        ModelSourceError: The file is missing, not JSON or lacks ``best``/``models`` or an entry's ``path``.
    """
    file = study / INDEX_FILE
    try:
        index = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelSourceError(f"{file} does not exist") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"{file} is not a readable JSON model index ({error})") from error
    if not isinstance(index, dict) or not isinstance(index.get("best"), dict) \
            or not isinstance(index.get("models"), list):
        raise ModelSourceError(f"{file} is not a model index: it needs a 'best' mapping and a 'models' list")
    for position, entry in enumerate(index["models"]):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ModelSourceError(f"{file}: models[{position}] has no 'path'")
    return index


def best_method(index: dict[str, Any], study: Path) -> str:
    """The method whose best model has the highest validation Dice (ties: the first name in order).

    Raises:
        ModelSourceError: The index names no best model.
    """
    if not index["best"]:
        raise ModelSourceError(f"{study / INDEX_FILE}: names no best model")
    dice = {entry["path"]: entry.get("val_dice") for entry in index["models"]}

    def score(method: str) -> float:
        value = dice.get(index["best"][method])
        return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else -math.inf

    return max(sorted(index["best"]), key=score)


def _study_folder(path: Path) -> Path | None:
    """``path`` if it holds a study index; the single study under it if it is a state folder; else None.

    Raises:
        ModelSourceError: A state folder with several studies (the message lists them).
    """
    if (path / INDEX_FILE).is_file():
        return path
    studies = sorted(child for child in path.iterdir() if child.is_dir() and (child / INDEX_FILE).is_file())
    if len(studies) > 1:
        raise ModelSourceError(f"--model {path} holds several studies ({', '.join(s.name for s in studies)}); "
                               "pass one of their folders")
    return studies[0] if studies else None


def _single_model_options(path: Path, method: str | None, ensemble: bool) -> None:
    if method is not None or ensemble:
        raise ModelSourceError(f"--method and --ensemble choose among a study's models; {path} is one model file")


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _tracking_uri(model: str, tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV)
    if not uri:
        raise ModelSourceError(f"--model {model} needs an MLflow tracking URI: pass --tracking-uri "
                               f"or set {TRACKING_URI_ENV}")
    return uri


def _mlflow_bundle(model: str, tracking_uri: str) -> ModelBundle:
    """Download the bundle of a ``runs:/`` or ``models:/`` URI and read it.

    Raises:
        ModelSourceError: A malformed URI, an unknown run, model, version or alias, or a run without the bundle.
    """
    from mlflow.exceptions import MlflowException

    try:
        if model.startswith("runs:/"):
            run_id, artifact = _run_artifact(model)
            return _download_bundle(run_id, artifact, tracking_uri, f"runs:/{run_id}/{artifact}")
        return _download_bundle(_registered_run(model, tracking_uri), RUN_ARTIFACT, tracking_uri, model)
    except MlflowException as error:
        message = scrub(str(error).splitlines()[0] if str(error) else type(error).__name__, tracking_uri)
        raise ModelSourceError(f"--model {model}: {message}") from None


def _run_artifact(model: str) -> tuple[str, str]:
    """``(run_id, artifact path)`` of ``runs:/<run_id>[/<path>]``."""
    run_id, _, artifact = model[len("runs:/"):].strip("/").partition("/")
    if not run_id:
        raise ModelSourceError(f"--model {model}: expected runs:/<run id> or runs:/<run id>/<artifact path>")
    return run_id, artifact or RUN_ARTIFACT


def _registered_run(model: str, tracking_uri: str) -> str:
    """The run that produced the registered model version ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    from mlflow.tracking import MlflowClient

    reference = model[len("models:/"):].strip("/")
    client = MlflowClient(tracking_uri=tracking_uri)
    if "@" in reference:
        name, _, alias = reference.partition("@")
        if not name or not alias or "/" in alias:
            raise ModelSourceError(f"--model {model}: expected models:/<name>@<alias>")
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = reference.rpartition("/")
        if not name or not number.isdigit():
            raise ModelSourceError(f"--model {model}: expected models:/<name>/<version number> "
                                   "or models:/<name>@<alias>")
        version = client.get_model_version(name, number)
    if not version.run_id:
        raise ModelSourceError(f"--model {model}: the model version names no MLflow run, so its bundle "
                               f"({RUN_ARTIFACT}) cannot be found")
    return str(version.run_id)


def _download_bundle(run_id: str, artifact: str, tracking_uri: str, model: str) -> ModelBundle:
    """Read the bundle at ``artifact`` (a file, or a folder holding ``model.pt``) of run ``run_id``,
    through a temporary folder; ``model`` names it in messages and as the bundle's source."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="semiseg-model-") as folder, _without_download_bar():
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                             dst_path=folder, tracking_uri=tracking_uri))
        except (MlflowException, OSError) as error:
            message = scrub(str(error).splitlines()[0] if str(error) else type(error).__name__, tracking_uri)
            raise ModelSourceError(f"--model {model}: cannot download {artifact} of run {run_id}: {message}") from None
        if local.is_dir():
            local = local / BUNDLE_FILE
        if not local.is_file():
            raise ModelSourceError(f"--model {model}: run {run_id} has no bundle at {artifact}")
        return load_bundle(local, source=model)


@contextlib.contextmanager
def _without_download_bar() -> Iterator[None]:
    """MLflow's artifact download progress bar off while inside (it would interleave with the cases' progress)."""
    previous = os.environ.get(DOWNLOAD_BAR_ENV)
    os.environ[DOWNLOAD_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DOWNLOAD_BAR_ENV, None)
        else:
            os.environ[DOWNLOAD_BAR_ENV] = previous


def load_resolved(resolved: Sequence[ResolvedModel]) -> list[ModelBundle]:
    """The bundles of :func:`resolve_model`'s answer (files read now, downloaded bundles as they are).

    Raises:
        ValueError: A file that is not a bundle (see :func:`load_bundle`).
    """
    return [item if isinstance(item, ModelBundle) else load_bundle(item) for item in resolved]
