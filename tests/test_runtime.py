"""Starting or joining Ray (malaria_ray.runtime), as a user's shell sets it up."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_dashboard_url_in_ray_address_stops_the_run_with_one_line(sample_dir, tmp_path):
    """The README has users export RAY_ADDRESS=http://127.0.0.1:8265 for `ray job submit`; a run
    started in that shell gets one line saying what to unset (exit 2), before any Ray starts."""
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "malaria_ray.cli", "train", "--data", str(sample_dir),
                        "--output", str(tmp_path / "run"), "--smoke"], env=env, capture_output=True, text=True,
                       timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith("malaria-ray: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert lines[0].startswith("malaria-ray: error: RAY_ADDRESS=http://127.0.0.1:8265 is a Ray dashboard address")
    assert "env -u RAY_ADDRESS" in lines[0] and "ray job submit" in lines[0]
    assert "Ray" not in r.stderr.replace(lines[0], ""), "a Ray was started or joined"
    assert r.stdout == "", "logs and errors go to stderr; stdout is the command's output only"
    assert not (tmp_path / "run" / "model.keras").exists()
