"""Application metrics (``malaria_ray.telemetry``) as Prometheus sees them: real scoring runs on
real NIH cells (and SYNTHETIC fields), then the counters read from the local Ray's metrics
endpoint, parsed with prometheus_client, must equal the run's own counts in its manifest.

The in-process test reads the session Ray's endpoint (each run's series carry its run_id, so the
session's other runs do not disturb it); the ``fresh`` one runs ``malaria-ray score
--metrics-export-port`` as a user does and reads the endpoint while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pyarrow as pa
import pytest

from malaria_ray import cli, runtime, schema, telemetry
from malaria_ray.config import ConfigError

POLL_S = 60  # the session Ray reports every 10 s (Ray's default): a few intervals at most


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def wait_for(port: int, expected: dict[tuple, float]) -> dict[tuple, float]:
    """Scrape until every ``(name, labels...)`` key shows its expected value, or POLL_S pass;
    returns what was last seen (the caller asserts)."""
    deadline = time.monotonic() + POLL_S
    while True:
        text = scrape(port)
        seen = {key: value(text, key[0], **dict(key[1:])) for key in expected}
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(1)


def key(name: str, **labels: str) -> tuple:
    return (name, *sorted(labels.items()))


def test_counting_never_fails_a_batch(monkeypatch, caplog):
    """A process that cannot make its metrics (here: ray.util.metrics raising) logs one warning
    and goes on without them; nothing reaches the batch."""
    import ray.util.metrics

    def broken(*args, **kwargs):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(ray.util.metrics, "Counter", broken)
    monkeypatch.setattr(telemetry, "_meters", None)
    monkeypatch.setattr(telemetry, "_disabled", False)
    status = pa.chunked_array([[schema.STATUS_OK, schema.STATUS_ERROR]])
    with caplog.at_level(logging.WARNING, logger="malaria-ray"):
        for _ in range(3):
            telemetry.count_rows(status, pa.chunked_array([[None, schema.ERROR_TRANSIENT]]), "r", "m", telemetry.INPUT_CELLS)
            telemetry.observe_predict(0.1, "r", "m")
    warnings = [r.getMessage() for r in caplog.records if "application metrics are off" in r.getMessage()]
    assert len(warnings) == 1 and "no metrics agent" in warnings[0], warnings
    assert telemetry._disabled


def test_metrics_port_is_checked_before_ray_starts(monkeypatch):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics-export-port {taken} is taken"):
            runtime.check_metrics_port(taken)
    with pytest.raises(ConfigError, match="1024..65535"):
        runtime.check_metrics_port(80)
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    # which of the two it says depends on whether this test session's Ray is already up (test order)
    where = "this process is already connected to Ray" if ray.is_initialized() else "RAY_ADDRESS is set"
    with pytest.raises(ConfigError, match=where):
        with runtime.ray_for("score", 9999):
            pytest.fail("entered")


@pytest.mark.ray
@pytest.mark.tf
def test_metrics_endpoint_counts_what_the_runs_counted(ray_session, sample_dir, score_model, tmp_path):
    """A run of 16 real cells and 2 broken files, and a --fields run of 2 SYNTHETIC fields and a
    broken photograph: every counter equals its run's manifest. (The cells-per-field histogram's
    _sum is Ray's estimate from bucket midpoints, so the exact cells_found counter is compared.)"""
    from malaria_ray import synth_fields

    cells, fields = tmp_path / "cells", tmp_path / "fields"
    for cls in ("Parasitized", "Uninfected"):
        (cells / cls).mkdir(parents=True)
        for p in sorted((sample_dir / cls).glob("*.png"))[:8]:
            shutil.copy(p, cells / cls / p.name)
    for i in range(2):
        (cells / "Uninfected" / f"broken-{i}.png").write_bytes(b"not a png")
    synth_fields.write_fields(str(fields), 2, slides=1)
    (fields / "slide-0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    manifests = {}
    for name, flags in (("cells", []), ("fields", ["--fields"])):
        run_id = f"metrics-{name}-{os.getpid()}"
        argv = ["score", "--input", str(tmp_path / name), "--model", str(score_model), "--output",
                str(tmp_path / f"out-{name}"), "--run-id", run_id, "--max-error-fraction", "1", *flags]
        assert cli.main(argv) == 0
        manifests[name] = json.loads((tmp_path / f"out-{name}" / "runs" / run_id / "manifest.json").read_text())
    cell_run, field_run = manifests["cells"], manifests["fields"]
    assert cell_run["counts"]["scored"] == 16 and cell_run["counts"]["errors"] == 2  # the inputs, as made
    assert field_run["counts"]["fields_scored"] == 2 and field_run["counts"]["errors"] == 1

    expected = {}
    for m, input_ in ((cell_run, telemetry.INPUT_CELLS), (field_run, telemetry.INPUT_FIELDS)):
        tags = {"run_id": m["run_id"], "model_id": m["model_id"]}
        expected[key("ray_malaria_images_scored_total", **tags, input=input_)] = m["counts"]["scored"]
        for error_kind, n in m["error_kinds"].items():
            expected[key("ray_malaria_error_rows_total", **tags, input=input_, error_kind=error_kind)] = n
    tags = {"run_id": field_run["run_id"]}
    expected[key("ray_malaria_fields_detected_total", **tags)] = field_run["counts"]["fields_scored"]
    expected[key("ray_malaria_cells_per_field_count", **tags)] = field_run["counts"]["fields_scored"]
    expected[key("ray_malaria_cells_found_total", **tags)] = field_run["counts"]["scored"]  # every cell found is scored

    (node,) = [n for n in ray_session.nodes() if n["Alive"]]
    seen = wait_for(node["MetricsExportPort"], expected)
    assert seen == expected, {k: (seen[k], v) for k, v in expected.items() if seen[k] != v}
    # One model call per batch with rows to score, each timed: 16 cells in one batch of 256.
    text = scrape(node["MetricsExportPort"])
    assert value(text, "ray_malaria_predict_seconds_count", run_id=cell_run["run_id"]) >= 1
    assert value(text, "ray_malaria_predict_seconds_sum", run_id=cell_run["run_id"]) > 0


@pytest.mark.fresh
@pytest.mark.timeout(300)
def test_malaria_ray_score_serves_metrics_on_the_given_port(sample_dir, score_model, tmp_path):
    """``malaria-ray score --metrics-export-port P``: while the command runs, its local Ray serves
    Prometheus text on P, Ray's own metrics and the run's (exported every second here, through
    Ray's ``RAY_metrics_report_interval_ms``; 10 s by default); at the end no Ray is left."""
    from test_commands import _ray_processes, fresh_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not _ray_processes(), f"a Ray instance is already running: {_ray_processes()}"
    env = {**fresh_env(), "RAY_metrics_report_interval_ms": "1000"}
    proc = subprocess.Popen(["malaria-ray", "score", "--input", str(sample_dir), "--model", str(score_model),
                             "--output", "out", "--metrics-export-port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pages: list[str] = []

    def poll() -> None:
        while proc.poll() is None:
            try:
                pages.append(scrape(port))
            except OSError:
                pass
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate(timeout=240)
    poller.join(timeout=15)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in err
    assert pages and any("\nray_" in p for p in pages), "the endpoint never answered while the run ran"
    scored = max(value(p, "ray_malaria_images_scored_total", input=telemetry.INPUT_CELLS) for p in pages)
    assert 0 < scored <= 288, scored  # the last export may come after the last scrape
    assert not _ray_processes(), f"the command left Ray running: {_ray_processes()}"
