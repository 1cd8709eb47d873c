"""The carry: what a lent GPU machine lacks to run the product's own paths, packed to fit a run.

The lent machines (one H100/H200, 16 CPUs, Python 3.12) have JAX, PyTorch, pyarrow, pandas,
Pillow and scikit-learn, but neither Ray nor Keras nor TensorFlow, and no network. A run carries at
most 64 MiB of the working tree. Ray's wheel alone unpacks to 200 MB, so this script slims it
(no RLlib, Serve, LLM, Java jars, dashboard web client, examples, type stubs; the three big
binaries stripped) and packs it with Keras and the rest of device/carry-requirements.txt into one
tar.xz, beside ~1,200 real NIH cells to score there. ``score --backend jax`` then runs on the
GPU with Keras on JAX, no TensorFlow needed (docs/device.md).

    python device/build_carry.py build             # download, slim, pack, copy cells: device/carry/
    python device/build_carry.py check             # the size check alone
    flock /tmp/malaria-ray-ray.lock python device/build_carry.py dry   # run the carry here under Python 3.12
    python device/build_carry.py unpack DEST       # what device/gpu_run.sh does first

``dry`` unpacks the tar into a temporary folder and runs device/carry_check.py and the CPU
variant of device/gpu_run.sh in a Python 3.12 venv holding only what the GPU machine has
(device/.build/venv312; JAX on CPU, no PyTorch). Stdlib only: it runs on the device too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / "device" / "carry"  # ignored by git; a run carries it with carry=["device/carry"]
BUILD = REPO / "device" / ".build"  # ignored, never carried: wheels, the staging tree, the venv
REQUIREMENTS = REPO / "device" / "carry-requirements.txt"
TAR_NAME = "site.tar.xz"
MIB = 1 << 20
LIMIT_MIB = 60  # the run's cap is 64 MiB for everything carried; 4 MiB left for the tree's growth
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")  # h5py, optree: 2_28 only

# What the GPU machine already has: never carried (the dry run's venv installs exactly these, with
# their own dependencies). PyTorch is there too, but too big for the dry venv, so what torch brings
# (filelock, fsspec, typing-extensions...) is carried anyway where Ray or Keras need it.
DEVICE_PACKAGES = ("jax[cpu]>=0.10,<0.12", "numpy", "pyarrow", "pandas", "pillow", "scikit-learn")
DEVICE_HAS = frozenset({"jax", "jaxlib", "numpy", "pyarrow", "pandas", "pillow", "scikit-learn", "scipy", "ml-dtypes",
                        "opt-einsum", "python-dateutil", "tzdata", "joblib", "threadpoolctl", "torch"})

# Slimming rules, on paths inside the unpacked tree (site-packages layout). Each prefix or suffix
# says why it can go; none of it is imported by ray, ray.data, ray.train, keras or scoring.
DROP_PREFIXES = {
    "ray/rllib/": "RLlib",
    "ray/serve/": "Ray Serve",
    "ray/llm/": "Ray LLM",
    "ray/jars/": "Java jars",
    "ray/dashboard/client/build/": "the dashboard's web client (its Python modules stay)",
    "ray/workflow/": "Ray Workflows (a stub)",
    "matplotlib/mpl-data/sample_data/": "matplotlib sample data",
    "skimage/data/": "scikit-image's sample images",
}
KEEP_PREFIXES = ("skimage/data/__init__.py", "skimage/data/_")  # the module itself: imported lazily by name
KEEP_SUFFIXES = ("/__init__.pyi",)  # lazy_loader.attach_stub reads them: scikit-image's submodules import through them
DROP_PARTS = {"examples": "examples", "tests": "tests", "__pycache__": "bytecode"}
DROP_SUFFIXES = {".pyi": "type stubs", ".pxd": "Cython declarations", ".pxi": "Cython includes",
                 ".pyx": "Cython sources", ".c": "C sources", ".js.map": "source maps"}
STRIPPED = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")


def dropped(path: str) -> str | None:
    """Why ``path`` (relative to the tree, '/'-separated) is left out of the carry, or None to keep it."""
    top = path.split("/", 1)[0]
    if top.endswith(".data"):
        return "wheel data (scripts, man pages)"
    for prefix, why in DROP_PREFIXES.items():
        if path.startswith(prefix) and not path.startswith(KEEP_PREFIXES):
            return why
    for part in path.split("/")[1:-1]:
        if part in DROP_PARTS:
            return DROP_PARTS[part]
    for suffix, why in DROP_SUFFIXES.items():
        if path.endswith(suffix) and not path.endswith(KEEP_SUFFIXES):
            return why
    return None


def requirements(text: str) -> list[tuple[str, str]]:
    """(name, version) of each ``name==version`` line; anything else but comments is refused, so
    the carry is exactly the list."""
    pins = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in name for c in "<>=!~[; "):
            raise ValueError(f"{REQUIREMENTS.name}: {line!r} is not a name==version pin")
        pins.append((normal(name), version))
    return pins


def normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return name.lower().replace("_", "-").replace(".", "-")


def over_limit(sizes: dict[str, int], limit_mib: float = LIMIT_MIB) -> str | None:
    """The failure message when the carried bytes together pass ``limit_mib``, else None."""
    total = sum(sizes.values())
    if total <= limit_mib * MIB:
        return None
    parts = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sizes.items())
    return f"the carry is {total / MIB:.1f} MiB ({parts}), over the {limit_mib} MiB limit: a run carries at most 64 MiB"


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def worktree_bytes() -> int:
    """What a run carries besides ``carry``: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout
    paths = (REPO / p for p in out.decode().split("\0") if p)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def carried_sizes() -> dict[str, int]:
    return {"device/carry": tree_bytes(CARRY), "working tree": worktree_bytes()}


