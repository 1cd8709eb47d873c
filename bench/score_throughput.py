"""Scoring throughput and memory: the Ray Data job vs the bare model, in one run.

    flock /tmp/malaria-ray-ray.lock python bench/score_throughput.py --images 2000 --replicate 10

Builds an archive of ``--images`` real NIH cells (shared/data/nih_malaria) and, with
``--replicate R``, a second one of R x that many (the sample hard-linked under new names). For each
archive it prints one JSON line: end-to-end images/s of ``score_archive`` (listing, read, decode,
model actor pool, Parquet commit, roll-ups) and the bare model's images/s on pre-decoded arrays
(same model file, same batch size, one process; the faster of a run before and one after the
job), their ratio, and peak RSS of the driver and of
the Ray workers (RSS and anonymous memory, sampled in the background). Each archive runs in its own subprocess so the
driver's peak RSS is that run's alone.

First, one JSON line of the read+decode stage per input kind (``--stages``, on by default): the
same images as loose local files, one tar, one zip and loose objects on a local S3-protocol server
(moto), each read by ``ingest.read_raw`` and decoded by ``ingest.prepare_batch`` in one process
(one CPU decoding; loose files fetched by 16 threads, as a read task does). Best of 3 rounds in
rotating order; ratios to the loose local folder.

Diagnostic: ``bare_ray_idle_images_per_s`` is the bare loop again with a local Ray started and
idle beside it (raylet, GCS, dashboard agent, log monitor, idle workers). On a machine with few
cores that runtime's own CPU is a tax any Ray job pays; ``ratio_vs_ray_idle`` is what is left
for the pipeline itself.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = pathlib.Path(os.environ.get("MALARIA_SAMPLE_DIR", REPO.parent / "shared" / "data" / "nih_malaria"))


def build_archive(dest: pathlib.Path, n: int) -> None:
    cells = [p for cls in ("Parasitized", "Uninfected") for p in sorted((SAMPLE / cls).glob("*.png"))]
    for i in range(n):
        src = cells[i % len(cells)]
        folder = dest / f"copy{i // len(cells):03d}" / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        os.link(src, folder / src.name)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def stage_rates(tmp: pathlib.Path, n: int, image_size: int, batch_size: int, rounds: int = 3) -> dict:
    """images/s of read+decode for each input kind, in this process (see the module docstring)."""
    import shutil
    import tarfile
    import zipfile

    import numpy as np

    from malaria_ray import ingest, sources

    loose = tmp / "stage-loose"
    build_archive(loose, n)
    files = sorted(loose.rglob("*.png"))
    with tarfile.open(tmp / "stage.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(loose)))
    with zipfile.ZipFile(tmp / "stage.zip", "w", zipfile.ZIP_DEFLATED) as zf:  # what `zip -r` writes
        for f in files:
            zf.write(f, str(f.relative_to(loose)))
    inputs = {"loose_local": str(loose), "one_tar": str(tmp / "stage.tar"), "one_zip": str(tmp / "stage.zip")}
    moto = _start_moto()
    try:
        if moto is not None:
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            fs.mkdir("stage-bench")
            fs.put(str(loose) + "/", "stage-bench/loose/", recursive=True)
            inputs["loose_s3"] = "s3://stage-bench/loose"

        def one(uri: str) -> tuple[float, float, int]:
            listing = sources.list_units(uri)
            units = {k: np.array(listing.table.column(k).to_pylist(), dtype=object) for k in ("kind", "uri", "version")}
            start, c0, rows = time.perf_counter(), _cpu_seconds(), 0
            for t in ingest.read_raw(units, batch_size):
                out = ingest.prepare_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names},
                                           image_size, ingest.NO_IDS)
                rows += int((out["status"] == "ok").sum())
            return time.perf_counter() - start, _cpu_seconds() - c0, rows

        best: dict[str, tuple[float, float, int]] = {}
        names = list(inputs)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                wall, cpu, rows = one(inputs[name])
                if rows != n:
                    raise RuntimeError(f"{name}: {rows} images decoded, expected {n}")
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu, rows)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(loose, ignore_errors=True)
    base = n / best["loose_local"][0]
    out = {"stage": "read+decode, one process", "images": n, "image_size": image_size}
    for name, (wall, cpu, _) in best.items():
        out[f"{name}_images_per_s"] = round(n / wall, 1)
        out[f"{name}_cpu_ms_per_image"] = round(1000 * cpu / n, 2)
        out[f"{name}_ratio"] = round(n / wall / base, 3)
    return out


def _start_moto():
    """A moto S3 server on 127.0.0.1 (the one the tests use), its URL in AWS_ENDPOINT_URL; None if
    moto is not installed (it is a dev dependency)."""
    import socket
    import urllib.request

    exe = pathlib.Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    return proc


def bare_model_rate(model_dir: str, archive: pathlib.Path, batch_size: int, n: int) -> dict:
    """The baseline (images/s of the bare model on pre-decoded arrays) and the CPU costs that
    bound any pipeline on a CPU-only machine: decoding is work the baseline never does."""
    from malaria_ray.backends import predictor
    from malaria_ray.model import load_model
    from malaria_ray.preprocess import decode_image
    import numpy as np

    model, _ = load_model(model_dir)
    size = int(model.input_shape[1])
    files = sorted(archive.rglob("*.png"))[:n]
    data = [f.read_bytes() for f in files]
    c0 = _cpu_seconds()
    x = np.stack([decode_image(b, size) for b in data])
    decode_cpu = (_cpu_seconds() - c0) / len(x)
    predict = predictor(model)  # the actor's inference function, traced here outside the timed loop
    start, c0 = time.perf_counter(), _cpu_seconds()
    for a in range(0, len(x), batch_size):
        predict(x[a:a + batch_size])
    wall, model_cpu = time.perf_counter() - start, (_cpu_seconds() - c0) / len(x)
    return {"bare": len(x) / wall, "decode_cpu_ms": 1000 * decode_cpu, "model_cpu_ms": 1000 * model_cpu,
            # Every core busy either way: the pipeline can reach at most model / (model + decode).
            "cpu_bound_ceiling": model_cpu / (model_cpu + decode_cpu)}


def anon_bytes(pid: int | str = "self") -> int:
    """Anonymous memory of a process (/proc/PID/smaps_rollup): its heap, Python objects,
    TensorFlow's allocator. Unlike RSS it leaves out object-store pages the process touched; unlike
    USS it leaves out a shared library's private pages, which turn shared (and leave USS) as soon
    as another process maps the same library, so USS moves with how many workers are up."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


