"""The soak (issue 23): consecutive nights of `malaria-ray score --skip-scored` over a growing archive on
S3, with a share of the store's requests failing and the driver killed on some nights; then checks,
from the Parquet outputs and the manifests only, that no row was lost or doubled.

    flock /tmp/malaria-ray-ray.lock python bench/soak.py --nights 30 --kills 3 --fault-rate 0.05

The archive and the outputs live in a moto S3 server on 127.0.0.1; every request of the nights goes
through tests/faultproxy.py, which fails ``--fault-rate`` of the GETs and of the output writes
(PUT, POST, COPY) with 503s, resets, lost answers and stalls. Night 1 holds ``--first`` real NIH
cells (tests/fixtures/nih_cells, each stamped with its own pixel so no two share bytes, 48 px);
each later night adds ``--grow`` new ones, rewrites 2 (new bytes under the same name), removes 1
and adds 1 corrupted (a cut-off PNG). A killed night adds three times as many, and its driver
(which starts its own local Ray, as a night's job does) is SIGKILLed once its first part is
published; the next night completes it. Each night's model is the same random 32 px classifier.

Prints the figures (nights, requests, faults injected by kind and method, retries seen, kills, rows
lost, duplicates) as one JSON object and exits 1 when a check fails. The checks:
every readable image has exactly one current prediction (its uri with its current bytes' id);
no (uri, image id) is scored twice; error rows are permanent ones for the corrupted files only, or
transient ones read again later; each finished night's manifest counts every entry of its listing;
a killed night's manifest says which night completed it; metrics.parquet has one row per finished
night, with that night's counts; `malaria-ray report` draws the same nights with the same counts; the
lease is released. tests/test_soak.py runs a short soak.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from faultproxy import FaultProxy  # noqa: E402 - tests/ on the path first
from test_commands import _ray_processes, fresh_env  # noqa: E402

CELLS = REPO / "tests" / "fixtures" / "nih_cells"
BIN = pathlib.Path(sys.executable).parent
IN_BUCKET, OUT_BUCKET, PREFIX = "soak-in", "soak-out", "archive"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def report_trend(root: str, nights: list[dict], env: dict, work: pathlib.Path) -> list[str]:
    """`malaria-ray report` run as a user runs it on the soak's root: it must exit 0 and write the
    page, and the trend it draws (``nights.load``: metrics.parquet completed from the manifests) must
    hold each finished night once, in order, with that night's manifest counts; problems found."""
    from malaria_ray import manifests, nights as nt, schema

    page = work / "report.html"
    r = subprocess.run([str(BIN / "malaria-ray"), "report", root, "--out", str(page)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not page.exists():
        return [f"malaria-ray report exited {r.returncode}: {r.stderr[-1500:]}"]
    problems, text = [], page.read_text()
    finished = [x["run_id"] for x in nights if not x["killed"]]
    rows = nt.load(root)
    if [row[schema.COL_RUN_ID] for row in rows] != finished:
        return [f"the report's nights {[row[schema.COL_RUN_ID] for row in rows]} != finished nights {finished}"]
    for row in rows[-30:]:
        m = manifests.read_manifest(root, row[schema.COL_RUN_ID]) or {}
        c, kinds = m.get("counts", {}), m.get("error_kinds", {})
        want = (c.get(schema.COUNT_SCORED, 0), kinds.get(schema.ERROR_TRANSIENT, 0), kinds.get(schema.ERROR_PERMANENT, 0))
        got = (row[schema.COL_N_SCORED], row[schema.COL_N_TRANSIENT], row[schema.COL_N_PERMANENT])
        if got != want:
            problems.append(f"night {row[schema.COL_RUN_ID]}: the report's trend says scored, transient, permanent "
                            f"{got}; its manifest {want}")
        if row[schema.COL_RUN_ID] not in text:
            problems.append(f"night {row[schema.COL_RUN_ID]} is missing from the report page")
    return problems


class Archive:
    """The archive in the store: what each key holds now, what was removed, which keys are corrupted."""

    def __init__(self, s3, seed: int) -> None:
        from PIL import Image

        self.s3, self.rng, self.n = s3, random.Random(seed), 0
        self.base = [Image.open(p).convert("RGB").resize((48, 48))
                     for cls in ("Parasitized", "Uninfected") for p in sorted((CELLS / cls).glob("*.png"))]
        self.current: dict[str, bytes] = {}
        self.corrupt: set[str] = set()
        self.removed: set[str] = set()

    def _cell(self) -> bytes:
        """A new cell whose bytes no other holds: a fixture cell, turned, with its number in one pixel."""
        i, self.n = self.n, self.n + 1
        im = self.base[i % len(self.base)].rotate(90 * ((i // len(self.base)) % 4))
        im.putpixel((0, 0), (i & 255, (i >> 8) & 255, (i >> 16) & 255))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def _put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=IN_BUCKET, Key=key, Body=data)
        self.current[key] = data

    def night(self, n: int, first: int, grow: int) -> None:
        """Night ``n``'s changes: new cells in both class folders; later nights also rewrite 2,
        remove 1 and add 1 corrupted."""
        for _ in range(first if n == 1 else grow):
            cls = "Parasitized" if self.rng.random() < 0.5 else "Uninfected"
            self._put(f"{PREFIX}/{cls}/night{n:02d}_{self.n:05d}.png", self._cell())
        if n == 1:
            return
        readable = sorted(k for k in self.current if k not in self.corrupt)
        changed = self.rng.sample(readable, 2)
        gone = self.rng.choice([k for k in readable if k not in changed])
        for key in changed:
            self._put(key, self._cell())
        self.s3.delete_object(Bucket=IN_BUCKET, Key=gone)
        del self.current[gone]
        self.removed.add(gone)
        key = f"{PREFIX}/Uninfected/night{n:02d}_corrupt.png"
        self._put(key, self._cell()[:60])
        self.corrupt.add(key)


def endpoint(url: str):
    """This process's S3 endpoint set to ``url`` (the checks read past the proxy)."""
    from malaria_ray import storage

    return storage.environ({"AWS_ENDPOINT_URL": url, **CREDENTIALS})


def _group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def command_env(endpoint_url: str) -> dict:
    """A fresh environment for the documented commands (no RAY_*), with the store at ``endpoint_url``."""
    env = fresh_env()
    env.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint_url,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))  # this checkout's code
    return env


def run_night(n: int, args, model: str, proxy_url: str, moto_url: str, kill: bool, work: pathlib.Path) -> dict:
    """One night: the documented command in a subprocess (its own local Ray); with ``kill``, SIGKILL
    the driver once the night's first part is published. Returns what happened."""
    from malaria_ray import outputs

    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-night{n:02d}"
    root = f"s3://{OUT_BUCKET}/nightly"
    cmd = [str(BIN / "malaria-ray"), "score", "--input", f"s3://{IN_BUCKET}/{PREFIX}", "--model", model,
           "--output", root, "--skip-scored", "--run-id", run_id, "--batch-size", "8", "--commit-every-rows", "8",
           "--read-attempts", "4", "--read-timeout-s", str(args.read_timeout_s), "--max-error-fraction", "0.9"]
    env = command_env(proxy_url)
    log_path = work / f"night{n:02d}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = False
    try:
        while proc.poll() is None:
            if time.monotonic() - started > args.night_timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"night {n} ran past {args.night_timeout_s} s; log {log_path}")
            if kill:
                with endpoint(moto_url):
                    published = any(run == run_id for run, _ in outputs.committed_files(root))
                if published:
                    proc.send_signal(signal.SIGKILL)  # the driver only: its local Ray shares its fate
                    killed = True
                    break
            time.sleep(0.1)
        rc = proc.wait()
    finally:
        # A killed driver's local Ray (its process group) exits by itself after about a minute;
        # tests/test_commands.py checks that. Here the next night needs the machine, so the group
        # gets 5 s and is then ended: the night was lost either way.
        if not _group_gone(proc.pid, 5 if killed else 90):
            os.killpg(proc.pid, signal.SIGKILL)  # our own night's leftovers only
            _group_gone(proc.pid, 30)
        deadline = time.monotonic() + 90
        while _ray_processes() and time.monotonic() < deadline:  # the killed driver's local Ray goes with it
            time.sleep(1)
    text = log_path.read_text(errors="replace")
    return {"night": n, "run_id": run_id, "killed": killed, "rc": rc, "seconds": round(time.monotonic() - started, 1),
            "log_tail": "" if killed or rc == 0 else text[-3000:]}


def check(root: str, archive: Archive, nights: list[dict], model_id: str, moto_url: str,
          work: pathlib.Path) -> tuple[dict, list[str]]:
    """The end-of-soak checks (module docstring), from the outputs only; (figures, problems)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from malaria_ray import manifests, outputs, schema, storage
    from malaria_ray.lease import LEASE_FILE

    problems = []
    fs, pred = storage.filesystem(outputs.predictions_uri(root))
    parts = [pq.read_table(fs.open(f"{pred}/{name}", "rb")).to_pandas() for _, name in outputs.committed_files(root)]
    df = pd.concat(parts, ignore_index=True)
    df = df[df[schema.COL_MODEL_ID] == model_id]
    ok, err = df[df[schema.COL_ERROR].isna()], df[df[schema.COL_ERROR].notna()]
    uri = {k: f"s3://{IN_BUCKET}/{k}" for k in set(archive.current) | archive.removed}
    per_version = ok.groupby([schema.COL_URI, schema.COL_IMAGE_ID]).size()
    duplicates = int((per_version - 1).clip(lower=0).sum())
    lost = [k for k, data in archive.current.items() if k not in archive.corrupt
            and per_version.get((uri[k], hashlib.sha256(data).hexdigest()), 0) == 0]
    if duplicates:
        problems.append(f"{duplicates} duplicate rows: {per_version[per_version > 1].index.tolist()[:5]}")
    if lost:
        problems.append(f"{len(lost)} readable images without a current prediction: {lost[:5]}")
    permanent = err[err[schema.COL_ERROR_KIND] == schema.ERROR_PERMANENT]
    transient = err[err[schema.COL_ERROR_KIND] == schema.ERROR_TRANSIENT]
    corrupt_uris = sorted(uri[k] for k in archive.corrupt)
    if sorted(permanent[schema.COL_URI]) != corrupt_uris:
        problems.append(f"permanent error rows {sorted(permanent[schema.COL_URI])[:5]} are not the corrupted files, "
                        f"once each ({corrupt_uris[:5]})")
    if ok[schema.COL_URI].isin(corrupt_uris).any():
        problems.append("a corrupted file has a prediction")
    unsettled = sorted(set(transient[schema.COL_URI]) - set(ok[schema.COL_URI]) - set(permanent[schema.COL_URI])
                       - {uri[k] for k in archive.removed})
    if unsettled:
        problems.append(f"transient error rows never read again: {unsettled[:5]}")
    other = err[~err[schema.COL_ERROR_KIND].isin([schema.ERROR_PERMANENT, schema.ERROR_TRANSIENT])]
    if len(other):
        problems.append(f"error rows of no kind: {other[schema.COL_ERROR].tolist()[:3]}")

    finished = []
    for i, night in enumerate(nights):
        m = manifests.read_manifest(root, night["run_id"]) or {}
        if night["killed"]:
            later = next((x["run_id"] for x in nights[i + 1:] if not x["killed"]), None)
            if m.get("finished") or m.get("completed_by") != later:
                problems.append(f"killed night {night['night']}: manifest finished={m.get('finished')}, "
                                f"completed_by={m.get('completed_by')} (expected {later})")
            continue
        finished.append(night["run_id"])
        if not m.get("finished") or m.get("entries") != night["listed"]:
            problems.append(f"night {night['night']}: manifest finished={m.get('finished')} entries={m.get('entries')}, "
                            f"listed {night['listed']}")
        night["counts"] = m.get("counts", {})
    metrics = pq.read_table(fs.open(f"{root.removeprefix('s3://')}/{outputs.METRICS_FILE}", "rb")).to_pandas()
    if metrics[schema.COL_RUN_ID].tolist() != finished:
        problems.append(f"metrics.parquet runs {metrics[schema.COL_RUN_ID].tolist()} != finished nights {finished}")
    else:
        for night, row in zip((x for x in nights if not x["killed"]), metrics.itertuples()):
            c = night["counts"]
            if (getattr(row, schema.COL_N_IMAGES), getattr(row, schema.COL_N_ERRORS)) != (
                    c.get(schema.COUNT_SCORED, 0) + c.get(schema.COUNT_ERRORS, 0), c.get(schema.COUNT_ERRORS, 0)):
                problems.append(f"night {night['night']}: metrics row {row} does not match its manifest's counts {c}")
    if storage.exists(storage.join(root, LEASE_FILE)):
        problems.append("the lease was left held")
    problems += report_trend(root, nights, command_env(moto_url), work)  # read in the morning, faults over
    figures = {"rows": len(df), "rows_scored": len(ok), "rows_lost": len(lost), "duplicates": duplicates,
               "permanent_error_rows": len(permanent), "transient_error_rows": len(transient),
               "images_current": len(archive.current) - len(archive.corrupt), "removed": len(archive.removed),
               "corrupted": len(archive.corrupt)}
    return figures, problems


def soak(nights: int, kills: int, fault_rate: float, work: pathlib.Path, seed: int = 0, first: int = 40,
         grow: int = 12, read_timeout_s: float = 2.0, night_timeout_s: float = 300.0) -> dict:
    """Run the soak under ``work``; returns the figures with ``problems`` (empty when every check passed)."""
    import boto3

    from malaria_ray.model import build_model, save_model
    from malaria_ray.model import inspect_artifact

    from conftest import serve_on_free_port

    args = argparse.Namespace(read_timeout_s=read_timeout_s, night_timeout_s=night_timeout_s)
    model = str(work / "model")
    save_model(build_model(image_size=32, seed=0), model)
    model_id = inspect_artifact(model)["model_id"]
    exe = BIN / "moto_server"
    moto, moto_url = serve_on_free_port(lambda port: [str(exe), "-H", "127.0.0.1", "-p", str(port)], "moto_server")
    proxy = FaultProxy(moto_url, rate=fault_rate, seed=seed, stall_s=read_timeout_s + 3.0)
    kill_at = {round((j + 1) * nights / (kills + 1)) + 1 for j in range(kills)} if kills else set()
    done: list[dict] = []
    started = time.monotonic()
    try:
        s3 = boto3.client("s3", endpoint_url=moto_url, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                          if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        for bucket in (IN_BUCKET, OUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        archive = Archive(s3, seed)
        pending = 0
        for n in range(1, nights + 1):
            pending += n in kill_at
            kill = pending > 0 and n < nights  # the last night always finishes
            archive.night(n, first, grow * (3 if kill else 1))
            listed = len(archive.current)
            night = run_night(n, args, model, proxy.url, moto_url, kill, work)
            night["listed"] = listed
            done.append(night)
            progress = {k: night[k] for k in ("night", "killed", "rc", "seconds", "listed")}
            print(json.dumps({**progress, "faults": proxy.figures()["faults_by_kind"]}), file=sys.stderr, flush=True)
            pending -= night["killed"]
            if not night["killed"] and night["rc"] != 0:
                raise RuntimeError(f"night {n} exited {night['rc']}:\n{night['log_tail']}")
        with endpoint(moto_url):
            figures, problems = check(f"s3://{OUT_BUCKET}/nightly", archive, done, model_id, moto_url, work)
    finally:
        proxy.close()
        moto.terminate()
        moto.wait(timeout=10)
    seconds = [x["seconds"] for x in done if not x["killed"]]
    return {"nights": nights, "kills": sum(x["killed"] for x in done), "fault_rate": fault_rate, "seed": seed,
            **proxy.figures(), **figures, "seconds": round(time.monotonic() - started, 1),
            "night_seconds_mean": round(sum(seconds) / len(seconds), 1) if seconds else None,
            "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--fault-rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", type=int, default=40, help="cells on night 1")
    p.add_argument("--grow", type=int, default=12, help="new cells each later night")
    p.add_argument("--work", default=None, help="folder for the model and the nights' logs (default: a temp dir)")
    a = p.parse_args()
    import tempfile

    work = pathlib.Path(a.work or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    out = soak(a.nights, a.kills, a.fault_rate, work, a.seed, a.first, a.grow)
    print(json.dumps(out, indent=2))
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