def check_size() -> dict[str, int]:
    sizes = carried_sizes()
    if message := over_limit(sizes):
        sys.exit(f"build_carry: {message}")
    return sizes


# --- build ---------------------------------------------------------------------------------------

def download(dest: Path) -> list[Path]:
    """The pinned wheels, cp312 manylinux x86_64, exactly one per line of the requirements."""
    pins = requirements(REQUIREMENTS.read_text())
    if clash := sorted({n for n, _ in pins} & DEVICE_HAS):
        sys.exit(f"build_carry: {REQUIREMENTS.name} lists {clash}, which the GPU machine already has")
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                    "-r", str(REQUIREMENTS)], check=True)
    wheels = []
    for name, version in pins:
        found = [w for w in dest.glob("*.whl") if normal(w.name.split("-")[0]) == name and w.name.split("-")[1] == version]
        if len(found) != 1:
            sys.exit(f"build_carry: expected one wheel of {name}=={version} in {dest}, found {found}")
        wheels += found
    return wheels


def stage(wheels: list[Path], site: Path) -> dict[str, int]:
    """Unzips the wheels into ``site`` without what ``dropped`` names; returns dropped bytes by reason."""
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    gone: dict[str, int] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                if why := dropped(info.filename):
                    gone[why] = gone.get(why, 0) + info.file_size
                    continue
                target = site / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if mode := (info.external_attr >> 16) & 0o777:
                    target.chmod(mode)
    return gone


def has_debug_info(path: Path) -> bool:
    """An ELF file carrying DWARF sections (many wheels' extension modules do: kiwisolver's is 5.7 MB)."""
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return False
    sections = subprocess.run(["readelf", "-S", "--wide", str(path)], capture_output=True, text=True).stdout
    return ".debug_info" in sections


