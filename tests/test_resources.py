"""CPU reservations: Train workers and scoring actors always leave Ray Data a CPU on CPU-only nodes."""

import logging

import pytest

from malaria_ray.resources import fit_memory, leave_a_cpu, note_missing_gpus, usable_cpus


class _Said:
    """What the code logged since the last read, one ``[tag] message`` line per record."""

    def __init__(self, caplog) -> None:
        self.caplog = caplog

    def readouterr(self):
        text = "".join(f"[{r.name.rsplit('.', 1)[-1]}] {r.getMessage()}\n" for r in self.caplog.records)
        self.caplog.clear()
        return type("Captured", (), {"out": text})


@pytest.fixture
def logged(caplog):  # log lines, read as the printed lines were before logging
    caplog.set_level(logging.INFO, logger="malaria-ray")  # records propagate to caplog's root handler
    return _Said(caplog)


def test_reservation_is_kept_when_a_cpu_is_left(logged):
    assert leave_a_cpu(1, 1.0, 2.0, "actors", "score") == 1.0
    assert leave_a_cpu(3, 1.0, 16.0, "workers", "train") == 1.0
    assert logged.readouterr().out == ""


def test_reservation_shrinks_and_says_so(logged):
    assert leave_a_cpu(1, 2.0, 2.0, "actors", "score") == 1.0  # the --cpus-per-actor 2 hang on 2 CPUs
    assert leave_a_cpu(2, 1.0, 2.0, "workers", "train") == 0.5
    assert leave_a_cpu(4, 1.0, 1.0, "workers", "train") == 0.12  # one CPU: half of it for the workers
    out = logged.readouterr().out
    assert "[score] 1 actors x 2 CPU would leave no CPU for Ray Data on 2 CPUs: reserving 1 CPU per actor" in out
    assert out.count("[train]") == 2


def test_missing_gpus_are_announced_not_fatal(logged):
    note_missing_gpus(4, 4.0, "--use-gpu", "train")
    assert logged.readouterr().out == ""
    note_missing_gpus(2, 0.0, "--gpus-per-actor", "score")  # GPU groups may scale from zero
    out = logged.readouterr().out
    assert out.startswith("[score] --gpus-per-actor needs 2 GPU(s); the Ray cluster has 0 now.")
    assert "drop --gpus-per-actor" in out


def test_memory_reservation_fits_the_node_and_says_so(logged):
    assert fit_memory(2, 2.0, 16 * 2**30, "actors", "score") == 2 * 2**30
    assert logged.readouterr().out == ""
    fitted = fit_memory(4, 2.0, 4 * 2**30, "actors", "score")  # a small laptop: 4 x 2 GiB would wait forever
    assert 0 < 4 * fitted <= 4 * 2**30
    assert "[score] 4 actors x 2 GiB exceed the 4.0 GiB of memory Ray can schedule: reserving 0.90 GiB per actor" \
        in logged.readouterr().out


def test_actor_pool_fixed_on_cpu_autoscaling_on_gpus():
    from malaria_ray.config import ConfigError, ScoreConfig
    from malaria_ray.resources import ActorPool, actor_pool

    assert actor_pool(None, None, 0.0, 0.0) == ActorPool(1, 1, 1)  # CPU: one actor, one batch at a time
    assert actor_pool(3, None, 0.0, 0.0) == ActorPool(3, 3, 1)
    # GPUs: one actor per GPU the cluster has, grown from 1 as work waits; two batches in flight each.
    assert actor_pool(None, None, 1.0, 8.0) == ActorPool(1, 8, 2)
    assert actor_pool(None, None, 0.5, 4.0) == ActorPool(1, 8, 2)  # two actors share each GPU
    assert actor_pool(None, None, 1.0, 0.0) == ActorPool(1, 1, 2)  # GPU nodes not up yet: at least one
    assert actor_pool(None, 16, 1.0, 0.0) == ActorPool(1, 16, 2)  # --max-actors: room for the autoscaler
    assert actor_pool(4, None, 1.0, 8.0) == ActorPool(4, 4, 2)  # --actors: exactly that many
    strategy = actor_pool(None, None, 1.0, 8.0).strategy()
    assert (strategy.min_size, strategy.max_size, strategy.max_tasks_in_flight_per_actor) == (1, 8, 2)
    assert actor_pool(2, None, 0.0, 0.0).strategy().max_size == 2
    with pytest.raises(ConfigError, match="not both"):
        ScoreConfig(input="i", model="m", output="o", actors=2, max_actors=4)
    with pytest.raises(ConfigError, match="--max-actors"):
        ScoreConfig(input="i", model="m", output="o", max_actors=0)


def test_usable_cpus_follow_a_containers_quota_not_the_hosts_count(tmp_path):
    """cgroup v2 and v1 quota files as a container runtime writes them; rounded up, never above
    this process's CPU affinity, and the affinity where there is no quota (this machine: v1, -1)."""
    import os

    host = len(os.sched_getaffinity(0))
    v2, v1, none = tmp_path / "v2", tmp_path / "v1" / "cpu", tmp_path / "none"
    for d in (v2, v1, none):
        d.mkdir(parents=True)
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cpus(str(v2)) == min(host, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(v2)) == host
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(str(v1.parent)) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(str(v1.parent)) == host
    assert usable_cpus(str(none)) == host
    (v2 / "cpu.max").write_text("garbage")
    assert usable_cpus(str(v2)) == host
    assert 1 <= usable_cpus() <= host