class WorkerRss(threading.Thread):
    """Peak memory of the Ray worker processes (``ray::`` command lines) and of this driver process,
    sampled in the background: RSS, and anonymous memory (``anon_bytes``).

    RSS counts the pages of Ray's shared-memory object store a worker has touched, so it grows
    with the amount of data that streamed through it even when the worker holds nothing;
    anonymous memory is the number that shows whether a process's own memory grows with the archive.

    Sampling is not free and it runs on the cores it measures: every ``every`` s the workers' RSS
    (``/proc/PID/statm``) and the driver's anonymous memory; the workers' anonymous memory (a
    page-table walk, milliseconds for a TensorFlow process) every ``anon_every`` s.
    ``cpu_s`` reports what the sampler itself cost, so a reader can see the perturbation.
    """

    def __init__(self, every: float = 2.0, anon_every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.peak_rss = self.peak_anon = self.driver_peak_anon = 0
        self.every, self.anon_every, self.cpu_s = every, anon_every, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        last_anon = 0.0
        while not self.stop.wait(self.every):
            t0 = time.thread_time()
            with_anon = time.monotonic() - last_anon >= self.anon_every
            for p in psutil.process_iter(["cmdline"]):
                if not " ".join(p.info["cmdline"] or []).startswith("ray::"):
                    continue
                try:
                    self.peak_rss = max(self.peak_rss, p.memory_info().rss)
                    if with_anon:
                        self.peak_anon = max(self.peak_anon, anon_bytes(p.pid))
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    continue
            self.driver_peak_anon = max(self.driver_peak_anon, anon_bytes())
            if with_anon:
                last_anon = time.monotonic()
            self.cpu_s += time.thread_time() - t0


def _machine_cpu_s() -> float:
    """CPU seconds spent by every process on the machine since boot (/proc/stat, all cores)."""
    with open("/proc/stat") as f:
        user, nice, system = (int(v) for v in f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s() -> dict[int, tuple[str, float]]:
    """pid -> (short name, CPU seconds so far) of every process on the machine."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "name", "cpu_times"]):
        cmd, times = p.info["cmdline"] or [p.info["name"] or "?"], p.info["cpu_times"]
        if times is None:
            continue
        name = cmd[0] if cmd[0].startswith("ray::") else os.path.basename(cmd[0])
        if name.startswith("python") and len(cmd) > 1:  # python -m / script: name it by what it runs
            name = os.path.basename(cmd[2] if cmd[1] == "-m" and len(cmd) > 2 else cmd[1])
        found[p.pid] = (name, times.user + times.system)
    return found


def _cpu_by_process(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process spent since ``before`` (processes started since count whole),
    under its name now: a Ray worker started idle (``ray::IDLE``) is named by the task it runs."""
    spent: dict[str, float] = {}
    for pid, (name, cpu) in _process_cpu_s().items():
        spent[name] = spent.get(name, 0.0) + cpu - before.get(pid, ("", 0.0))[1]
    return {k: round(v, 1) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def one_run(args: argparse.Namespace) -> None:
    import resource

    import ray

    from malaria_ray import score
    from malaria_ray.config import ScoreConfig

    archive, out = pathlib.Path(args.archive), pathlib.Path(args.out)
    if args.bare:  # its own process: TensorFlow in the driver would inflate the job's driver RSS
        if args.ray_idle:  # diagnostic: the same loop with a local Ray started and idle beside it
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        print(json.dumps(bare_model_rate(args.model, archive, args.batch_size, min(args.baseline_images, args.n))),
              flush=True)
        return
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)  # GPUs: Ray detects them
    ray.data.DataContext.get_current().enable_progress_bars = False
    watcher = WorkerRss(args.sample_every)
    watcher.start()
    procs0, machine0, start = _process_cpu_s(), _machine_cpu_s(), time.perf_counter()
    result = score.score_archive(ScoreConfig(input=str(archive), model=args.model, output=str(out),
                                             batch_size=args.batch_size, actors=1,
                                             cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor))
    wall = time.perf_counter() - start
    machine, by_process = _machine_cpu_s() - machine0, _cpu_by_process(procs0)
    model = sum(v for k, v in by_process.items() if "MapBatches(Scorer)" in k)
    watcher.stop.set()
    ray.shutdown()
    print(json.dumps({
        "images": result.rows, "job_images_per_s": round(result.rows / wall, 1),
        "job_stream_images_per_s": round(result.rows / result.seconds, 1),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "driver_peak_anon_mib": round(watcher.driver_peak_anon / 2**20),
        "worker_peak_rss_mib": round(watcher.peak_rss / 2**20), "worker_peak_anon_mib": round(watcher.peak_anon / 2**20),
        "wall_s": round(wall, 1), "sampler_cpu_s": round(watcher.cpu_s, 1),
        # Where the machine's CPU went during the job: the model actor, and everything else
        # (read and decode tasks, driver, Ray's own processes, the sampler), per image.
        "machine_cpu_s": round(machine, 1), "model_actor_cpu_s": round(model, 1),
        "other_cpu_ms_per_image": round(1000 * (machine - model) / max(result.rows, 1), 2),
        "cpu_s_by_process": by_process,  # ray::<stage> workers, raylet, gcs_server, this driver, ...
    }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--replicate", type=int, default=10)
    p.add_argument("--image-size", type=int, default=128, help="model input size (default: 128, the product default)")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call (default: 256, the product default)")
    p.add_argument("--baseline-images", type=int, default=2000)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="score on GPUs (the bare loop then runs on the GPU TensorFlow sees too)")
    p.add_argument("--sample-every", type=float, default=2.0,
                   help="seconds between memory samples of the Ray workers (default: 2; at 0.5 the "
                        "sampler took ~1.5%% of a 2-core machine)")
    p.add_argument("--no-stages", dest="stages", action="store_false",
                   help="skip the per-input-kind read+decode measurement")
    p.add_argument("--stages-only", action="store_true", help="only the per-input-kind read+decode measurement")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ray-idle", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--archive", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one_run(args)
    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        if args.stages or args.stages_only:
            print(json.dumps(stage_rates(tmp, args.images, args.image_size, args.batch_size)), flush=True)
            if args.stages_only:
                return
        model_dir = str(tmp / "model")
        subprocess.run([sys.executable, "-c", "import sys; from malaria_ray.model import build_model, save_model; "
                        f"save_model(build_model(image_size={args.image_size}, seed=0), {model_dir!r})"], check=True)
        for n in dict.fromkeys((args.images, args.images * args.replicate)):
            build_archive(tmp / f"archive-{n}", n)
            common = [sys.executable, __file__, "--one", "--archive", str(tmp / f"archive-{n}"),
                      "--model", model_dir, "--out", str(tmp / f"out-{n}"), "--n", str(n),
                      "--batch-size", str(args.batch_size), "--baseline-images", str(args.baseline_images),
                      "--cpus-per-actor", str(args.cpus_per_actor), "--gpus-per-actor", str(args.gpus_per_actor),
                      "--sample-every", str(args.sample_every)]
            before = last_json(subprocess.run(common + ["--bare"], check=True, capture_output=True, text=True))
            job = last_json(subprocess.run(common, check=True, capture_output=True, text=True))
            idle = last_json(subprocess.run(common + ["--bare", "--ray-idle"], check=True, capture_output=True, text=True))
            after = last_json(subprocess.run(common + ["--bare"], check=True, capture_output=True, text=True))
            # The bare loop before and after the job: the faster is the baseline, so a slow moment
            # of the machine during one of them does not flatter the job.
            base = max(before, after, key=lambda b: b["bare"])
            bare = base["bare"]
            job.update(image_size=args.image_size, bare_model_images_per_s=round(bare, 1),
                       bare_before_after_images_per_s=[round(before["bare"], 1), round(after["bare"], 1)],
                       ratio=round(job["job_images_per_s"] / bare, 3),
                       ratio_stream=round(job["job_stream_images_per_s"] / bare, 3),
                       decode_cpu_ms_per_image=round(base["decode_cpu_ms"], 2),
                       model_cpu_ms_per_image=round(base["model_cpu_ms"], 2),
                       cpu_bound_ceiling=round(base["cpu_bound_ceiling"], 3),
                       bare_ray_idle_images_per_s=round(idle["bare"], 1),
                       ratio_vs_ray_idle=round(job["job_images_per_s"] / idle["bare"], 3))
            print(json.dumps(job), flush=True)


if __name__ == "__main__":
    main()
