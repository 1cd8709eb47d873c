"""The path users take on a cluster: `ray job submit` of jobs/train.py and jobs/score.py.

Starts a real Ray head (`ray start --head --block`, dashboard and job server on 127.0.0.1) with
token authentication on, as a real cluster runs it, submits a short training job and a scoring job
with `ray job submit --working-dir . --runtime-env ...`, waits for SUCCEEDED and checks what they
wrote. Real NIH cells (40 of them, copied from the repository's fixture into a temp dir).

Runs in its own pytest session (`pytest -m cluster`, as `make test` does), never beside another
Ray on the machine. It stops only the head it started: by the process group it launched and by
its private --temp-dir, never with `ray stop` (which kills every Ray on the machine).

The runtime env is cluster/runtime_env.yaml unchanged, as on a cluster of the project image: this
machine's venv plays the image (it holds every dependency), so excludes and env_vars are exercised
as in production.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

REPO = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = pathlib.Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
N_PER_CLASS = 20
JOB_TIMEOUT_S = 600


@dataclasses.dataclass
class Head:
    url: str
    env: dict[str, str]  # what a user's shell holds to talk to the cluster (and what the nodes hold)
    token: str
    secret: str  # a planted fake object-store credential: must never surface in logs or outputs
    temp_dir: pathlib.Path
    proc: subprocess.Popen
    submissions: list[str] = dataclasses.field(default_factory=list)
    cli_output: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Submission:
    rc: int
    status: str
    logs: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(head: Head, path: str, token: str | None = "") -> tuple[int, str]:
    token = head.token if token == "" else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(head.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _own_pids(head: Head) -> list[int]:
    """Processes of this head only: its process group, or its private temp dir on the command line."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            pgid = os.getpgid(int(entry.name))
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, ProcessLookupError, IndexError):
            continue
        if zombie:
            continue  # already dead, waiting for its parent to reap it
        if pgid == head.proc.pid or str(head.temp_dir) in cmdline:
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _stop(head: Head) -> None:
    # SIGTERM lets `ray start --block` shut its children down; whatever outlives the grace period
    # (the GCS often does) is killed by pid, so no other engineer's Ray is touched.
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    for pid in _own_pids(head):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        head.proc.wait(timeout=10)  # reap our own child
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + 10
    while _own_pids(head) and time.time() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="module")
def head():
    # Short path: Ray's unix sockets live under --temp-dir and must stay under 108 characters.
    temp_dir = pathlib.Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    token, secret = secrets.token_hex(32), "mrfake" + secrets.token_hex(20)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        # As on a real cluster: token mode on every node and client, the token in a file that is
        # not in the repo (the default ~/.ray/auth_token is left alone: others share this home).
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # Credentials as a node's environment would provide them: the jobs inherit them.
        AWS_ACCESS_KEY_ID="AKIA" + secrets.token_hex(8).upper(),
        AWS_SECRET_ACCESS_KEY=secret,
    )
    gcs, dashboard, client, agent = (_free_port() for _ in range(4))
    cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", "2", "--num-gpus", "1", "--temp-dir", str(temp_dir / "ray")]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{dashboard}", env, token, secret, temp_dir, proc)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _get(h, "/api/version")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("Ray head did not come up:\n" + (temp_dir / "head.log").read_text()[-3000:])
            time.sleep(1)
        yield h
    finally:
        _stop(h)
        log.close()
        leftovers = {pid: _cmdline(pid)[:160] for pid in _own_pids(h)}
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test's Ray head survived: {leftovers}"


@pytest.fixture(scope="module")
def runtime_env_file() -> pathlib.Path:
    return REPO / "cluster" / "runtime_env.yaml"


