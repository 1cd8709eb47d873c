"""Logs on stderr, the command's output on stdout, handlers left to the application."""

from __future__ import annotations

import logging
import subprocess
import sys

from malaria_ray import logs


def test_importing_the_package_configures_no_logging():
    """A library configures nothing on import: no handler on the root or the project's logger,
    and the project's records propagate to whatever the application installs."""
    code = ("import logging, malaria_ray.cli, malaria_ray.score, malaria_ray.train, malaria_ray.runtime, "
            "malaria_ray.scoringrun, malaria_ray.resources; p = logging.getLogger('malaria-ray'); "
            "print(logging.getLogger().handlers, p.handlers, p.propagate, p.level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] [] True 0"


def test_the_command_logs_to_stderr_and_an_applications_handler_sees_it_too(capsys):
    """setup() (what the CLI runs) writes records to stderr in the one format, stdout stays the
    command's output, and a handler the application put on the root logger still gets them."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        logs.setup()
        logs.setup()  # idempotent: one line per record
        logs.get("score").info("scoring 3 images")
    finally:
        logging.getLogger().removeHandler(keep)
    said = capsys.readouterr()
    assert said.out == ""
    assert said.err.count("malaria-ray.score: scoring 3 images") == 1, said.err
    assert seen == ["scoring 3 images"]
