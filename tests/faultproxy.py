"""A fault-injecting HTTP proxy in front of the S3 server on 127.0.0.1, for tests and bench/soak.py.

Real faults, on the wire, where a store and its network fail: ``FaultProxy(upstream)`` forwards each
request to the S3 server (moto) and fails a set share of them (``rate``, drawn from a seeded random
generator, so a run can be repeated) in one of these ways (``kinds``):

- ``503``: answered ``503 Slow Down`` with S3's SlowDown XML body, not forwarded;
- ``reset``: the connection reset (RST) after the request head arrived, not forwarded;
- ``lost``: forwarded (the store applied it), then the connection reset instead of the answer: the
  fault that tests whether a client's retry of a write is safe;
- ``stall``: no answer for ``stall_s`` seconds (longer than the client's read timeout), then closed.

Which requests may fail: those whose method is in ``methods`` (``COPY`` is S3's server-side copy, a
PUT with ``x-amz-copy-source``; the output writes are PUT, POST and COPY). ``counts`` holds the
requests seen by method, ``faults`` the faults injected by (kind, method), ``retried`` the faulted
requests the client sent again (same method and target). A second mode fails chosen requests only
(``fail_key``, ``fail_left``, ``fail_kind``, ``fail_methods``): every request of one of
``fail_methods`` (GET unless told) whose target holds ``fail_key`` fails as ``fail_kind`` (503
unless told) while ``fail_left`` > 0.

No Ray and no TensorFlow; the standard library only, so a bench script imports it as tests do.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time

KINDS = ("503", "reset", "lost", "stall")
WRITES = ("PUT", "POST", "COPY")
SLOWDOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class _Listener:
    """A TCP listener on 127.0.0.1 (``url``); a thread hands each accepted connection to
    ``_on_connection`` until ``close``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._on_connection(conn)

    def _on_connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


def _reset(conn: socket.socket) -> None:
    """Close with RST, not FIN: what the client sees when a peer or a middlebox drops the connection."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _read_request(conn: socket.socket) -> tuple[list[bytes], bytes] | None:
    """The request's head lines and its body (Content-Length or chunked), or None when the client
    closed first. Answers ``Expect: 100-continue`` so a client waiting for it sends its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines[1:])}
    if headers.get(b"expect", b"").lower() == b"100-continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not _chunked_complete(body):
            chunk = conn.recv(65536)
            if not chunk:
                return None
            body += chunk
    else:
        length = int(headers.get(b"content-length", b"0") or 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            body += chunk
    return lines, body


def _chunked_complete(body: bytes) -> bool:
    at = 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return False
        size = int(body[at:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return body.find(b"\r\n\r\n", end) >= 0  # the last chunk, its trailers, an empty line
        at = end + 2 + size + 2
        if len(body) < at:
            return False


class FaultProxy(_Listener):
    """An HTTP proxy in front of the S3 server (module docstring): one request per connection,
    forwarded as is, except the ones it fails."""

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 methods: tuple[str, ...] = ("GET", *WRITES), stall_s: float = 5.0,
                 fail_key: str = "", fail_left: int = 0, fail_kind: str = "503",
                 fail_methods: tuple[str, ...] = ("GET",)) -> None:
        unknown = {*kinds, fail_kind} - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}: known {KINDS}")
        self.upstream = upstream.split("//", 1)[1].split(":")
        self.rate, self.kinds, self.methods, self.stall_s = rate, tuple(kinds), tuple(methods), stall_s
        self.fail_key, self.fail_left, self.failed = fail_key, fail_left, 0
        self.fail_kind, self.fail_methods = fail_kind, tuple(fail_methods)
        self.gets: list[str] = []  # the target of every GET (reads, and listings)
        self.counts: collections.Counter = collections.Counter()  # requests by method
        self.faults: collections.Counter = collections.Counter()  # (kind, method) -> faults injected
        self.retried = 0
        self._random = random.Random(seed)
        self._faulted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        super().__init__()

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def injected(self) -> int:
        return sum(self.faults.values())

    def figures(self) -> dict:
        """What it saw and did, for a report: requests by method, faults by kind and by method, retries."""
        by_kind, by_method = collections.Counter(), collections.Counter()
        for (kind, method), n in self.faults.items():
            by_kind[kind] += n
            by_method[method] += n
        return {"requests": self.requests, "requests_by_method": dict(sorted(self.counts.items())),
                "faults": self.injected(), "faults_by_kind": dict(sorted(by_kind.items())),
                "faults_by_method": dict(sorted(by_method.items())), "retries_seen": self.retried}

    def _on_connection(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _decide(self, method: str, target: str) -> str | None:
        """The fault for this request (or None), counted; notes a retry of a faulted request."""
        with self._lock:
            self.counts[method] += 1
            if method == "GET":
                self.gets.append(target)
            if (method, target) in self._faulted:
                self._faulted.discard((method, target))
                self.retried += 1
            kind = None
            if self.fail_key:
                if method in self.fail_methods and self.fail_key in target and self.fail_left > 0:
                    self.fail_left -= 1
                    self.failed += 1
                    kind = self.fail_kind
            elif method in self.methods and self.rate > 0 and self._random.random() < self.rate:
                kind = self._random.choice(self.kinds)
            if kind is not None:
                self.faults[(kind, method)] += 1
                self._faulted.add((method, target))
            return kind

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn)
            if request is None:
                conn.close()
                return
            lines, body = request
            method, target = (p.decode() for p in lines[0].split(b" ")[:2])
            if method == "PUT" and any(h.lower().startswith(b"x-amz-copy-source:") for h in lines[1:]):
                method = "COPY"
            kind = self._decide(method, target)
            if kind == "503":
                payload = b"" if method == "HEAD" else SLOWDOWN
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                conn.close()
                return
            if kind == "reset":
                _reset(conn)
                return
            if kind == "stall":
                time.sleep(self.stall_s)
                _reset(conn)
                return
            kept = [h for h in lines[1:] if not h.lower().startswith((b"connection:", b"expect:"))]
            forwarded = b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + body
            with socket.create_connection((self.upstream[0], int(self.upstream[1]))) as up:
                up.sendall(forwarded)
                answer = b""
                while chunk := up.recv(65536):
                    if kind == "lost":
                        answer += chunk  # read it all: the store has applied the request
                    else:
                        conn.sendall(chunk)
            if kind == "lost":
                _reset(conn)
                return
            conn.close()
        except OSError:  # the client gave up (its timeout) or reset: nothing to forward to
            conn.close()