def strip_binaries(site: Path) -> dict[str, list[int]]:
    """``strip --strip-unneeded`` on Ray's three big binaries (debug symbols: 35 MB of 120), and
    ``strip --strip-debug`` (DWARF only; symbol tables stay) on every other ELF file that has
    DWARF sections. The dry run loads them: a file strip broke would fail there."""
    if not (shutil.which("strip") and shutil.which("readelf")):
        sys.exit("build_carry: `strip` or `readelf` not found: install binutils (apt-get install binutils)")
    sizes = {}
    for rel in STRIPPED:
        path = site / rel
        before = path.stat().st_size
        subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
        sizes[rel] = [before, path.stat().st_size]
    others = [p for p in sorted(site.rglob("*")) if p.is_file() and p.relative_to(site).as_posix() not in STRIPPED
              and has_debug_info(p)]
    before = sum(p.stat().st_size for p in others)
    if others:
        subprocess.run(["strip", "--strip-debug", *map(str, others)], check=True)
    sizes[f"{len(others)} other ELF files with DWARF"] = [before, sum(p.stat().st_size for p in others)]
    return sizes


def pack(site: Path, tar_path: Path, preset: str) -> float:
    """``site`` as one tar.xz (names sorted, owners zeroed: the same tree packs to the same bytes);
    returns the seconds it took."""
    t0 = time.perf_counter()
    tmp = BUILD / f"{tar_path.name}.partial"  # never in device/carry/, so a failed pack is not carried
    with open(tmp, "wb") as out:
        tar = subprocess.Popen(["tar", "-C", str(site), "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
                                "--mtime=2000-01-01", "-cf", "-", "."], stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", f"-{preset}", "-T1", "-c"], stdin=tar.stdout, stdout=out)
        tar.stdout.close()
        if tar.wait() or xz.returncode:
            sys.exit(f"build_carry: packing {site} failed (tar {tar.returncode}, xz {xz.returncode})")
    tmp.replace(tar_path)
    return time.perf_counter() - t0


def sample_dir() -> Path:
    return Path(os.environ.get("MALARIA_SAMPLE_DIR", REPO.parent / "shared" / "data" / "nih_malaria"))


def pick(files: list[str], n: int) -> list[str]:
    """``n`` of ``files`` spread evenly over the sorted list (NIH names sort by slide, so the pick
    spans the sample's patients rather than the first few)."""
    files = sorted(files)
    if n >= len(files):
        return files
    return [files[i * len(files) // n] for i in range(n)]


def copy_cells(source: Path, dest: Path, n: int) -> int:
    """``n`` real NIH cells, half per class, under ``dest/{Parasitized,Uninfected}``."""
    shutil.rmtree(dest, ignore_errors=True)
    count = 0
    for cls in ("Parasitized", "Uninfected"):
        names = [p.name for p in (source / cls).glob("*.png")]
        if not names:
            sys.exit(f"build_carry: no cells under {source / cls}: set MALARIA_SAMPLE_DIR to the NIH sample")
        (dest / cls).mkdir(parents=True)
        for name in pick(names, n // 2):
            shutil.copyfile(source / cls / name, dest / cls / name)
            count += 1
    (dest / "SOURCE.md").write_text(
        f"{count} cells copied byte for byte from the NIH/NLM malaria cell images (public domain; see\n"
        f"{source.name}/SOURCE.md in the shared data), half per class, spread over the sorted names.\n")
    return count


def build(args) -> dict:
    t0 = time.perf_counter()
    wheels = download(BUILD / "wheels")
    site = BUILD / "site"
    gone = stage(wheels, site)
    stripped = strip_binaries(site)
    CARRY.mkdir(parents=True, exist_ok=True)
    unpacked = tree_bytes(site)
    pack_s = pack(site, CARRY / TAR_NAME, args.xz_preset)
    cells = copy_cells(Path(args.sample_dir) if args.sample_dir else sample_dir(), CARRY / "cells", args.cells)
    ray_bytes = tree_bytes(site / "ray")
    manifest = {"wheels": sorted(w.name for w in wheels), "xz_preset": args.xz_preset, "cells": cells,
                "unpacked_bytes": unpacked, "ray_unpacked_bytes": ray_bytes, "dropped_bytes": gone,
                "stripped_bytes": stripped, "tar_bytes": (CARRY / TAR_NAME).stat().st_size, "pack_s": round(pack_s, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (CARRY / "carry.json").write_text(json.dumps(manifest, indent=1))
    manifest["carried"] = check_size()
    manifest["build_s"] = round(time.perf_counter() - t0, 1)
    return manifest


# --- unpack and dry run --------------------------------------------------------------------------

def unpack(tar_path: Path, dest: Path) -> float:
    """The tar into ``dest`` (Python's tarfile: no xz binary needed); returns the seconds it took."""
    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "r:xz") as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return time.perf_counter() - t0


def python312() -> str:
    """A Python 3.12 interpreter: $CARRY_PYTHON, python3.12 on PATH, or pyenv's."""
    if found := os.environ.get("CARRY_PYTHON") or shutil.which("python3.12"):
        return found
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(root.glob("3.12*/bin/python3.12"), reverse=True):
        return str(candidate)
    sys.exit("build_carry: no Python 3.12 found (the GPU machine's version): set CARRY_PYTHON=/path/to/python3.12")


def device_venv(venv: Path) -> Path:
    """A venv holding only what the GPU machine has (JAX on CPU here; no PyTorch: 1 GB, and nothing
    of ours imports it). Created once and reused."""
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        subprocess.run([python312(), "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *DEVICE_PACKAGES], check=True)
        (venv / ".installed").touch()
    return python


def carry_env(python: Path, site: Path) -> dict[str, str]:
    """The variables device/gpu_run.sh sets on the GPU machine: the unpacked tree and the repository
    on PYTHONPATH (Ray's workers inherit it), Keras on JAX."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}", KERAS_BACKEND="jax", PYTHONNOUSERSITE="1",
               PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def dry(args) -> dict:
    """Unpacks the carry and runs it here as the GPU machine would, on CPU, at small sizes."""
    python = device_venv(Path(args.venv))
    version = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="malaria-carry-") as tmp:
        site = Path(tmp) / "site"
        unpack_s = unpack(CARRY / TAR_NAME, site)
        env = {**carry_env(python, site), "JAX_PLATFORMS": "cpu"}
        t0 = time.perf_counter()
        subprocess.run([str(python), str(REPO / "device" / "carry_check.py"), "--cells", str(CARRY / "cells"),
                        "--images", str(args.images), "--out", str(Path(tmp) / "check")], check=True, env=env, cwd=tmp)
        check_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(["bash", str(REPO / "device" / "gpu_run.sh")], check=True, cwd=REPO,
                       env={**env, "GPU_RUN_DRY": "1", "PYTHON": str(python), "CARRY_SITE": str(site),
                            "GPU_RUN_OUT": str(Path(tmp) / "gpu-run")})
        gpu_run_s = time.perf_counter() - t0
    return {"python": version, "unpack_s": round(unpack_s, 1), "carry_check_s": round(check_s, 1),
            "gpu_run_dry_s": round(gpu_run_s, 1), "carried": carried_sizes()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, slim and pack the wheels; copy the cells")
    b.add_argument("--cells", type=int, default=1200, help="NIH cells to carry, half per class (default 1200)")
    b.add_argument("--sample-dir", help="the NIH sample (default: $MALARIA_SAMPLE_DIR or ../shared/data/nih_malaria)")
    b.add_argument("--xz-preset", default="9e", help="xz's preset: 9e (default, smallest) or 6 (faster)")
    sub.add_parser("check", help="fail unless the carried bytes are under the limit")
    d = sub.add_parser("dry", help="unpack and run the carry under Python 3.12 here (starts Ray: take the lock)")
    d.add_argument("--venv", default=str(BUILD / "venv312"))
    d.add_argument("--images", type=int, default=100, help="cells the CLI scores (default 100)")
    u = sub.add_parser("unpack", help="unpack the carry's tar into DEST (on the GPU machine)")
    u.add_argument("dest")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        result = build(args)
    elif args.cmd == "check":
        result = check_size()
    elif args.cmd == "dry":
        result = dry(args)
    else:
        result = {"unpack_s": round(unpack(CARRY / TAR_NAME, Path(args.dest)), 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
