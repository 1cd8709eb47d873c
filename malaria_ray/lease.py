"""One scoring run at a time per output root: the root's lease file (``ROOT/_lease.json``).

Every change to the lease is a compare-and-swap, so two runs that start at the same instant cannot
both hold it: a write succeeds only if the lease is still what this run read.

- On S3 the store does it: a conditional PUT (``If-None-Match: *`` to create, ``If-Match: <ETag>``
  to take over or renew) and a conditional DELETE; the loser gets 412 Precondition Failed.
- On a local (or mounted) disk, the read-compare-write runs under an exclusive ``flock`` of
  ``ROOT/_lease.lock`` (held for milliseconds; never deleted, as deleting a lock file lets two
  processes lock two different files), and the new lease replaces the old by rename, so a reader
  never sees half a file.

Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from malaria_ray import storage

LEASE_FILE = "_lease.json"  # under ROOT; "_": no reader takes it for output
LOCK_FILE = "_lease.lock"  # local roots only
LEASE_SECONDS = 15 * 60


class LeaseHeld(RuntimeError):
    """Another run is writing under the same output root; the message says which and until when."""


class LeaseConflict(RuntimeError):
    """The lease changed between this run's read and its write: another run wrote it first."""


class _LocalStore:
    """The lease file on a local disk; the token of a version is its bytes."""

    def __init__(self, path: str) -> None:
        self.path, self.lock = path, os.path.join(os.path.dirname(path) or ".", LOCK_FILE)

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.lock) or ".", exist_ok=True)
        import fcntl

        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # per open file: two runs in one process exclude each other too
            yield
        finally:
            os.close(fd)  # releases the lock

    def _current(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes | None, bytes | None]:
        with self._locked():
            data = self._current()
        return data, data

    def put(self, data: bytes, token: bytes | None) -> bytes:
        with self._locked():
            if self._current() != token:
                raise LeaseConflict(self.path)
            storage.replace_file(self.path, data)
        return data

    def delete(self, token: bytes) -> None:
        with self._locked():
            if self._current() != token:
                raise LeaseConflict(self.path)
            os.remove(self.path)


_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict")


def _is_conflict(exc: Exception) -> bool:
    """Whether an s3fs error is a failed condition (412, or 409 while another conditional write is
    in flight) or the object vanished under an ``If-Match`` (404): another run moved first."""
    return isinstance(exc, (FileExistsError, FileNotFoundError)) or _code(exc) in _CONFLICT_CODES


def _code(exc: Exception) -> str | None:
    """The S3 error code behind an s3fs error (s3fs keeps botocore's error as the cause)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")


class _S3Store:
    """The lease object on S3 (or any store with conditional writes); the token is its ETag."""

    def __init__(self, uri: str) -> None:
        self.fs, path = storage.filesystem(uri)
        self.bucket, self.key, _ = self.fs.split_path(path)
        self.path = path

    def read(self) -> tuple[bytes | None, str | None]:
        # ETag first, then the bytes: if the object changes in between, the bytes are newer than
        # the ETag, and a write conditional on that ETag fails; it never succeeds on unseen bytes.
        try:
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            return self.fs.cat_file(self.path), etag
        except FileNotFoundError:
            return None, None

    def put(self, data: bytes, token: str | None) -> str:
        match = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            etag = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **match)["ETag"]
        except Exception as exc:  # s3fs translates botocore's errors; the condition is in __cause__
            if _is_conflict(exc):
                raise LeaseConflict(self.path) from exc
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return etag

    def delete(self, token: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except Exception as exc:
            if _is_conflict(exc):
                raise LeaseConflict(self.path) from exc
            if _code(exc) != "NotImplemented":
                raise
            # A store without conditional deletes: this run read the lease as its own just before.
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        finally:
            self.fs.invalidate_cache(self.path)


def _store_for(uri: str) -> _LocalStore | _S3Store:
    if storage.is_s3(uri):
        return _S3Store(uri)
    if not storage.is_remote(uri):
        return _LocalStore(storage.local_path(uri))
    raise storage.StorageError(f"{uri}: a scoring output root must be a local path or s3:// (its lease needs "
                               "a compare-and-swap that the store offers)")


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


def _parse(data: bytes | None) -> dict | None:
    try:
        return json.loads(data) if data else None
    except ValueError:  # not ours to keep: a compare-and-swap replaces it like an expired lease
        return None


class Lease:
    """One scoring run at a time per output root: a lease file with an expiry.

    ``acquire`` takes the lease when there is none, it expired (a crashed run's lease lapses
    ``seconds`` after its last renewal), or its holder ran on this host and its process is gone;
    the write is conditional on what was read (module docstring), so of two runs that start at
    once, or that take over the same expired lease at once, exactly one wins and the other
    refuses. ``renew`` extends it as the run goes and refuses (``LeaseHeld``) if another run took
    it over meanwhile (this run stalled past its expiry); ``release`` deletes it if this run still
    holds it.
    """

    def __init__(self, root: str, run_id: str, seconds: float = LEASE_SECONDS) -> None:
        self.uri, self.run_id, self.seconds = storage.join(root, LEASE_FILE), run_id, seconds
        self._store = _store_for(self.uri)
        self._token = None
        self._renewed = 0.0

    def _record(self) -> bytes:
        import socket

        now = time.time()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": now, "expires_at": now + self.seconds}).encode()

    def _put(self, token) -> None:
        record = self._record()
        try:
            self._token = self._store.put(record, token)
        except LeaseConflict:
            # The store applied this very write and only its answer was lost (a connection reset
            # after the PUT): the client's retry then fails its own condition. The record's bytes
            # (with their renewal instant) are this write's alone, so finding them is proof.
            data, current = self._store.read()
            if data != record:
                raise
            self._token = current
        self._renewed = time.monotonic()

    def _refuse_if_held(self, held: dict | None) -> None:
        if held and held.get("run_id") != self.run_id and held.get("expires_at", 0) > time.time() \
                and not _dead_here(held):
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(held["expires_at"]))
            raise LeaseHeld(f"another scoring run ({held.get('run_id')} on {held.get('host')}, pid {held.get('pid')}) "
                            f"is writing under this output root; its lease runs until {until} unless renewed. "
                            f"If that run is dead, wait for the lease to expire or delete {self.uri}")

    def acquire(self) -> None:
        for _ in range(3):
            data, token = self._store.read()
            self._refuse_if_held(_parse(data))
            try:
                self._put(token)
                return
            except LeaseConflict:
                continue  # another run wrote between this read and this write: look again
        data, _ = self._store.read()
        self._refuse_if_held(_parse(data))
        raise LeaseHeld(f"the lease {self.uri} changed under this run three times in a row: "
                        "other runs are starting on this output root; try again")

    def renew(self) -> None:
        """Extend the lease; cheap to call often (it writes at most every third of its length)."""
        if time.monotonic() - self._renewed < self.seconds / 3:
            return
        try:
            self._put(self._token)
        except LeaseConflict:
            held = _parse(self._store.read()[0]) or {}
            raise LeaseHeld(f"this run's lease on {self.uri} lapsed and was taken over by run {held.get('run_id')} "
                            f"on {held.get('host')}, pid {held.get('pid')}: this run stops rather than write beside "
                            "it; its committed parts stay, and --skip-scored completes it later") from None

    def release(self) -> None:
        data, token = self._store.read()
        held = _parse(data)
        if held and held.get("run_id") == self.run_id:
            with contextlib.suppress(LeaseConflict):  # taken over in the meantime: not ours to delete
                self._store.delete(token)
