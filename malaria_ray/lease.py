"""One scoring run at a time per output root: the root's lease file (``ROOT/_lease.json``).

Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import json
import os
import time

from malaria_ray import storage

LEASE_FILE = "_lease.json"  # under ROOT; "_": no reader takes it for output
LEASE_SECONDS = 15 * 60
LEASE_SETTLE_SECONDS = 1.0


class LeaseHeld(RuntimeError):
    """Another run is writing under the same output root; the message says which and until when."""


def _dead_here(held: dict) -> bool:
    """Whether the lease holder ran on this host and its process is gone (killed, OOM): its lease
    need not be waited out."""
    import socket

    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    """One scoring run at a time per output root: a lease file with an expiry.

    ``acquire`` takes the lease when there is none, it expired (a crashed run's lease lapses
    ``seconds`` after its last renewal), or its holder ran on this host and its process is gone;
    it writes the lease, waits ``LEASE_SETTLE_SECONDS`` and reads it back: of two runs that start
    at once, the one whose write landed last holds it and the other refuses
    (object stores offer no compare-and-swap through fsspec; the settle time covers the gap
    between one run's check and its write). ``renew`` extends it as the run goes; ``release``
    deletes it if this run still holds it.
    """

    def __init__(self, root: str, run_id: str, seconds: float = LEASE_SECONDS) -> None:
        self.uri, self.run_id, self.seconds = storage.join(root, LEASE_FILE), run_id, seconds
        self._renewed = 0.0

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri)) if storage.exists(self.uri) else None
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        import socket

        now = time.time()
        storage.replace_file(self.uri, json.dumps({
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "renewed_at": now, "expires_at": now + self.seconds}).encode())
        self._renewed = time.monotonic()

    def _refuse_if_held(self) -> None:
        held = self._read()
        if held and held.get("run_id") != self.run_id and held.get("expires_at", 0) > time.time() \
                and not _dead_here(held):
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(held["expires_at"]))
            raise LeaseHeld(f"another scoring run ({held.get('run_id')} on {held.get('host')}, pid {held.get('pid')}) "
                            f"is writing under this output root; its lease runs until {until} unless renewed. "
                            f"If that run is dead, wait for the lease to expire or delete {self.uri}")

    def acquire(self) -> None:
        self._refuse_if_held()
        self._write()
        time.sleep(LEASE_SETTLE_SECONDS)
        self._refuse_if_held()

    def renew(self) -> None:
        """Extend the lease; cheap to call often (it writes at most every third of its length)."""
        if time.monotonic() - self._renewed >= self.seconds / 3:
            self._write()

    def release(self) -> None:
        held = self._read()
        if held and held.get("run_id") == self.run_id:
            fs, path = storage.filesystem(self.uri)
            fs.rm(path)
