"""One log format for every entrypoint and worker: ``2026-11-26 23:01:27 malaria-ray.train: ...``.

Library modules log through ``get(name)``; ``setup()`` (entrypoints, Train workers, scoring
actors) attaches the single handler. Summaries at the end of a run are printed, not logged: they
are the command's output.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
ROOT = "malaria-ray"


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted (a redirect, a test's capture),
    not the stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(level: int = logging.INFO) -> logging.Logger:
    """Attach one stdout handler to the project's root logger (idempotent)."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        root.addHandler(handler)
        root.setLevel(level)
        # Not to the root logger as well: Ray Train's workers install a root handler, and every
        # line would print twice (once bare, once formatted).
        root.propagate = False
    return root


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{name}")
