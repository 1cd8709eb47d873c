"""Resource requests: CPU and memory reservations that fit small nodes; missing GPUs.

Ray schedules by logical CPUs. Train workers or scoring actors that reserve every CPU of a node
leave none for the Ray Data tasks that feed them, and the run waits forever (on a 2-CPU machine,
2 Train workers x 1 CPU hang; so does one scoring actor x 2 CPUs). The reservation is bookkeeping:
TensorFlow inside a worker still uses every core of the machine whatever it reserved.
"""

from __future__ import annotations

from malaria_ray import logs


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


def note_missing_gpus(needed: float, cluster_gpus: float, flag: str, tag: str) -> None:
    """Say so when a run asks for more GPUs than the cluster has now; it then waits for them.

    Not an error: GPU worker groups that scale from zero (cluster/) get their nodes only once a
    run asks. On a machine without GPUs the run would wait forever, hence the line naming the flag.
    """
    if needed > cluster_gpus:
        logs.get(tag).info(f"{flag} needs {needed:g} GPU(s); the Ray cluster has {cluster_gpus:g} now. Waiting for "
                           f"the autoscaler to add GPU nodes; on a machine without GPUs, stop and drop {flag}.")
