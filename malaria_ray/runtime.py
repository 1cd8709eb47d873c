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

Bad flags and bad paths are checked before this is entered, so a user error costs no start-up.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from malaria_ray import logs, resources, storage
from malaria_ray.config import ConfigError

log = logs.get("ray")


@contextlib.contextmanager
def ray_for(command: str) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
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
        ray.init(num_cpus=cpus, log_to_driver=True, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
