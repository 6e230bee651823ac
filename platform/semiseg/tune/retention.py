"""Old trial checkpoints deleted only once no saved experiment state can still point at them.

Tune's own ``CheckpointConfig(num_to_keep=K)`` deletes a trial's older checkpoints as soon as
a new one is registered, and forces a snapshot of the experiment state only every K
checkpoints, at its next step. A driver killed in between (after the callbacks of that
result, before the snapshot) leaves a saved state that names a deleted checkpoint: the
resumed trial fails with "Could not recover from checkpoint as it does not exist on storage
anymore" (seen with K = 2 when the driver was killed right after a trial's last epoch).

:class:`CheckpointRetention` replaces that deletion (the study sets ``num_to_keep=None``):
while Tune saves a snapshot it asks each callback for its state, after writing the trial
states; at that moment the callback deletes each trial's checkpoints older than the one the
*previous* snapshot named (that snapshot's upload to the storage path has finished before a
new one starts), always keeping the newest ``keep``.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


class CheckpointRetention(Callback):
    """Keep each trial's newest ``keep`` checkpoints and every one a saved experiment state may name.

    Args:
        keep: checkpoints of a trial always kept (the newest ones).
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = max(1, keep)
        self.checkpoints: dict[str, list[Any]] = {}
        self.referenced: dict[str, str] = {}

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info) -> None:
        """Remember the trial's new checkpoint (a ``ray.tune.Checkpoint``)."""
        self.checkpoints.setdefault(trial.trial_id, []).append(checkpoint)

    def get_state(self) -> dict | None:
        """Called while Tune saves the experiment state: delete what no saved state names any more."""
        for trial_id, checkpoints in self.checkpoints.items():
            paths = [checkpoint.path for checkpoint in checkpoints]
            previous = self.referenced.get(trial_id)
            if previous in paths:
                cut = min(paths.index(previous), len(checkpoints) - self.keep)
                for stale in checkpoints[:max(0, cut)]:
                    _delete(stale)
                self.checkpoints[trial_id] = checkpoints[max(0, cut):]
            if checkpoints:
                self.referenced[trial_id] = paths[-1]
        return None


def _delete(checkpoint: Any) -> None:
    try:
        checkpoint.filesystem.delete_dir(checkpoint.path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not delete the old checkpoint %s: %s", checkpoint.path, error)
