"""Resource requests: CPU and memory reservations that fit small nodes; missing GPUs.

Ray schedules by logical CPUs. Train workers or scoring actors that reserve every CPU of a node
leave none for the Ray Data tasks that feed them, and the run waits forever (on a 2-CPU machine,
2 Train workers x 1 CPU hang; so does one scoring actor x 2 CPUs). The reservation is bookkeeping:
TensorFlow inside a worker still uses every core of the machine whatever it reserved.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

from malaria_ray import logs


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its CPU affinity, capped by a container's CPU quota.

    ``os.cpu_count()`` is the host's count: in a pod limited to 4 CPUs on a 64-core node it is 64,
    and a local Ray sized by it runs 64 tasks on 4 CPUs' time. The quota is read from cgroup v2
    (``cpu.max``: "QUOTA PERIOD" or "max ...") or v1 (``cpu/cpu.cfs_quota_us``, -1 = none) and
    rounded up (a 1.5-CPU limit gives 2).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    root = pathlib.Path(cgroup_root)
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            limit = None if quota == "max" else int(quota) / int(period)
        elif (root / "cpu" / "cpu.cfs_quota_us").is_file():
            quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            limit = None if quota <= 0 else quota / period
        else:
            limit = None
    except (OSError, ValueError):  # unreadable or odd: the affinity stands
        limit = None
    return max(1, min(cpus, math.ceil(limit))) if limit else max(1, cpus)


def leave_a_cpu(count: int, per: float, cluster_cpus: float, what: str, tag: str) -> float:
    """CPUs to reserve per process so ``count`` of them leave at least one CPU free (GPU runs: ``per``)."""
    if count * per <= cluster_cpus - 1:
        return per
    fitted = max(0.1, (cluster_cpus - 1) / count) if cluster_cpus > 1 else 0.5 / count
    fitted = round(min(per, fitted), 2)
    logs.get(tag).info(f"{count} {what} x {per:g} CPU would leave no CPU for Ray Data on {cluster_cpus:g} CPUs: "
                       f"reserving {fitted:g} CPU per {what.rstrip('s')} instead")
    return fitted


def fit_memory(count: int, per_gb: float, cluster_bytes: float, what: str, tag: str) -> int:
    """Bytes of memory to reserve per process so ``count`` of them fit what Ray can schedule.

    Like the CPU reservation, Ray's ``memory`` resource is bookkeeping (nothing caps a process at
    it): an ask the node cannot meet would only leave the run waiting, so it shrinks and says so.
    """
    per = int(per_gb * 2**30)
    if count * per <= cluster_bytes:
        return per
    fitted = max(1, int(0.9 * cluster_bytes / count))
    logs.get(tag).info(f"{count} {what} x {per_gb:g} GiB exceed the {cluster_bytes / 2**30:.1f} GiB of memory Ray "
                       f"can schedule: reserving {fitted / 2**30:.2f} GiB per {what.rstrip('s')} instead")
    return fitted


@dataclass(frozen=True)
class ActorPool:
    """The model actors' pool: ``min_size``..``max_size`` actors (equal: a fixed pool), and how many
    batches each actor holds at once (2 on GPUs: the next batch is sent while one is computed)."""

    min_size: int
    max_size: int
    in_flight: int

    def strategy(self):
        import ray

        if self.min_size == self.max_size:
            return ray.data.ActorPoolStrategy(size=self.max_size, max_tasks_in_flight_per_actor=self.in_flight)
        return ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size,
                                          max_tasks_in_flight_per_actor=self.in_flight)


def actor_pool(actors: int | None, max_actors: int | None, gpus_per_actor: float, cluster_gpus: float) -> ActorPool:
    """``--actors`` is a fixed pool. Without it, CPU scoring runs one actor, and GPU scoring an
    autoscaling pool from one actor to ``--max-actors`` (default: one per ``--gpus-per-actor`` of
    the GPUs the cluster has at the start, at least 1): Ray Data adds actors while work waits."""
    in_flight = 2 if gpus_per_actor else 1
    if actors is not None:
        return ActorPool(actors, actors, in_flight)
    if not gpus_per_actor:
        return ActorPool(1, max_actors or 1, in_flight)
    top = max_actors or max(1, int(cluster_gpus // gpus_per_actor))
    return ActorPool(1, top, in_flight)


def note_missing_gpus(needed: float, cluster_gpus: float, flag: str, tag: str) -> None:
    """Say so when a run asks for more GPUs than the cluster has now; it then waits for them.

    Not an error: GPU worker groups that scale from zero (cluster/) get their nodes only once a
    run asks. On a machine without GPUs the run would wait forever, hence the line naming the flag.
    """
    if needed > cluster_gpus:
        logs.get(tag).info(f"{flag} needs {needed:g} GPU(s); the Ray cluster has {cluster_gpus:g} now. Waiting for "
                           f"the autoscaler to add GPU nodes; on a machine without GPUs, stop and drop {flag}.")


def _gpu_probe(backend: str) -> dict:
    """Runs in a Ray task that holds one GPU: what that process can see."""
    import os

    from malaria_ray.backends import visible_gpus

    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": visible_gpus(backend),
            "node": os.uname().nodename}


def require_visible_gpu(flag: str, runtime_env: dict | None = None, backend: str = "tensorflow") -> dict:
    """Fail at once, with the reason, when a process Ray gives a GPU cannot use one in ``backend``
    (TensorFlow, or JAX for ``score --backend jax``).

    Ray assigns GPUs by bookkeeping (a node started with ``--num-gpus`` advertises them) and sets
    ``CUDA_VISIBLE_DEVICES``; a CPU-only TensorFlow or jaxlib build, missing CUDA libraries or a node
    that advertises GPUs it lacks would then train or score on CPU, slowly, while holding the GPUs.
    One task with ``num_gpus=1`` imports the backend where the run's GPU workers would run (with
    their ``runtime_env``) and reports. Raises ``ConfigError`` (exit 2) when it sees no GPU;
    returns the probe's report.
    """
    import ray

    from malaria_ray.backends import NAMES
    from malaria_ray.config import ConfigError

    probe = ray.remote(num_gpus=1, num_cpus=0, max_calls=1)(_gpu_probe)
    report = ray.get(probe.options(**({"runtime_env": runtime_env} if runtime_env else {})).remote(backend))
    name = NAMES[backend]
    if not report["gpus"]:
        raise ConfigError(f"{flag}: a Ray worker given a GPU (CUDA_VISIBLE_DEVICES={report['cuda_visible_devices']} on "
                          f"{report['node']}) sees no GPU in {name} (CPU-only build, missing CUDA libraries, or a "
                          f"node that advertises GPUs it lacks); refusing to run on CPU while holding GPUs")
    logs.get("ray").info(f"{flag}: {name} sees {report['gpus']} GPU(s) in a GPU worker "
                         f"(CUDA_VISIBLE_DEVICES={report['cuda_visible_devices']})")
    return report
