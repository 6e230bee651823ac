"""A trial's start-up in a fresh Python process, as a Ray trial process experiences it (without Ray).

    python -m benchmarks.cold_start '<flat config as JSON>'

prints one JSON line: seconds to import the training loop, and seconds from
``run_training``'s start to its first report minus that epoch's train + val time (data
preparation from the existing cache, model and optimiser build, first checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any


class _FirstReport:
    """A session that notes when the first report arrives (no checkpoints kept)."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.arrived: float | None = None
        self.metrics: dict[str, Any] = {}

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Note the first report."""
        if self.arrived is None:
            self.arrived = time.perf_counter()
            self.metrics = dict(metrics)

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[None]:
        """Never resumes."""
        return contextlib.nullcontext(None)


def measure(config: dict[str, Any]) -> dict[str, float]:
    """Import the loop, run one epoch of ``config`` and split the time."""
    started = time.perf_counter()
    from semiseg.train.loop import run_training

    imported = time.perf_counter()
    session = _FirstReport()
    run_training({**config, "train.max_epochs": 1, "train.evaluate_test": False}, session)
    epoch = session.metrics["time/train_s"] + session.metrics["time/val_s"]
    return {"import_s": imported - started, "startup_s": (session.arrived or imported) - imported - epoch}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
