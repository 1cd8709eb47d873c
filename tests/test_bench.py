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


def _dihedral(img):
    import numpy as np

    flips = (img, img[:, ::-1])
    return [np.rot90(f, k) for f in flips for k in range(4)]


@pytest.mark.slow
def test_jax_recipe_augment_is_a_flip_turn_and_a_black_filled_shift():
    import numpy as np

    code = (
        "import sys, numpy as np, jax; sys.path.insert(0, %r)\n"
        "import jax_recipe as j\n"
        "x = np.random.default_rng(0).integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)\n"
        "np.save(sys.argv[1], np.stack([x, np.asarray(j.augment(x, jax.random.PRNGKey(1), 0)),\n"
        "                               np.asarray(j.augment(x, jax.random.PRNGKey(2), 2))]))\n"
    ) % str(REPO / "bench")
    out_file = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"aug-{os.getpid()}.npy"
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, str(out_file)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    x, plain, shifted = np.load(out_file)
    out_file.unlink()
    seen = set()
    for img, a in zip(x, plain):
        matches = [k for k, d in enumerate(_dihedral(img)) if np.array_equal(d, a)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) >= 4  # the transform is drawn per image
    for img, s in zip(x, shifted):
        found = False
        for d in _dihedral(img):
            padded = np.pad(d, ((2, 2), (2, 2), (0, 0)))
            found |= any(np.array_equal(padded[dy:dy + 8, dx:dx + 8], s) for dy in range(5) for dx in range(5))
        assert found  # one flip/turn, shifted by at most 2 px, and what comes in is black


@pytest.mark.slow
def test_jax_recipe_packs_the_products_patient_splits_and_trains_each(sample_dir, tmp_path):
    """pack keeps the product's split (corpus.make_split) and every cell losslessly at the size;
    train runs every split from fresh weights and reports its final epoch."""
    import numpy as np

    from malaria_ray import corpus
    from malaria_ray.preprocess import decode_image

    data = tmp_path / "cells"
    for cls in ("Parasitized", "Uninfected"):
        (data / cls).mkdir(parents=True)
        for path in sorted((sample_dir / cls).glob("*.png"))[::5]:  # 29 cells, every patient
            shutil.copy(path, data / cls / path.name)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    script = str(REPO / "bench" / "jax_recipe.py")
    out = subprocess.run([sys.executable, script, "pack", "--data", str(data), "--out", str(tmp_path / "pack"),
                          "--image-size", "32", "--splits", "0,1", "--procs", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    z = np.load(tmp_path / "pack" / "cells.npz")
    listing = corpus.list_corpus(str(data))
    for seed in (0, 1):
        assert np.array_equal(z[f"val_{seed}"], corpus.make_split(listing, "patient", 0.3, seed))
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import jax_recipe
        pixels, _ = jax_recipe.load_pack(str(tmp_path / "pack"))
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert np.array_equal(pixels[7], decode_image((data / z["name"][7]).read_bytes(), 32))

    out = subprocess.run([sys.executable, script, "train", "--pack", str(tmp_path / "pack"), "--epochs", "2",
                          "--batch-size", "8", "--precision", "fp32", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["split"] for r in results] == [0, 1]
    for r in results:
        mask = z[f"val_{r['split']}"]
        assert r["val_images"] == int(mask.sum()) == len(r["val_prob"]) == len(r["val_names"])
        assert r["val_names"] == z["name"][mask].tolist()
        assert [h["epoch"] for h in r["history"]] == [1, 2]
        assert r["history"][-1]["val_accuracy"] == r["val_accuracy"]
        assert r["errors"] == round((1 - r["val_accuracy"]) * r["val_images"])
    assert "mean over 2 split(s)" in out.stdout
    bad = subprocess.run([sys.executable, script, "train", "--pack", str(tmp_path / "pack"), "--splits", "5"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "split(s) [5] are not in" in bad.stderr
    big = subprocess.run([sys.executable, script, "train", "--pack", str(tmp_path / "pack"), "--batch-size", "4096"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert big.returncode == 2 and "larger than a split's training set" in big.stderr
