"""Can one trial's workers ever be placed? Checked before a study waits for them.

A trial asks for ``--workers-per-trial`` workers of ``--cpus-per-worker`` CPUs and
``--gpus-per-worker`` GPUs each; each worker must fit on one node (Ray places a worker's
resources on a single node; a DDP trial may spread its workers over nodes). A request that
no node, or no set of nodes, can satisfy leaves the trial PENDING forever (one worker) or
repeats a worker-group start-up time-out every minute (DDP), so it is refused with one line
(:class:`ResourceError`, exit status 2):

- a local Ray (no ``--address``, no ``RAY_ADDRESS``, not already connected): before Ray
  starts, against this machine: the CPUs Ray would detect (``ray._private.utils.get_num_cpus``,
  which honours cgroup limits; ``os.cpu_count()`` if that is unavailable) and
  ``torch.cuda.device_count()`` GPUs (:func:`check_local_resources`);
- a cluster it connects to: after connecting, against each alive node's resources
  (``ray.nodes()``), when the cluster cannot add a node (:func:`check_cluster_resources`).

Whether a joined cluster can add nodes is decided from what Ray 2.60 exposes:

1. the autoscaling config an autoscaler reports to the GCS (``ClusterConfig``, read with
   ``ray._private.state.state.get_cluster_config()``, as Ray Data does): its node groups
   with a non-zero ``max_count`` tell exactly which nodes can be added;
2. without one, a cluster whose nodes carry a node-group label (``ray.io/node-group``, set
   from ``RAY_NODE_TYPE_NAME`` by ``ray up``, KubeRay and autoscaler v2) or whose autoscaler
   status (the ``__autoscaling_status`` record of the monitor) names a configured node type is
   taken as autoscaled: its node types' resources are not published, so the study only logs
   a warning and waits;
3. otherwise (nodes started by hand with ``ray start``; Ray's monitor then runs a read-only
   provider that names each node ``node_<id>`` and can add none) the request is refused.

Not checked: memory, custom resources, resources held by other jobs (they are freed
eventually), placement-group strategies other than Ray Train's default PACK.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from semiseg.config import ConfigError

log = logging.getLogger(__name__)
NODE_GROUP_LABEL = "ray.io/node-group"
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")


class ResourceError(ConfigError):
    """A trial asks for resources that the machine or the cluster can never provide."""


@dataclass(frozen=True)
class TrialRequest:
    """What one trial asks for: ``workers`` workers of ``cpus`` CPUs and ``gpus`` GPUs each."""

    workers: int
    cpus: int
    gpus: float

    @classmethod
    def from_args(cls, args: Any) -> "TrialRequest":
        """From a study's parsed command line (:class:`semiseg.tune.cli.StudyArgs`)."""
        return cls(int(args.workers_per_trial), int(args.cpus_per_worker), float(args.gpus_per_worker))

    def flags(self) -> str:
        """The request as the command line spells it."""
        text = f"--workers-per-trial {self.workers} --cpus-per-worker {self.cpus}"
        return text + (f" --gpus-per-worker {self.gpus:g}" if self.gpus > 0 else "")

    def workers_on(self, cpus: float, gpus: float) -> int:
        """How many of the trial's workers a node with ``cpus`` CPUs and ``gpus`` GPUs can hold.

        A fraction of a GPU must come from one GPU (Ray shares a GPU between workers by
        fractions, it does not join fractions of two), so ``1 // gpus`` workers share a GPU.
        """
        fit = math.floor(cpus / self.cpus + 1e-9) if self.cpus > 0 else self.workers
        if 0 < self.gpus < 1:
            fit = min(fit, math.floor(gpus + 1e-9) * self._sharing_a_gpu())
        elif self.gpus >= 1:
            fit = min(fit, math.floor(gpus / self.gpus + 1e-9))
        return max(0, fit)

    def gpus_needed(self) -> int:
        """Whole GPUs that the trial's workers need together."""
        if self.gpus <= 0:
            return 0
        if self.gpus < 1:
            return math.ceil(self.workers / self._sharing_a_gpu())
        return math.ceil(self.workers * self.gpus - 1e-9)

    def _sharing_a_gpu(self) -> int:
        """Workers of a fraction of a GPU that one GPU holds."""
        return math.floor(1 / self.gpus + 1e-9)


