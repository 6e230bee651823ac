"""Connecting a study to Ray: the job's cluster, or a local Ray of its own."""

from __future__ import annotations

import logging
import os
import socket
import warnings

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"


def free_port(host: str) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def init_ray(address: str | None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
             log_to_driver: bool = True) -> str | None:
    """Connect to ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``), or start a local Ray.

    A local Ray is started so that its own processes can find it even when other Ray instances
    run on the same machine (a second study, a test session):

    - its GCS listens on a port chosen here, and every worker gets ``RAY_ADDRESS`` naming it;
      Ray Train V2's placement-group cleaner asks the State API for "the" local cluster and
      fails with "Found multiple active Ray instances" otherwise;
    - it runs its dashboard on 127.0.0.1, which serves that State API. Without it a DDP trial
      that Tune stopped (ASHA at the last epoch) never has its worker group's placement group
      freed, and the next DDP trial waits for workers forever (Ray #54305).

    Args:
        address: a cluster's address, or None.
        num_cpus: CPUs of a local Ray (default: the machine's).
        env_vars: extra environment of a local Ray's workers.
        log_to_driver: forward the workers' output to this process.

    Returns:
        The dashboard's URL, or None when the cluster has none.
    """
    import ray
    from ray._private.services import get_node_ip_address

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if address:
        context = ray.init(address=address, log_to_driver=log_to_driver)
        return _dashboard_url(context)
    node_ip = get_node_ip_address()
    port = free_port(node_ip)
    previous = os.environ.get(GCS_PORT_VARIABLE)
    os.environ[GCS_PORT_VARIABLE] = str(port)
    try:
        context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=log_to_driver, configure_logging=True, logging_level=logging.WARNING,
                           runtime_env={"env_vars": {**(env_vars or {}), "RAY_ADDRESS": f"{node_ip}:{port}"}})
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_VARIABLE, None)
        else:
            os.environ[GCS_PORT_VARIABLE] = previous
    return _dashboard_url(context)


def _dashboard_url(context) -> str | None:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else f"http://{url}"
