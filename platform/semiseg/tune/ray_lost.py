"""When Ray itself stops under a study: one line that says so and the command that resumes it.

Two ways Ray's death reaches a study:

- an exception out of Tune's loop that is Ray's own, not a trial's: an actor or node that
  died, the GCS unreachable (:func:`ray_lost_reason` tells them from other errors);
  :func:`semiseg.tune.phases.fit_phase` turns it into :class:`RayLostError`;
- a local Ray whose GCS or raylet process exits: the driver would wait about a minute for the GCS
  and then be ended by Ray's core worker, with no word from the study. :class:`LocalRayWatch`
  checks those processes every second and ends the study at once, with the line and the
  remaining processes of that Ray stopped.

Either way the study exits with :data:`EXIT_RAY_LOST`; the traceback goes to the study's log
file, the finished trials and checkpoints stay, and ``--resume`` continues.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

EXIT_RAY_LOST = 3
"""Exit status of a study whose Ray stopped under it (``--resume`` continues it)."""
WATCHED_PROCESSES = ("gcs_server", "raylet")
_RAY_LOST_TYPES = ("RaySystemError", "RayActorError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError",
                   "OwnerDiedError", "ObjectLostError", "ObjectReconstructionFailedError", "RpcError",
                   "GetTimeoutError", "WorkerCrashedError", "LocalRayletDiedError", "RaySystemError")
_GCS_WORDS = ("gcs", "raylet", "failed to connect to", "connection refused", "ray cluster")


class RayLostError(Exception):
    """Ray stopped under a phase; the message is the phase and the reason (one line)."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase, self.reason = phase, reason


def ray_lost_reason(error: BaseException) -> str | None:
    """``Type: first line`` of the Ray error in ``error``'s chain (causes, contexts), or None when it is not Ray's.

    Ray's errors: an actor, node, worker or object lost, Ray's system errors, and a
    ``ConnectionError`` that names the GCS or the raylet.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = type(current)
        names = {cls.__name__ for cls in kind.__mro__}
        from_ray = kind.__module__.startswith("ray")
        message = str(current).strip()
        if (from_ray and names & set(_RAY_LOST_TYPES)) or (
                isinstance(current, ConnectionError) and any(word in message.lower() for word in _GCS_WORDS)):
            first = message.splitlines()[0] if message else ""
            return f"{kind.__name__}: {first}"[:300] if first else kind.__name__
        current = current.__cause__ or current.__context__
    return None


def ray_lost_line(phase: str, reason: str, resume: str) -> str:
    """The console's line for a Ray that stopped during ``phase``."""
    return (f"error: Ray stopped during {phase} ({reason}); finished trials and checkpoints are kept; "
            f"resume with: {resume}")


class LocalRayWatch:
    """Ends the study when the local Ray it started loses its GCS or raylet process.

    Args:
        resume: the command that resumes the study.
        phase: returns the phase running now (for the line).
        interval_s: seconds between two checks.
        exit: how the study ends (``os._exit``: the main thread may be blocked in Ray's calls).
    """

    def __init__(self, resume: str, phase: Callable[[], str], interval_s: float = 1.0,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.resume, self.phase, self.interval_s, self._exit = resume, phase, interval_s, exit
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._descendants: list = []

    def start(self) -> "LocalRayWatch":
        """Watch the local Ray of this process (nothing to watch when it joined a cluster)."""
        if _local_node() is not None:
            self._thread = threading.Thread(target=self._run, name="semiseg-ray-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before ``ray.shutdown``, which ends those processes itself)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def dead_process(self) -> str | None:
        """The name of a watched process of the local Ray that exited by itself, or None."""
        node = _local_node()
        if node is None:
            return None
        with node.removal_lock:  # Ray's own shutdown kills and forgets a process under this lock
            for name in WATCHED_PROCESSES:
                for info in node.all_processes.get(name, []):
                    if info.process.poll() is not None:
                        return f"its {name} process exited with status {info.process.returncode}"
        return None

    def _run(self) -> None:
        import psutil

        while not self._stopped.wait(self.interval_s):
            reason = self.dead_process()
            if reason is None:
                # the processes this study started (Ray's and its workers): a dead raylet's workers
                # lose their parent, so they are known from before
                self._descendants = psutil.Process().children(recursive=True)
                continue
            if self._stopped.is_set():
                return
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(ray_lost_line(self.phase(), f"the local Ray: {reason}", self.resume), file=sys.stderr, flush=True)
            session = getattr(_local_node(), "session_name", None)
            stop_local_ray()
            _kill_still_running(self._descendants + _session_processes(session))
            self._exit(EXIT_RAY_LOST)
            return


def _local_node():
    """The Ray node this process started (``ray.init`` without an address), or None."""
    try:
        from ray._private import worker
    except ImportError:
        return None
    node = getattr(worker, "_global_node", None)
    if node is None or not getattr(node, "head", False) or not hasattr(node, "removal_lock"):
        return None
    return node


def _kill_still_running(processes: list) -> None:
    """SIGKILL those of ``processes`` (``psutil.Process`` objects) that still run: ``psutil`` checks that each
    is still the same process (by its start time), never a new one that took its pid."""
    import psutil

    for process in processes:
        try:
            if process.is_running():
                process.kill()
        except psutil.Error:  # it ended meanwhile
            pass


def _session_processes(session: str | None) -> list:
    """The processes of the Ray session ``session`` (its workers name it on their command line; a dead
    raylet's workers have lost their parent and may have started after the last look at this process's
    children)."""
    import psutil

    if not session:
        return []
    marker = f"--session-name={session}"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in (process.info.get("cmdline") or []):
            found.append(process)
    return found


def stop_local_ray() -> None:
    """End what is left of the local Ray this process started (its other processes would linger)."""
    node = _local_node()
    if node is None:
        return
    try:
        node.kill_all_processes(check_alive=False, allow_graceful=False)
    except Exception:  # a process that is already gone or cannot be signalled: nothing more to do
        pass
