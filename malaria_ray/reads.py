"""Reads that never wait forever: every read of an input has a time limit, transient failures are
retried a bounded number of times with backoff, and a file that changed since it was listed is
caught instead of read half old, half new.

Why a thread per call: a read of a hung network mount blocks inside the kernel and a stalled
object-store GET inside the client; neither can be interrupted from Python. ``within`` runs the
call on a daemon thread and stops waiting at the limit; the abandoned thread ends when the call
does (the S3 client's own socket timeout is set to the same limit: ``storage.read_filesystem``).
``ReadPolicy.call`` adds the retries; ``is_transient`` decides which failures are worth another
try, tonight and on the next night (``schema.ERROR_TRANSIENT``). Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import random
import stat
import threading
import time
from dataclasses import dataclass

from malaria_ray import storage
from malaria_ray.config import ScoreConfig


class ReadTimedOut(TimeoutError):
    """A read that did not finish within the time limit (``--read-timeout-s``)."""


class ChangedSinceListed(OSError):
    """The file is not what the listing saw (size, mtime or ETag differ, or it is no longer a
    regular file): it is being rewritten, or was replaced. The next night reads it as it is then."""


_IDLE: queue.SimpleQueue = queue.SimpleQueue()  # inboxes of reader threads waiting for work


def _forget_parents_readers() -> None:
    """A forked child (the field-crop pool's workers) inherits ``_IDLE`` but not the threads that
    serve its inboxes: a call handed to one would wait out the whole time limit (60 s per worker,
    then a needless retry). The child starts with no idle readers of its own."""
    global _IDLE
    _IDLE = queue.SimpleQueue()


os.register_at_fork(after_in_child=_forget_parents_readers)


def _reader(inbox: queue.SimpleQueue) -> None:
    while True:
        fn, args, box, done = inbox.get()
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc
        finally:
            done.set()
        _IDLE.put(inbox)  # a call that outlived its caller's limit rejoins when it ends


def within(seconds: float, fn, *args):
    """``fn(*args)``, or ``ReadTimedOut`` once ``seconds`` pass (the call goes on, abandoned, on
    its daemon thread: nothing can interrupt a read blocked in the kernel). Reader threads are
    reused: one started per call cost ~0.2 ms a loose file (a sixth of decoding a cell); reused,
    a bounded, checked local read costs ~0.08 ms more than a plain one (2-vCPU VM, warm cache)."""
    try:
        inbox = _IDLE.get_nowait()
    except queue.Empty:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_reader, args=(inbox,), daemon=True, name="malaria-ray-read").start()
    box: dict = {}
    done = threading.Event()
    inbox.put((fn, args, box, done))
    if not done.wait(seconds):
        raise ReadTimedOut(f"no answer within {seconds:g} s (--read-timeout-s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "PreconditionFailed", "412"}
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EAGAIN,
                     errno.EIO, errno.ESTALE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOENT, errno.EBUSY}


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: a timeout, a dropped or refused connection, throttling or
    a 5xx, a stale or busy mount, a file that vanished or changed since the listing. Everything
    else (bytes that do not decode, a corrupt archive, access denied) is permanent."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectionError, ChangedSinceListed, FileNotFoundError)):
            return True
        name = type(exc).__name__
        if name in ("ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                    "FSTimeoutError", "FileExpired", "IncompleteRead", "ClientPayloadError",
                    "ServerDisconnectedError", "ClientConnectorError", "ResponseParserError"):
            return True
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""
        if code in _TRANSIENT_CODES:
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_NOT_NOW = (ChangedSinceListed, FileNotFoundError)


@dataclass(frozen=True)
class ReadPolicy:
    """How long one read may take and how often a transient failure is tried again."""

    timeout_s: float = ScoreConfig.read_timeout_s  # --read-timeout-s (the default lives in config)
    attempts: int = ScoreConfig.read_attempts  # --read-attempts: tries in all, for transient failures only
    backoff_s: float = 0.5  # before the 2nd try; doubled each try, with jitter, at most 10 s

    def call(self, fn, *args, retry=None):
        """``fn(*args)`` within the time limit, tried again after transient failures (``retry``,
        when given, runs before each new try: reopen a file the timed-out call may still hold)."""
        for attempt in range(1, self.attempts + 1):
            try:
                if attempt > 1 and retry is not None:
                    within(self.timeout_s, retry)
                return within(self.timeout_s, fn, *args)
            except Exception as exc:
                # A file that vanished or changed is transient for the next night, not for a retry now.
                if attempt == self.attempts or isinstance(exc, _NOT_NOW) or not is_transient(exc):
                    raise
                time.sleep(min(10.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random()))


def local_version(st: os.stat_result) -> str:
    """A local file's version as the listing records it and every read checks it: ``size:mtime_ns``
    (one spelling: a float mtime beside an integer one never matches)."""
    return f"{st.st_size}:{st.st_mtime_ns}"


def _local_open(path: str, version: str | None):
    """A local file opened without blocking (a pipe put there since the listing would block an
    ``open`` forever) and checked against its listing version; (file object, version now)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        now = local_version(st)
        if not stat.S_ISREG(st.st_mode):
            raise ChangedSinceListed(f"{path} is no longer a regular file: not opened")
        if version is not None and now != version:
            raise ChangedSinceListed(f"{path} changed since it was listed (size:mtime {version} -> {now})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0), now
    except BaseException:
        os.close(fd)
        raise


def _etag(version: str | None) -> str | None:
    return version.split(":", 1)[1] if version and ":" in version else None


def read_whole(uri: str, version: str | None, policy: ReadPolicy) -> bytes:
    """All bytes of one loose file, as listed: locally checked against its size and mtime before
    and after the read; on S3 one GET with ``If-Match`` on the listed ETag (a changed object
    answers 412, never mixed bytes)."""
    if storage.is_s3(uri):
        fs, path = storage.read_filesystem(uri, policy.timeout_s)
        return policy.call(_s3_get, fs, path, _etag(version))
    if storage.is_remote(uri):
        return policy.call(storage.read_bytes, uri)
    return policy.call(_local_read, storage.local_path(uri), version)


def _local_read(path: str, version: str | None) -> bytes:
    f, before = _local_open(path, version)
    with f:
        data = f.read()
        st = os.fstat(f.fileno())
    if local_version(st) != before or len(data) != st.st_size:
        raise ChangedSinceListed(f"{path} changed while it was read")
    return data


def _s3_get(fs, path: str, etag: str | None) -> bytes:
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> bytes:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    try:
        return sync(fs.loop, get)
    except OSError as exc:
        if "412" in str(exc) or "PreconditionFailed" in str(exc) or "pre-conditions" in str(exc):
            raise ChangedSinceListed(f"s3://{path} changed since it was listed (ETag is no longer {etag})") from exc
        raise


S3_BLOCK_BYTES = 4 * 2**20


class SteadyFile(io.RawIOBase):
    """A read-only file (local or object store) whose every read is bounded by the policy's time
    limit and retried after transient failures, reopened at the same offset (the timed-out call
    may still hold the old handle). Wrap it in ``io.BufferedReader`` so that archives read it in
    large pieces: a thread per piece, not per 512-byte tar block."""

    def __init__(self, uri: str, version: str | None, policy: ReadPolicy) -> None:
        super().__init__()
        self.uri, self.version, self.policy, self._pos = uri, version, policy, 0
        self._local = not storage.is_remote(uri)
        self._f = policy.call(self._open)
        self.size = self._f.size if hasattr(self._f, "size") else os.fstat(self._f.fileno()).st_size

    def _open(self):
        if self._local:
            f, now = _local_open(storage.local_path(self.uri), self.version)
            self.version = now  # what a reopen must still find
            return f
        fs, path = storage.read_filesystem(self.uri, self.policy.timeout_s)
        # Small ranged GETs (s3fs reads ahead 50 MiB by default): the time limit bounds one GET,
        # and 5 MiB in 60 s is a stalled store, where 50 MiB may be only a slow one.
        f = fs.open(path, "rb", block_size=S3_BLOCK_BYTES)
        etag, listed = f.details.get("ETag") if hasattr(f, "details") else None, _etag(self.version)
        if listed and etag and etag != listed:
            raise ChangedSinceListed(f"{self.uri} changed since it was listed (ETag {listed} -> {etag})")
        return f

    def _reopen(self) -> None:
        self._f = self._open()
        self._f.seek(self._pos)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = memoryview(buffer).cast("B")
        data = self.policy.call(self._f.read, len(want), retry=self._reopen)
        want[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence] + offset
        self._f.seek(self._pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - a handle a timed-out read still holds
                pass
        super().close()


def open_steady(uri: str, version: str | None, policy: ReadPolicy, buffer_bytes: int = 2**20) -> io.BufferedReader:
    """``SteadyFile`` behind a buffer of ``buffer_bytes``: what tar, zip and Parquet readers get."""
    return io.BufferedReader(SteadyFile(uri, version, policy), buffer_size=buffer_bytes)
