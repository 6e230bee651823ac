"""A quiet console: Ray's, Tune's and the libraries' own output goes to the study's log file.

By default a study's console holds only its own lines (the banner, each phase's progress
line, errored trials, the closing report). Everything else goes to ``<study folder>/ray.log``
(:data:`LOG_FILE`, appended to on ``--resume``):

- the log records of Ray and Tune (the ``ray`` logger: Tune's experiment notes, "Experiment
  state snapshotting has been triggered multiple times", the token-authentication warning of a
  local Ray), of Optuna and of MLflow, at INFO and above;
- the output of Ray's worker processes that Ray forwards to the driver (``log_to_driver``: each
  trial's "Checkpoint successfully created", tracebacks at a worker's exit), one line each,
  prefixed ``(actor pid=N)`` as Ray prints them, and the errors Ray publishes to the driver
  ("Raylet is terminated", a worker killed for memory);
- Python warnings raised inside Ray, Optuna and MLflow (semiseg's own warnings stay on stderr);
- MLflow's own prints of its model registry ("Successfully registered model …", "Created
  version …"), the only lines a library prints rather than logs in a study.

With ``--verbose`` the console shows all of it as before and the file gets a copy of the log records.
Tune's new output engine (``RAY_AIR_NEW_OUTPUT``, the "Trial status" tables) ignores the
study's progress reporter; a quiet study turns it off.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TextIO

LOG_FILE = "ray.log"
LIBRARY_LOGGERS = ("ray", "optuna", "mlflow", "alembic")
"""Loggers whose records go to the log file (their children follow them)."""
LIBRARY_PACKAGES = ("ray", "optuna", "mlflow", "alembic", "sqlalchemy", "pyarrow")
"""Packages whose Python warnings go to the log file."""
NEW_OUTPUT_VARIABLE = "RAY_AIR_NEW_OUTPUT"
WORKER_OUTPUT_HANDLER = "semiseg_worker_output"
RAY_WORKER_OUTPUT_HANDLER = "ray_print_logs"
LIBRARY_PRINTS = ("Successfully registered model '", "Created version '", "Registered model '")
"""Starts of the lines MLflow prints to stderr about its model registry."""
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StudyConsole:
    """The console set-up of one study invocation (a context manager that puts everything back on exit).

    Args:
        log_file: the study's log file.
        verbose: show Ray's and Tune's output on the console too (``--verbose``).
    """

    def __init__(self, log_file: Path, verbose: bool = False) -> None:
        self.log_file = Path(log_file)
        self.verbose = verbose
        self._handler: logging.Handler | None = None
        self._saved_loggers: dict[str, tuple[list[logging.Handler], int, bool]] = {}
        self._saved_showwarning = None
        self._saved_new_output: str | None = None
        self._removed_worker_handlers: list[tuple[str, Any]] = []
        self._saved_stderr: TextIO | None = None
        self._saved_error_printer: Callable[..., None] | None = None

    def __enter__(self) -> "StudyConsole":
        _configure_library_loggers()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.log_file, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(_FORMAT))
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved_loggers[name] = (list(logger.handlers), logger.level, logger.propagate)
            logger.handlers = [*(logger.handlers if self.verbose else []), self._handler]
            logger.propagate = False
        self._saved_new_output = os.environ.get(NEW_OUTPUT_VARIABLE)
        if self.verbose:
            os.environ.setdefault(NEW_OUTPUT_VARIABLE, "0")
            return self
        os.environ[NEW_OUTPUT_VARIABLE] = "0"
        self._saved_showwarning = warnings.showwarning
        warnings.showwarning = self._show_warning
        self._saved_stderr = sys.stderr
        sys.stderr = LibraryPrintFilter(sys.stderr, self._write_line)
        return self

    def ray_started(self) -> None:
        """After ``ray.init``: Ray's INFO records (Tune's) to the file, and in a quiet study the
        workers' forwarded output too (``ray.init`` sets the ``ray`` logger's level and handlers)."""
        if self._handler is not None:  # ray.init gave every handler of the ray logger its own format
            self._handler.setFormatter(logging.Formatter(_FORMAT))
        if self.verbose:
            return
        logging.getLogger("ray").setLevel(logging.INFO)
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        self._saved_error_printer = worker.print_to_stdstream  # prints the errors Ray publishes to the driver
        worker.print_to_stdstream = self._write_published_error

        self._removed_worker_handlers = [pair for pair in dispatcher.handlers if pair[0] == RAY_WORKER_OUTPUT_HANDLER]
        dispatcher.remove_handler(RAY_WORKER_OUTPUT_HANDLER)
        dispatcher.remove_handler(WORKER_OUTPUT_HANDLER)
        dispatcher.add_handler(WORKER_OUTPUT_HANDLER, self._write_worker_output)

    def log_exception(self, error: BaseException) -> None:
        """Write ``error``'s traceback to the log file (the console gets one line from the caller)."""
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        logging.getLogger("ray.semiseg").error("study stopped by:\n%s", text.rstrip())

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._saved_showwarning is not None:
            warnings.showwarning = self._saved_showwarning
        if self._saved_stderr is not None:
            sys.stderr = self._saved_stderr
        if self._saved_new_output is None:
            os.environ.pop(NEW_OUTPUT_VARIABLE, None)
        else:
            os.environ[NEW_OUTPUT_VARIABLE] = self._saved_new_output
        for name, (handlers, level, propagate) in self._saved_loggers.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            if name != "ray":  # ray.init/shutdown manage the ray logger's level
                logger.setLevel(level)
        if self._saved_error_printer is not None:
            from ray._private import worker

            worker.print_to_stdstream = self._saved_error_printer
        if not self.verbose:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

            dispatcher.remove_handler(WORKER_OUTPUT_HANDLER)
            for name, handler in self._removed_worker_handlers:
                if not any(pair[0] == name for pair in dispatcher.handlers):
                    dispatcher.add_handler(name, handler)
        if self._handler is not None:
            self._handler.close()

    def _write_worker_output(self, data: dict[str, Any]) -> None:
        """One batch of a worker's forwarded lines, as Ray prints them (``(name pid=N) line``; of the
        autoscaler's, only its events)."""
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        name = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({name + ' ' if name else ''}pid={data.get('pid')}) "
        self._write_line("".join(prefix + line + "\n" for line in lines).rstrip("\n"))

    def _write_published_error(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        """An error Ray published to the driver (a raylet or worker that died): to the log file."""
        self._write_worker_output(data)

    def _write_line(self, text: str) -> None:
        """``text`` (one or more lines) to the log file as it is."""
        stream = self._handler.stream if self._handler is not None else None
        if not text or stream is None or stream.closed:
            return
        stream.write(text + "\n")
        stream.flush()

    def _show_warning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
        """Warnings raised inside a library to the log file; the others as Python shows them."""
        parts = Path(filename).parts
        if any(package in parts for package in LIBRARY_PACKAGES) and "semiseg" not in parts:
            logging.getLogger("ray.semiseg.warnings").warning(
                "%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())
            return
        (self._saved_showwarning or warnings._showwarning_orig)(message, category, filename, lineno, file, line)


class LibraryPrintFilter:
    """``sys.stderr`` that sends the lines of :data:`LIBRARY_PRINTS` to the log file and passes the rest on.

    ``print`` writes its text and its line end in two calls; the line end of a diverted line is
    diverted with it.
    """

    def __init__(self, stream: TextIO, divert: Callable[[str], None]) -> None:
        self._stream, self._divert = stream, divert
        self._divert_line_end = False

    def write(self, text: str) -> int:
        if self._divert_line_end and text == "\n":
            self._divert_line_end = False
            return len(text)
        self._divert_line_end = False
        if text.startswith(LIBRARY_PRINTS):
            self._divert(text.rstrip("\n"))
            self._divert_line_end = not text.endswith("\n")
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _configure_library_loggers() -> None:
    """Let Optuna and MLflow set up their loggers now (they replace the handlers on first use), so that
    the console's handlers set after this stay."""
    try:
        importlib.import_module("mlflow")  # its import configures the mlflow logger
        optuna = importlib.import_module("optuna")
        optuna.logging.get_verbosity()
    except ImportError:  # a study without them fails later with its own message
        pass


def study_log_file(study_dir: Path) -> Path:
    """The log file of the study whose folder is ``study_dir``."""
    return Path(study_dir) / LOG_FILE
