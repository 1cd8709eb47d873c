"""The carry for the lent GPU machines (device/): its slimming rules, pins and size check on small
fake trees (cheap), and, marked ``device`` (never in ``make test``), the real build and dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "device" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


carry = _load("build_carry")
gpu_report = _load("gpu_report")


@pytest.mark.parametrize("path", [
    "ray/rllib/algorithms/ppo.py", "ray/serve/api.py", "ray/llm/__init__.py", "ray/jars/ray_dist.jar",
    "ray/dashboard/client/build/static/js/main.js", "ray/workflow/__init__.py", "ray/train/examples/tf/mnist.py",
    "ray/tune/examples/__init__.py", "ray/includes/common.pxd", "ray/includes/unique_ids.pxi", "ray/_raylet.pyi",
    "ray/rllib/__init__.pyi", "skimage/feature/tests/test_peak.py", "skimage/data/astronaut.png",
    "fontTools/misc/bezierTools.c", "fonttools-4.68.0.data/data/share/man/man1/ttx.1",
    "matplotlib/mpl-data/sample_data/goog.npz", "keras/src/__pycache__/x.cpython-312.pyc",
])
def test_slimming_drops(path):
    assert carry.dropped(path), path


@pytest.mark.parametrize("path", [
    "ray/__init__.py", "ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server",
    "ray/tune/__init__.py", "ray/train/v2/jax/jax_trainer.py", "ray/data/dataset.py",
    "ray/dashboard/modules/job/common.py", "ray/dashboard/utils.py", "ray/_private/runtime_env/agent/main.py",
    "ray-2.60.0.dist-info/METADATA", "skimage/filters/__init__.pyi", "skimage/data/__init__.py",
    "skimage/data/_registry.py", "keras/src/applications/resnet_v2.py", "matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf",
    "pydantic_core/_pydantic_core.cpython-312-x86_64-linux-gnu.so",
])
def test_slimming_keeps(path):
    assert carry.dropped(path) is None, path


def test_stage_unzips_a_wheel_without_the_dropped_paths_and_keeps_exec_bits(tmp_path):
    wheel = tmp_path / "ray-0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("ray/__init__.py", "x = 1\n")
        z.writestr("ray/rllib/big.py", "0" * 1000)
        z.writestr("ray/train/examples/demo.py", "0" * 10)
        info = zipfile.ZipInfo("ray/core/src/ray/raylet/raylet")
        info.external_attr = 0o755 << 16
        z.writestr(info, "\x7fELF")
    gone = carry.stage([wheel], tmp_path / "site")
    files = sorted(p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert files == ["ray/__init__.py", "ray/core/src/ray/raylet/raylet"]
    assert os.access(tmp_path / "site/ray/core/src/ray/raylet/raylet", os.X_OK)
    assert gone == {"RLlib": 1000, "examples": 10}


def test_size_check_fails_over_the_limit_and_says_what_is_carried():
    mib = carry.MIB
    assert carry.over_limit({"device/carry": 50 * mib, "working tree": 5 * mib}) is None
    message = carry.over_limit({"device/carry": 57 * mib, "working tree": 4 * mib})
    assert "61.0 MiB" in message and "device/carry 57.0 MiB" in message and "working tree 4.0 MiB" in message


def test_the_pins_are_exact_and_leave_out_what_the_gpu_machine_has():
    pins = carry.requirements(carry.REQUIREMENTS.read_text())
    names = {name for name, _ in pins}
    assert ("ray", "2.60.0") in pins and ("keras", "3.15.1") in pins
    assert not names & carry.DEVICE_HAS
    assert len(names) == len(pins)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"ray[data,train,default]==2.60.0"' in pyproject and '"keras==3.15.1"' in pyproject  # the product's pins
    with pytest.raises(ValueError, match="pin"):
        carry.requirements("ray>=2.60\n")


def test_cells_are_picked_across_the_sorted_names():
    names = [f"C{i:03d}_cell.png" for i in range(100)]
    picked = carry.pick(names[::-1], 4)
    assert picked == ["C000_cell.png", "C025_cell.png", "C050_cell.png", "C075_cell.png"]
    assert carry.pick(names[:3], 10) == names[:3]


def test_gpu_report_sets_each_job_against_the_bare_model(tmp_path):
    summary = "  images scored         50,000\n  throughput          9,000.0 images/s over 5.6 s\n"
    for precision, rate in (("fp32", "6,000.0"), ("bf16", "9,000.0")):
        (tmp_path / f"score-{precision}.log").write_text(summary.replace("9,000.0", rate))
    (tmp_path / "bare.json").write_text(json.dumps([
        {"phase": f"infer-{p}-{w}-b1024", "images_per_s": v, "t0": 10.0, "t1": 20.0}
        for p, w, v in (("fp32", "device", 70000.0), ("fp32", "host", 60000.0), ("bf16", "device", 95000.0),
                        ("bf16", "host", 80000.0))]))
    (tmp_path / "phases.txt").write_text("score-fp32 start 1.0\nscore-fp32 end 2.0\nscore-bf16 start 3.0\nscore-bf16 end 4.0\n")
    lines = gpu_report.report(tmp_path, 1024)
    assert "| score fp32, 50,000 images, 5.6 s | 6,000 | 0.10x bare fp32 host | - |" in lines
    assert "| score bf16, 50,000 images, 5.6 s | 9,000 | 0.11x bare bf16 host | - |" in lines
    assert gpu_report.utilisation("2026/11/27 10:00:00.500, 40, 5\nbad\n", 0, 4e9) == 40.0


def test_gpu_run_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "device" / "gpu_run.sh")], check=True)


@pytest.mark.device
def test_the_carry_builds_under_the_limit_and_runs_under_python_312():
    """The whole thing: download and pack (if device/carry/ is not built yet), then the dry run:
    the unpacked carry under Python 3.12 with only the GPU machine's packages, imports, a Ray Data
    and a Train V2 job, the real score CLI, and device/gpu_run.sh's CPU variant. Starts Ray: run
    it alone, under the lock (docs/device.md)."""
    script = str(REPO / "device" / "build_carry.py")
    if not (carry.CARRY / carry.TAR_NAME).exists():
        subprocess.run([sys.executable, script, "build", "--xz-preset", "6"], check=True, timeout=1800)
    out = subprocess.run([sys.executable, script, "dry"], check=True, stdout=subprocess.PIPE, text=True, timeout=3600)
    print(out.stdout)  # carry_check's steps, gpu_run.sh's report, the dry run's figures: shown with -s
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["python"].startswith("3.12.")
    assert sum(result["carried"].values()) <= carry.LIMIT_MIB * carry.MIB
