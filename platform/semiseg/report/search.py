"""What a study searched: Optuna's parameters and their importances, or the varying params.

Each search of a study is an Optuna study named ``<study>-<phase>-<parent run id>`` in the
study's storage (``sqlite:///<storage-path>/<study>/optuna.db``). A hyperparameter searched
as ``1 - value`` on a log scale (an EMA decay) is named ``search/1-<key>`` there.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from semiseg.report.store import TrialRun, local_store_path

COMPLEMENT_PREFIX = "search/1-"
IGNORED_KEYS = ("train.seed", "data.split_seed")
MIN_COMPLETE_TRIALS = 2
SEARCH_PHASE = "search"
_RUN_SUFFIX = re.compile(r"-(local|[0-9a-f]{32})$")


@dataclass(frozen=True)
class SearchedParam:
    """A searched hyperparameter: its config key and whether it was searched as ``1 - value``."""

    key: str
    complement: bool = False

    @property
    def label(self) -> str:
        """Axis label: ``1 - key`` for complement-searched keys."""
        return f"1 - {self.key}" if self.complement else self.key

    def value(self, trial: TrialRun) -> float | None:
        """The plotted value of this parameter for ``trial`` (None when missing or not numeric)."""
        value = trial.param_float(self.key)
        if value is None:
            return None
        return 1.0 - value if self.complement else value


@dataclass(frozen=True)
class OptunaSearch:
    """One Optuna study of a study's search.

    Attributes:
        name: the Optuna study name.
        phase: the study's phase (``search-<method>``, or ``search`` for one search of all).
        params: the searched parameters.
        complete: trials in state COMPLETE.
        importances: ``parameter label -> importance`` (None when not computable).
        note: why the importances are missing, else empty.
    """

    name: str
    phase: str = SEARCH_PHASE
    params: Sequence[SearchedParam] = ()
    complete: int = 0
    importances: Mapping[str, float] | None = None
    note: str = ""


@dataclass(frozen=True)
class SearchInfo:
    """The searches of a study as read from its Optuna storage.

    Attributes:
        searches: one entry per Optuna study.
        note: why the storage could not be used (empty when it was).
    """

    searches: Sequence[OptunaSearch] = field(default_factory=tuple)
    note: str = ""

    @property
    def params(self) -> list[SearchedParam]:
        """Every searched parameter, once, in first-seen order."""
        return list(dict.fromkeys(p for s in self.searches for p in s.params))


def param_from_optuna(name: str) -> SearchedParam:
    """The config key behind an Optuna parameter name."""
    if name.startswith(COMPLEMENT_PREFIX):
        return SearchedParam(name[len(COMPLEMENT_PREFIX):], complement=True)
    return SearchedParam(name)


def read_searches(storage_url: str | None, study: str, parent_run_id: str | None = None) -> SearchInfo:
    """Read the Optuna studies of ``study`` (those named ``<study>-search...``) and their importances.

    Args:
        storage_url: the Optuna storage (None when the study did not record one).
        study: the study name.
        parent_run_id: prefer the Optuna studies of this invocation (their names end with it).

    Returns:
        The searches, or an empty :class:`SearchInfo` with a note saying why.
    """
    if not storage_url:
        return SearchInfo(note="no Optuna storage recorded for this study (parent tag semiseg.optuna_storage)")
    local = local_store_path(storage_url)
    if local is not None and not local.exists():
        return SearchInfo(note=f"the Optuna storage {storage_url} does not exist here")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(storage_url)
        names = [n for n in optuna.get_all_study_names(storage=storage) if n.startswith(f"{study}-search")]
    except Exception as error:  # noqa: BLE001 - an unreadable storage is an empty state of the report
        return SearchInfo(note=f"cannot read the Optuna storage {storage_url}: {error}")
    mine = [n for n in names if parent_run_id and n.endswith(f"-{parent_run_id}")]
    names = sorted(mine or names)
    if not names:
        return SearchInfo(note=f"no Optuna study named {study}-search... in {storage_url}")
    return SearchInfo(searches=tuple(_read_search(optuna.load_study(study_name=n, storage=storage), study)
                                     for n in names))


def phase_of(optuna_name: str, study: str) -> str:
    """The phase in an Optuna study name ``<study>-<phase>-<parent run id or 'local'>``."""
    rest = optuna_name[len(study) + 1:] if optuna_name.startswith(f"{study}-") else optuna_name
    return _RUN_SUFFIX.sub("", rest) or SEARCH_PHASE


def _read_search(optuna_study, study: str) -> OptunaSearch:
    import optuna

    name = optuna_study.study_name
    phase = phase_of(name, study)
    complete = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = list(dict.fromkeys(k for t in optuna_study.get_trials(deepcopy=False) for k in t.params))
    params = tuple(param_from_optuna(n) for n in names)
    if len(complete) < MIN_COMPLETE_TRIALS:
        return OptunaSearch(name, phase, params, len(complete),
                            note=f"{len(complete)} complete trial(s); importances need at least {MIN_COMPLETE_TRIALS}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(optuna_study)
    except Exception as error:  # noqa: BLE001 - e.g. every trial with the same value
        return OptunaSearch(name, phase, params, len(complete), note=f"importances not computable: {error}")
    importances = {param_from_optuna(k).label: float(v) for k, v in raw.items() if math.isfinite(v)}
    note = "" if importances else "importances not computable (no variation among complete trials)"
    return OptunaSearch(name, phase, params, len(complete), importances or None, note)


def searched_by_method(info: SearchInfo, trials: Sequence[TrialRun]) -> dict[str, list[SearchedParam]]:
    """The parameters each method's search searched.

    From the Optuna storage when it was read (a ``search-<method>`` search belongs to that
    method, a shared ``search`` to every method it sampled); otherwise the numeric params
    that differ between the search trials of each phase.

    Args:
        info: what :func:`read_searches` found.
        trials: every trial of the study.

    Returns:
        ``method -> searched parameters`` (methods without a search are absent).
    """
    by_phase: dict[str, list[TrialRun]] = {}
    for trial in trials:
        if trial.is_search:
            by_phase.setdefault(trial.phase, []).append(trial)
    phases = {s.phase: list(s.params) for s in info.searches} if info.searches else \
        {phase: varying_params(runs) for phase, runs in by_phase.items()}
    result: dict[str, list[SearchedParam]] = {}
    for phase, params in phases.items():
        prefix = f"{SEARCH_PHASE}-"
        methods = [phase[len(prefix):]] if phase.startswith(prefix) else \
            list(dict.fromkeys(t.method for t in by_phase.get(phase, [])))
        for method in methods:
            mine = result.setdefault(method, [])
            mine += [p for p in params if p not in mine]
    return {m: ps for m, ps in result.items() if ps}


def varying_params(trials: Sequence[TrialRun]) -> list[SearchedParam]:
    """Numeric params that differ between ``trials`` (the search trials of one phase)."""
    keys = sorted({k for t in trials for k in t.params} - set(IGNORED_KEYS))
    varying = []
    for key in keys:
        values = {t.params.get(key) for t in trials}
        if len(values) > 1 and all(t.param_float(key) is not None for t in trials if key in t.params):
            varying.append(SearchedParam(key))
    return varying
