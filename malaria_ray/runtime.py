"""The one place that starts and stops Ray for an entrypoint (``malaria-ray train|score``,
``python jobs/train.py|score.py``).

- Under ``ray job submit`` (the job supervisor sets ``RAY_ADDRESS`` for the entrypoint) or with
  ``RAY_ADDRESS`` set by the user, it joins that cluster and only disconnects at the end.
- An ``http(s)://`` ``RAY_ADDRESS`` is a dashboard's, the one ``ray job submit`` talks to (the
  README has users export it): no driver can join a cluster through it, and a run started here
  in that shell must not quietly run on this machine instead. It stops with exit 2 and one line
  saying what to unset, before Ray starts.
- Otherwise it starts a local single-node Ray sized for this machine (every CPU, Ray's default
  memory and object-store shares) and shuts it down at the end, so a finished command leaves no
  Ray behind.
- A caller that already holds a Ray connection (a notebook, the test session) keeps it: nothing
  is started or stopped.
- ``metrics_export_port`` (``score --metrics-export-port``): the local Ray's metrics agent serves
  Prometheus on that port (Ray's own metrics and ``malaria_ray.telemetry``'s) for as long as the
  command runs. A cluster's nodes export on the port ``ray start --metrics-export-port`` gave them,
  so with ``RAY_ADDRESS`` the flag is refused rather than silently meaningless.

Bad flags and bad paths are checked before this is entered, so a user error costs no start-up.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from malaria_ray import logs, resources, storage
from malaria_ray.config import ConfigError

log = logs.get("ray")


def check_metrics_port(port: int | None) -> None:
    """Before Ray starts: the port is one, and free on this machine. (On a taken port Ray 2.60's
    ``ray.init`` waits 30 s and fails with "The current node timed out during startup".)"""
    if port is None:
        return
    if not 1024 <= port <= 65535:
        raise ConfigError(f"--metrics-export-port must be in 1024..65535, got {port}")
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as exc:
            raise ConfigError(f"--metrics-export-port {port} is taken on this machine ({exc.strerror}): "
                              "choose a free port") from None


@contextlib.contextmanager
def ray_for(command: str, metrics_export_port: int | None = None) -> Iterator[None]:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if metrics_export_port is not None and (ray.is_initialized() or address):
        where = "this process is already connected to Ray" if ray.is_initialized() else "RAY_ADDRESS is set"
        raise ConfigError(f"--metrics-export-port applies to the local Ray a command starts, and {where}: a cluster's "
                          "nodes serve metrics on the port given to `ray start --metrics-export-port`")
    if ray.is_initialized():
        yield
        return
    if address and address.lower().startswith(("http://", "https://")):
        raise ConfigError(f"RAY_ADDRESS={storage.redact(address)} is a Ray dashboard address (what `ray job submit` "
                          f"uses), not one a run can join: to run here, unset it (env -u RAY_ADDRESS malaria-ray "
                          f"{command} ...); to run on that cluster, submit the job: ray job submit -- python "
                          f"jobs/{command}.py ...")
    if address:
        log.info(f"{command}: joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        cpus = resources.usable_cpus()  # a container's CPU limit, not the host's count
        log.info(f"{command}: no RAY_ADDRESS: starting a local Ray on this machine ({cpus} CPUs)")
        check_metrics_port(metrics_export_port)
        ray.init(num_cpus=cpus, log_to_driver=True, configure_logging=False, _metrics_export_port=metrics_export_port)
        if metrics_export_port is not None:
            log.info(f"{command}: Prometheus metrics on http://127.0.0.1:{metrics_export_port}/metrics while this "
                     "command runs")
    try:
        yield
    finally:
        ray.shutdown()