@pytest.fixture(scope="module")
def corpus(sample_dir, tmp_path_factory) -> pathlib.Path:
    """20 real cells per class, spread over the fixture so several patients appear on each side."""
    dest = tmp_path_factory.mktemp("corpus")
    for label in ("Parasitized", "Uninfected"):
        files = sorted((sample_dir / label).glob("*.png"))
        step = max(1, len(files) // N_PER_CLASS)
        (dest / label).mkdir()
        for f in files[::step][:N_PER_CLASS]:
            shutil.copy(f, dest / label / f.name)
    return dest


def _submit(head: Head, runtime_env: pathlib.Path, job_args: list[str], env: dict | None = None) -> Submission:
    sid = f"mr-{len(head.submissions)}-{secrets.token_hex(3)}"
    head.submissions.append(sid)
    cmd = [RAY, "job", "submit", "--address", head.url, "--submission-id", sid,
           "--working-dir", ".", "--runtime-env", str(runtime_env), "--", "python", *job_args]
    done = subprocess.run(cmd, cwd=REPO, env=env or head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    head.cli_output.append(done.stdout + done.stderr)
    code, body = _get(head, f"/api/jobs/{sid}")
    status = json.loads(body)["status"] if code == 200 else f"HTTP {code}"
    logs = json.loads(_get(head, f"/api/jobs/{sid}/logs")[1])["logs"]
    return Submission(done.returncode, status, logs)


@pytest.fixture(scope="module")
def train_run(head, runtime_env_file, corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train") / "run"
    sub = _submit(head, runtime_env_file, [
        "jobs/train.py", "--data", str(corpus), "--output", str(run_dir), "--image-size", "32",
        "--epochs", "1", "--batch-size", "8", "--num-workers", "1", "--max-images", "40", "--overwrite"])
    return sub, run_dir


@pytest.fixture(scope="module")
def score_run(head, runtime_env_file, corpus, train_run, tmp_path_factory):
    _, run_dir = train_run
    out = tmp_path_factory.mktemp("scores")
    sub = _submit(head, runtime_env_file, [
        "jobs/score.py", "--input", str(corpus), "--model", str(run_dir), "--output", str(out),
        "--batch-size", "16", "--actors", "1"])
    return sub, out


def test_job_server_rejects_clients_without_the_token(head):
    assert _get(head, "/api/jobs/", token=None)[0] == 401
    assert _get(head, "/api/jobs/", token="not-the-token")[0] == 403
    assert _get(head, "/api/jobs/")[0] == 200
    wrong = dict(head.env, RAY_AUTH_TOKEN="not-the-token")  # RAY_AUTH_TOKEN wins over the file
    listing = subprocess.run([RAY, "job", "list", "--address", head.url], env=wrong,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode != 0


def test_jobs_inherit_node_credentials(head, runtime_env_file):
    # The secret must reach the job (or the leak check below proves nothing), checked by hash so
    # that this job does not print it either.
    digest = hashlib.sha256(head.secret.encode()).hexdigest()
    check = ("import hashlib, os, sys; v = os.environ.get('AWS_SECRET_ACCESS_KEY', ''); "
             f"sys.exit(0 if hashlib.sha256(v.encode()).hexdigest() == '{digest}' else 3)")
    sub = _submit(head, runtime_env_file, ["-c", check])
    assert (sub.rc, sub.status) == (0, "SUCCEEDED"), sub.logs[-2000:]


def test_train_job_succeeds_and_writes_a_run(train_run):
    import pandas as pd

    sub, run_dir = train_run
    assert (sub.rc, sub.status) == (0, "SUCCEEDED"), sub.logs[-4000:]
    for name in ("model.keras", "config.json", "history.parquet", "split.parquet",
                 "predictions.parquet", "metrics.parquet"):
        assert (run_dir / name).is_file(), f"{name} missing from {sorted(p.name for p in run_dir.iterdir())}"
    assert any((run_dir / "plots").iterdir())
    assert json.loads((run_dir / "config.json").read_text())["image_size"] == 32
    assert len(pd.read_parquet(run_dir / "history.parquet")) == 1  # --epochs 1
    split = pd.read_parquet(run_dir / "split.parquet")
    assert len(split) == 2 * N_PER_CLASS


def test_score_job_scores_every_image_with_the_trained_model(score_run, train_run):
    import pandas as pd

    sub, out = score_run
    assert (sub.rc, sub.status) == (0, "SUCCEEDED"), sub.logs[-4000:]
    preds = pd.read_parquet(out / "predictions")
    assert len(preds) == 2 * N_PER_CLASS
    assert preds["error"].isna().all(), preds.loc[preds["error"].notna(), "error"].head().tolist()
    assert preds["prob_parasitized"].between(0, 1).all()
    assert preds["model_id"].nunique() == 1 and preds["model_id"].notna().all()
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert set(metrics["model_id"]) == set(preds["model_id"])
    assert int(metrics[["tp", "fp", "fn", "tn"]].to_numpy().sum(axis=1).max()) == 2 * N_PER_CLASS
    assert (out / "slides.parquet").is_file()
    assert len(list((out / "runs").iterdir())) == 1


def test_a_job_with_bad_input_fails_with_a_meaningful_exit(head, runtime_env_file, tmp_path):
    sub = _submit(head, runtime_env_file, [
        "jobs/score.py", "--input", str(tmp_path / "no-such-archive"), "--model", str(tmp_path / "no-model"),
        "--output", str(tmp_path / "out")])
    assert sub.rc != 0 and sub.status == "FAILED"
    assert "malaria-ray: error:" in sub.logs, sub.logs[-2000:]


def test_gpu_flags_on_a_gpu_tensorflow_cannot_use_fail_at_once(head, runtime_env_file, corpus, train_run, tmp_path):
    """The head advertises one logical GPU (`ray start --num-gpus 1`) that TensorFlow on this CPU
    machine cannot see: --use-gpu and --gpus-per-actor get it assigned (CUDA_VISIBLE_DEVICES=0)
    and fail at once with one line and exit 2, instead of running on CPU while holding it."""
    jobs = {
        "train": ["jobs/train.py", "--data", str(corpus), "--output", str(tmp_path / "run"), "--image-size", "32",
                  "--epochs", "1", "--use-gpu", "--max-images", "40"],
        "score": ["jobs/score.py", "--input", str(corpus), "--model", str(train_run[1]),
                  "--output", str(tmp_path / "scores"), "--gpus-per-actor", "1"],
    }
    for name, args in jobs.items():
        sub = _submit(head, runtime_env_file, args)
        assert sub.rc != 0 and sub.status == "FAILED", (name, sub.logs[-3000:])
        lines = [line for line in sub.logs.splitlines() if line.startswith("malaria-ray: error:")]
        assert len(lines) == 1 and "sees no GPU in TensorFlow" in lines[0], (name, sub.logs[-3000:])
        assert "CUDA_VISIBLE_DEVICES=0" in lines[0], lines
        assert "Traceback" not in sub.logs, (name, sub.logs[-3000:])
    assert not (tmp_path / "scores" / "predictions").exists() and not (tmp_path / "run" / "history.parquet").exists()


def test_planted_secret_appears_in_no_log_and_no_output(head, train_run, score_run):
    texts = {f"job {sid} logs": json.loads(_get(head, f"/api/jobs/{sid}/logs")[1])["logs"] for sid in head.submissions}
    texts.update({f"ray job submit output {i}": out for i, out in enumerate(head.cli_output)})
    files = [p for root in (train_run[1], score_run[1], head.temp_dir) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20, "too few files to make the check mean anything"
    needles = {"secret": head.secret.encode(), "token": head.token.encode()}
    for name, needle in needles.items():
        leaks = [label for label, text in texts.items() if needle.decode() in text]
        for path in files:
            if path.name == "auth_token":
                continue  # the token file itself
            try:
                data = path.read_bytes()
            except OSError:
                continue  # sockets, files Ray is rotating
            if needle in data:
                # Say where, with the value itself redacted, so the failure does not leak it too.
                at = data.index(needle)
                context = data[max(0, at - 200):at].decode(errors="replace")
                leaks.append(f"{path.relative_to(path.parents[2])}: ...{context}<{name.upper()}>")
        assert not leaks, f"the planted {name} leaked into:\n" + "\n".join(leaks)
