"""Fault injection for tests: one mechanism, inert unless a test arms it.

A test arms one fault by setting ``MALARIA_RAY_FAULT=<point>@<n>:<marker path>`` in the
environment of the driver (the process that calls ``train.fit`` or ``score.score_archive``). The
driver reads it once (``armed``) and hands the spec to its workers explicitly; a worker calls
``maybe_fail(spec, point, n)`` at the named point, and the first to reach the ``n``-th occurrence
writes the marker file and kills its own process with ``os._exit`` (as an OOM kill would: no
cleanup, nothing for Ray to catch). The marker makes it happen once per marker path, so the
retried work then succeeds. Production never sets the variable, and with it unset every call
is a no-op. Points: ``train.epoch`` (n = epoch; the last worker rank, halfway through the epoch)
and ``score.batch`` (n = batches a scoring actor has scored).
"""

from __future__ import annotations

import os

ENV = "MALARIA_RAY_FAULT"


def armed() -> str | None:
    """The fault spec of this process's environment, or None (always None in production)."""
    return os.environ.get(ENV) or None


def spec(point: str, n: int, marker: str) -> str:
    """The value of ``MALARIA_RAY_FAULT`` that kills at the ``n``-th ``point`` once (marker: ``marker``)."""
    return f"{point}@{n}:{marker}"


def maybe_fail(fault: str | None, point: str, n: int) -> None:
    if not fault:
        return
    where, marker = fault.split(":", 1)
    at_point, at_n = where.rsplit("@", 1)
    if at_point != point or int(at_n) != n or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    print(f"[fault injection] {point} {n}: process {os.getpid()} exits", flush=True)
    os._exit(137)
