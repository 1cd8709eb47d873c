"""One log format for the project's commands: ``2026-11-26 23:01:27 malaria-ray.train: ...`` on stderr.

stdout carries only a command's output (the summary at the end of a run, printed, not logged), so
``malaria-ray score ... > summary.txt`` or a scheduler that keeps the two streams apart gets the
summary alone; progress and warnings go to stderr with Ray's own.

Library modules log through ``get(name)`` and configure nothing, on import or otherwise; records
propagate, so an application that calls the package (a notebook, a service) sees them in its own
handlers. The application configures logging: ``setup()`` is the command's (``cli``);
``setup_worker()`` is for the Ray Train worker that speaks for a run.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
ROOT = "malaria-ray"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a redirect, a test's capture),
    not the stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(level: int = logging.INFO) -> logging.Logger:
    """The command's logging: one stderr handler on the project's logger (idempotent). Records
    still propagate: a process that has a root handler of its own sees them there too."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logger.addHandler(handler)
    return logger


def setup_worker(level: int = logging.INFO) -> logging.Logger:
    """In a Ray worker, Ray is the application: Ray Train's workers give the root logger a console
    handler (stderr, streamed to the driver under the worker's prefix) and Ray Train's log files,
    and the project's records go there; a handler of ours as well would print each line twice.
    A worker without a root handler gets ``setup()``'s."""
    if logging.getLogger().handlers:
        logger = logging.getLogger(ROOT)
        logger.setLevel(level)
        return logger
    return setup(level)


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{name}")