def local_cpus() -> int:
    """The CPUs a local Ray started without ``num_cpus`` gets (cgroup limits honoured)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private Ray helper; fall back to the OS count
        return os.cpu_count() or 1


def local_gpus() -> int:
    """GPUs of this machine as torch (and Ray: ``CUDA_VISIBLE_DEVICES``) sees them."""
    import torch

    return int(torch.cuda.device_count())


def check_local_resources(request: TrialRequest, cpus: int | None = None, gpus: int | None = None) -> None:
    """Refuse a trial that this machine's local Ray could never place (before Ray starts).

    Args:
        request: the trial's request.
        cpus: the local Ray's CPUs (default :func:`local_cpus`).
        gpus: the machine's GPUs (default :func:`local_gpus`).

    Raises:
        ResourceError: naming the flag, what was asked and what the machine has.
    """
    _check_gpu_fraction(request)
    cpus = local_cpus() if cpus is None else cpus
    where = "this machine has {}, and the study starts a local Ray on it (--address joins a cluster)"
    if request.cpus > cpus:
        raise ResourceError(f"--cpus-per-worker {request.cpus}: a worker needs {request.cpus} CPUs on one node; "
                            + where.format(f"{cpus} CPU(s)"))
    if request.workers * request.cpus > cpus:
        raise ResourceError(f"--workers-per-trial {request.workers} x --cpus-per-worker {request.cpus}: a trial "
                            f"needs {request.workers * request.cpus} CPUs at once; " + where.format(f"{cpus} CPU(s)"))
    if request.gpus > 0:
        gpus = local_gpus() if gpus is None else gpus
        needed = request.gpus_needed()
        if needed > gpus:
            asked = (f"--gpus-per-worker {request.gpus:g}" if request.workers == 1 else
                     f"--gpus-per-worker {request.gpus:g} x --workers-per-trial {request.workers}")
            raise ResourceError(f"{asked}: a trial needs {needed} GPU(s); "
                                + where.format(f"{gpus} GPU(s) (torch.cuda.device_count())" if gpus else
                                               "no GPU (torch.cuda.device_count() = 0)"))


def check_cluster_resources(request: TrialRequest) -> None:
    """Refuse a trial that the connected cluster can never place; warn when only an autoscaler could.

    Raises:
        ResourceError: one line with the request, the alive nodes' CPUs/GPUs and why no node
            can be added.
    """
    import ray

    _check_gpu_fraction(request)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    problem = placement_problem(request, [_node_resources(node) for node in nodes])
    if problem is None:
        return
    growth = cluster_growth(request, nodes)
    if growth is None:
        log.warning("warning: %s; the study waits for the cluster's autoscaler to add such nodes", problem)
        return
    if growth:
        log.info("%s; the autoscaler's node groups can provide them", problem)
        return
    raise ResourceError(f"{problem}; the cluster cannot add nodes (no autoscaler, or none of its node groups "
                        "fits a worker)")


def placement_problem(request: TrialRequest, nodes: Iterable[tuple[float, float]]) -> str | None:
    """Why ``request`` does not fit on nodes of (CPUs, GPUs), or None when it fits."""
    nodes = list(nodes)
    capacity = [request.workers_on(cpus, gpus) for cpus, gpus in nodes]
    if sum(capacity) >= request.workers:
        return None
    shown = ", ".join(f"{cpus:g} CPU/{gpus:g} GPU" for cpus, gpus in nodes) or "none"
    if not any(capacity):
        return (f"{request.flags()}: no alive node of the cluster can hold one worker "
                f"({request.cpus} CPU(s){f', {request.gpus:g} GPU' if request.gpus > 0 else ''}); its nodes: {shown}")
    return (f"{request.flags()}: the cluster's nodes hold at most {sum(capacity)} of the trial's {request.workers} "
            f"workers; its nodes: {shown}")


def cluster_growth(request: TrialRequest, nodes: list[dict]) -> bool | None:
    """Whether the cluster can add nodes that hold the trial's missing workers.

    Returns:
        True or False from the autoscaling config the GCS holds; None when an autoscaler seems
        to manage the cluster but its node types are unknown; False for a hand-started cluster.
    """
    config = _gcs_cluster_config()
    if config is not None and len(config.node_group_configs):
        present = sum(request.workers_on(*_node_resources(node)) for node in nodes)
        addable = 0
        for group in config.node_group_configs:
            if group.max_count == 0:
                continue
            per_node = request.workers_on(float(group.resources.get("CPU", 0)), float(group.resources.get("GPU", 0)))
            if per_node and group.max_count < 0:
                return True
            addable += per_node * max(0, group.max_count)
        return present + addable >= request.workers
    if any((node.get("Labels") or {}).get(NODE_GROUP_LABEL) for node in nodes):
        return None
    if _autoscaler_names_node_types():
        return None
    return False


def _check_gpu_fraction(request: TrialRequest) -> None:
    if request.gpus > 1 and abs(request.gpus - round(request.gpus)) > 1e-9:
        raise ResourceError(f"--gpus-per-worker {request.gpus:g}: more than one GPU per worker must be a whole "
                            "number (Ray shares a GPU by fractions below 1 only)")


def _node_resources(node: dict) -> tuple[float, float]:
    resources = node.get("Resources") or {}
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


def _gcs_cluster_config():
    """The autoscaling config an autoscaler reported to the GCS, or None (private Ray API)."""
    try:
        import ray._private.state

        return ray._private.state.state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 - a private Ray API that may change
        log.debug("no cluster config from the GCS: %s", error)
        return None


def _autoscaler_names_node_types() -> bool:
    """Whether the monitor's status names a configured node type (not Ray's read-only ``node_<id>``)."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        status = json.loads(raw) if raw else {}
    except Exception as error:  # noqa: BLE001 - a private Ray record that may change
        log.debug("no autoscaler status: %s", error)
        return False
    report = status.get("autoscaler_report") or {}
    names = set((report.get("node_type_mapping") or {}).values()) | set(report.get("active_nodes") or {})
    names |= {launch for launch in (report.get("pending_launches") or {})}
    return any(not _READONLY_NODE_TYPE.match(str(name)) for name in names)
