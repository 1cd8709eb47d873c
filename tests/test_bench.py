"""bench/gpu_ceiling.py runs as documented (a subprocess, Keras on JAX) and measures what it says."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from datetime import datetime

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_ceiling_measures_every_phase_on_real_pngs(sample_dir, tmp_path):
    pngs = tmp_path / "png"
    pngs.mkdir()
    for path in sorted((sample_dir / "Parasitized").glob("*.png"))[:24] + sorted((sample_dir / "Uninfected").glob("*.png"))[:24]:
        shutil.copy(path, pngs / path.name)
    smi = tmp_path / "smi.csv"  # nvidia-smi's format, a sample every 5 ms through the next 5 minutes
    now = time.time()
    smi.write_text("not a row\n" + "".join(
        f"{datetime.fromtimestamp(now + i / 200).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, {10 + 20 * (i % 2)}, 5\n"
        for i in range(60000)))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "bench" / "gpu_ceiling.py"), "--image-size", "32", "--batch-size", "4",
           "--infer-batch", "4,8", "--seconds", "0.2", "--precisions", "bf16,fp32", "--skip", "train",
           "--decode-dir", str(pngs), "--procs", "2", "--smi", str(smi), "--json", str(tmp_path / "m.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    records = {r["phase"]: r for r in json.loads((tmp_path / "m.json").read_text())}
    assert set(records) == {"decode-1proc", "decode-2proc"} | {
        f"infer-{p}-{where}-b{b}" for p in ("bf16", "fp32") for where in ("device", "host") for b in (4, 8)}
    assert records["decode-2proc"]["images"] == 2 * 48  # the set, decoded once per process
    assert all(r["images_per_s"] > 0 and 10 <= r["gpu_util_mean"] <= 30 for r in records.values())
    assert "| infer-bf16-host-b8 |" in out.stdout and "x infer-bf16-device-b8 |" in out.stdout
    assert "x infer-fp32-device-b4 |" in out.stdout and "x decode-1proc |" in out.stdout


@pytest.mark.slow
def test_gpu_ceiling_train_step_learns(tmp_path):
    """The bare step is a real train step: twenty steps on one fixed batch lower its loss."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import gpu_ceiling as g\n"
        "g.train_ceiling('fp32', 32, 8, 0.0)\n"
        "r = g.PHASES[-1]\n"
        "print(r['steps'], r['loss_first'], r['loss'])\n"
    ) % str(REPO / "bench")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    steps, first, last = out.stdout.split()[-3:]
    assert int(steps) == 20
    assert float(last) < 0.5 * float(first)
