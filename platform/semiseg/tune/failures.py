"""Which errors of a trial are worth a retry, and how a trial that cannot succeed ends at once.

Ray Tune retries a failed trial whatever the error (``FailureConfig(max_failures=2)``), and
Ray Train retries a failed worker group whatever the error. That is right for a lost worker
or node (the process was killed, ran out of memory, its machine went away): the retry
resumes from the last checkpoint. It is wasted work for an error in the trial's own code or
configuration, which recurs on every attempt: a study would run each such trial three times.

Here an error is *deterministic* when it is one of :data:`DETERMINISTIC_ERRORS` (or a
``RuntimeError`` with a tensor shape, size or dtype message, as torch raises for a model that
does not fit its input) and nothing in it is a lost worker (a :class:`ray.exceptions.RayError`
other than a task's own error, or a Ray Train worker-group failure that is not an exception of
the training function). Anything else (``OSError``, ``MemoryError``, CUDA out-of-memory,
collective time-outs and broken connections, unknown errors) keeps its retries.

How a deterministic error ends its trial without a retry (Tune has no per-exception retry
filter, and ``fail_fast`` would stop every trial of the experiment):

1. the trial function catches it (:func:`deterministic_errors_end_the_trial`), reports one
   last result that carries :data:`ERROR_KEY` (the one-line description) and then re-raises
   the original exception;
2. on the driver, :class:`NoRetryOfDeterministicErrors` sees that result (Tune hands a
   trial's results to callbacks before it asks the trial for the next one, so before the
   exception arrives) and sets that trial's ``max_failures`` to 0;
3. Tune then records the exception (the trial's ``error.txt``, state ERROR, the searcher
   told FAIL, the MLflow run FAILED) and does not retry it.

A DDP trial's Ray Train run has ``max_failures=0`` (see :mod:`semiseg.tune.trainables`):
Train cannot tell errors apart, so the retries of a lost DDP worker are Tune's, and each one
resumes the Train run (same name and storage) from its latest checkpoint.

A resumed study (``--resume``) runs an errored trial once more (``resume_errored``), so that
a fixed bug or data file is picked up; a deterministic error then ends it again, once.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

from ray.tune import Callback

from semiseg.data.errors import DatasetError

ERROR_KEY = "semiseg/error"
"""Result key of the last report of a trial that ends with a deterministic error: its description."""

DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NameError, ArithmeticError, AssertionError,
    NotImplementedError,
)
"""Exception types that a retry raises again (``ConfigError`` is a ``ValueError``; ``DatasetError``
and torch's shape errors count too, see :func:`is_deterministic`)."""

_SHAPE_MESSAGE = re.compile(
    r"\bsizes?\b|\bshapes?\b|dimension|channels|dtype|scalar type|should be the same|grad_fn"
    r"|backward through the graph|inplace operation|must match|expected .*input", re.IGNORECASE)
_TRANSIENT_MESSAGE = re.compile(
    r"out of memory|cuda|nccl|gloo|connection|timed out|timeout|broken pipe|peer|socket|dataloader worker"
    r"|shared memory|unexpectedly|killed", re.IGNORECASE)


def is_deterministic(error: BaseException) -> bool:
    """Whether a retry of the trial that raised ``error`` would raise it again.

    Args:
        error: what the trial raised: the exception itself (in the trial), a Tune
            ``RayTaskError`` wrapping it (on the driver), or a Ray Train
            ``TrainingFailedError`` of a DDP trial.

    Returns:
        True when some part of ``error`` is a deterministic error and no part of it is a
        lost worker, node or object (see the module docstring).
    """
    leaves = list(_leaves(error))
    if any(_is_lost_worker(leaf) for leaf in leaves):
        return False
    return any(_is_deterministic_leaf(leaf) for leaf in leaves)


def describe_error(error: BaseException | None) -> str:
    """``Type: first line of the message`` of the error a trial raised (unwrapped), one line."""
    if error is None:
        return ""
    leaves = list(_leaves(error))
    chosen = next((leaf for leaf in leaves if _is_deterministic_leaf(leaf)), leaves[0] if leaves else error)
    if _is_wrapper(chosen):
        text = str(chosen).strip().splitlines()
        return _one_line(text[-1] if text else type(chosen).__name__)
    message = str(chosen).strip().splitlines()
    return _one_line(f"{type(chosen).__name__}: {message[0]}" if message else type(chosen).__name__)


@contextlib.contextmanager
def deterministic_errors_end_the_trial(metric: str) -> Iterator[None]:
    """Inside a Tune trial function: a deterministic error is reported once, then re-raised.

    Args:
        metric: the study's metric; Tune checks that every result carries it (NaN here).
    """
    try:
        yield
    except Exception as error:
        if is_deterministic(error):
            from ray import tune

            try:
                tune.report({metric: float("nan"), ERROR_KEY: describe_error(error)})
            except Exception as report_error:  # noqa: BLE001 - the trial's own error is the one to raise
                logging.getLogger(__name__).warning("could not report %s: %s", ERROR_KEY, report_error)
        raise


class NoRetryOfDeterministicErrors(Callback):
    """Tune callback: a trial that reported :data:`ERROR_KEY` is not retried when it fails.

    A trial's ``max_failures`` is put back to ``max_failures`` whenever it starts, so that a
    resumed errored trial keeps its retries for lost workers.

    Args:
        max_failures: the experiment's ``FailureConfig.max_failures``.
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.errors: dict[str, str] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        """A (re)started trial has the experiment's retries."""
        trial.max_failures = self.max_failures

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        """Remember the error and take the trial's retries away."""
        if result.get(ERROR_KEY):
            self.errors[trial.trial_id] = str(result[ERROR_KEY])
            trial.max_failures = 0


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _is_wrapper(error: BaseException) -> bool:
    """A Ray exception that only carries another one (a task's error, a Train worker's error)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"RayTaskError", "WorkerGroupError", "UserExceptionWithTraceback",
                         "WorkerHealthCheckFailedError"})


def _leaves(error: BaseException, depth: int = 0) -> Iterator[BaseException]:
    """The exceptions ``error`` is made of: Ray's wrappers opened, explicit causes followed."""
    if depth > 8:
        return
    inner: list[BaseException] = []
    names = {cls.__name__ for cls in type(error).__mro__}
    if "RayTaskError" in names and isinstance(getattr(error, "cause", None), BaseException):
        inner.append(error.cause)
    if "WorkerGroupError" in names:
        inner += [e for e in (getattr(error, "worker_failures", None) or {}).values() if isinstance(e, BaseException)]
    if "UserExceptionWithTraceback" in names and isinstance(getattr(error, "_base_exc", None), BaseException):
        inner.append(error._base_exc)
    if "WorkerHealthCheckFailedError" in names and isinstance(getattr(error, "health_check_failure", None),
                                                                BaseException):
        inner.append(error.health_check_failure)
    if not inner or not _is_wrapper(error):
        yield error
    for item in inner:
        yield from _leaves(item, depth + 1)
    if isinstance(error.__cause__, BaseException) and not _is_wrapper(error):
        yield from _leaves(error.__cause__, depth + 1)


def _is_lost_worker(error: BaseException) -> bool:
    """A Ray system error (a dead actor, worker, node, lost object, OOM kill) or a Train failure
    that is not the training function's own exception (a health check, a start-up time-out)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if "RayTaskError" in names:
        return False
    if "RayError" in names:
        return True
    return "RayTrainError" in names and not _is_wrapper(error)


def _is_deterministic_leaf(error: BaseException) -> bool:
    if _is_wrapper(error) or _is_lost_worker(error):
        return False
    names = {cls.__name__ for cls in type(error).__mro__}
    if "OutOfMemoryError" in names:
        return False
    if isinstance(error, (*DETERMINISTIC_ERRORS, DatasetError)):
        return True
    if isinstance(error, RuntimeError):
        message = str(error)
        return not _TRANSIENT_MESSAGE.search(message) and bool(_SHAPE_MESSAGE.search(message))
    return False
