"""One bad entry never fails or hangs a night (issue 24), and a transient failure is retried (issue 23).

Real files, links, pipes and sockets; a real unreadable folder (listed by a process without the
capability that lets root read anything); real S3 protocol: moto behind a small proxy that answers
503 to chosen GETs (tests/faultproxy.py), and a server that accepts and never answers. No Ray here: the listing and the
readers run as a read task runs them, each test in about a second; the one night end to end is in
tests/test_score.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from malaria_ray import corpus, listing, outputs, reads, schema, sources
from malaria_ray.config import CorpusError
from malaria_ray.writer import PredictionWriter
from faultproxy import FaultProxy, _Listener

CELLS = pathlib.Path(__file__).resolve().parent / "fixtures" / "nih_cells"
FAST = sources.Limits(read_timeout_s=0.5, read_attempts=2)  # a stalled read costs ~1.5 s, not minutes


def cells(cls: str, n: int) -> list[pathlib.Path]:
    return sorted((CELLS / cls).glob("*.png"))[:n]


def within_test_time(fn, seconds: float = 30.0):
    """Run ``fn`` on a thread and fail the test (instead of hanging it) when it does not return."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"did not finish within {seconds} s: a read or listing waits forever")
    finally:
        pool.shutdown(wait=False)


def expand_all(units: sources.Units, limits: sources.Limits = FAST) -> list[dict]:
    return [r for u in units.table.to_pylist() for r in sources.expand_unit(u, limits=limits)]


def odd_night(root: pathlib.Path, outside: pathlib.Path) -> pathlib.Path:
    """A night folder as a shared disk leaves it: good cells and one of every odd entry."""
    for cls in ("Parasitized", "Uninfected"):
        (root / cls).mkdir(parents=True)
        for p in cells(cls, 3):
            shutil.copy(p, root / cls / p.name)
    outside.mkdir()
    shutil.copy(cells("Uninfected", 4)[-1], outside / "elsewhere.png")
    (outside / "deep").mkdir()
    shutil.copy(cells("Uninfected", 5)[-1], outside / "deep" / "more.png")
    u = root / "Uninfected"
    (u / "dangling.png").symlink_to("/nonexistent/cell.png")
    (u / "loop").symlink_to("..")  # a folder link back up: not followed
    (u / "linked-night").symlink_to(outside / "deep")  # a folder link outside: not followed
    (u / "ping.png").symlink_to("pong.png")
    (u / "pong.png").symlink_to("ping.png")  # ELOOP
    (u / "outside.png").symlink_to(outside / "elsewhere.png")  # a file link: followed
    os.mkfifo(u / "x.png")  # a pipe named like a cell: opening it would block forever
    os.mkfifo(u / "pipe.txt")  # not named like an input: a skipped non-image
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(u / "s.png"))
    sock.close()
    (u / ".hidden-link").symlink_to(outside)  # hidden names stay out, links or not
    return root


def test_odd_entries_are_listed_not_opened_and_each_is_one_row(tmp_path):
    root = odd_night(tmp_path / "night", tmp_path / "outside")
    units = within_test_time(lambda: sources.list_units(str(root)))
    kinds = dict(zip(*np.unique(units.table.column("kind").to_pylist(), return_counts=True)))
    assert kinds == {"image": 7, schema.KIND_DANGLING: 1, schema.KIND_FOLDER_LINK: 2, schema.KIND_LINK_LOOP: 2,
                     schema.KIND_SPECIAL: 2}, kinds
    assert units.skipped == [str(root / "Uninfected" / "pipe.txt")]
    rows = {pathlib.Path(r["uri"]).name: r for r in within_test_time(lambda: expand_all(units))}
    assert rows["outside.png"]["status"] == schema.STATUS_OK  # a link to a file is read, under its own path
    assert rows["outside.png"]["data"] == (tmp_path / "outside" / "elsewhere.png").read_bytes()
    assert "missing target (-> /nonexistent/cell.png)" in rows["dangling.png"]["error"]
    assert "loop" in rows["ping.png"]["error"] and "loop" in rows["pong.png"]["error"]
    assert "named pipe" in rows["x.png"]["error"] and "socket" in rows["s.png"]["error"]
    assert rows["loop"]["status"] == rows["linked-night"]["status"] == schema.STATUS_FOLDER_LINK
    errors = [r for r in rows.values() if r["status"] == schema.STATUS_ERROR]
    assert len(errors) == 5 and {r[schema.COL_ERROR_KIND] for r in errors} == {schema.ERROR_PERMANENT}
    assert sum(r["status"] == schema.STATUS_OK for r in rows.values()) == 7


def test_a_training_corpus_with_odd_entries_lists_without_hanging(tmp_path):
    root = odd_night(tmp_path / "corpus", tmp_path / "outside")
    found = within_test_time(lambda: corpus.list_corpus(str(root)))
    assert len(found) == 7 and sorted(set(found.labels)) == ["Parasitized", "Uninfected"]
    odd = sorted(pathlib.Path(u).name for u in found.skipped)
    assert odd == ["dangling.png", "linked-night", "loop", "ping.png", "pipe.txt", "pong.png", "s.png", "x.png"]


def test_a_bind_mount_loop_is_met_once(tmp_path):
    """A folder whose (device, inode) is already on the path above it, what a bind mount of a
    folder inside itself gives (a test cannot mount; the walk is handed that id): one ``link_loop``
    entry, not a walk without end."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    st = os.stat(tmp_path / "a" / "b")
    walked = list(listing._walk_sorted(str(tmp_path / "a"), 5.0, frozenset({(st.st_dev, st.st_ino)})))
    assert walked == [(str(tmp_path / "a" / "b"), None, schema.KIND_LINK_LOOP)]


LIST_AS_UNPRIVILEGED = """
import json, sys
from malaria_ray import sources
from malaria_ray.config import CorpusError
out = {}
units = sources.list_units(sys.argv[1])
out["kinds"] = units.table.column("kind").to_pylist()
out["rows"] = [{k: r[k] for k in ("uri", "status", "error", "error_kind")}
               for u in units.table.to_pylist() for r in sources.expand_unit(u)]
try:
    sources.list_units(sys.argv[2])
except CorpusError as exc:
    out["root_error"] = str(exc)
print(json.dumps(out))
"""


def test_an_unreadable_folder_is_a_transient_error_row_and_an_unreadable_root_exits(tmp_path):
    """Root reads any folder, so the listing runs in a child without CAP_DAC_OVERRIDE/READ_SEARCH
    (``setpriv``), as an ordinary user would."""
    night = tmp_path / "night"
    (night / "Uninfected" / "locked").mkdir(parents=True)
    shutil.copy(cells("Uninfected", 1)[0], night / "Uninfected" / "ok.png")
    shutil.copy(cells("Uninfected", 2)[1], night / "Uninfected" / "locked" / "hidden-from-us.png")
    (tmp_path / "locked-root").mkdir()
    os.chmod(night / "Uninfected" / "locked", 0)
    os.chmod(tmp_path / "locked-root", 0)
    cmd = [sys.executable, "-c", LIST_AS_UNPRIVILEGED, str(night), str(tmp_path / "locked-root")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to list as an ordinary user")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        os.chmod(night / "Uninfected" / "locked", 0o755)
        os.chmod(tmp_path / "locked-root", 0o755)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["kinds"] == [schema.KIND_UNLISTABLE, "image"]
    locked = got["rows"][0]
    assert locked["uri"].endswith("Uninfected/locked") and locked["status"] == schema.STATUS_ERROR
    assert "PermissionError" in locked["error"] and locked["error_kind"] == schema.ERROR_TRANSIENT
    assert got["rows"][1]["status"] == schema.STATUS_OK
    assert got["root_error"].startswith("cannot list input") and "Permission denied" in got["root_error"]


def test_a_file_that_vanishes_or_changes_after_listing_is_a_transient_error_row(tmp_path):
    for p in cells("Parasitized", 4):
        shutil.copy(p, tmp_path / p.name)
    units = sources.list_units(str(tmp_path))
    a, b, c, d = sorted(tmp_path.iterdir())
    a.unlink()  # vanished
    b.write_bytes(b.read_bytes() + b"more")  # rewritten since the listing
    c.unlink()
    os.mkfifo(c)  # replaced by a pipe: must not be opened in blocking mode
    started = time.monotonic()
    rows = within_test_time(lambda: expand_all(units, sources.Limits(read_timeout_s=5.0, read_attempts=3)))
    assert time.monotonic() - started < 2.0  # neither waited on nor retried now: the next night reads them
    by = {pathlib.Path(r["uri"]).name: r for r in rows}
    assert [by[p.name]["status"] for p in (a, b, c, d)] == ["error", "error", "error", "ok"]
    assert {by[p.name][schema.COL_ERROR_KIND] for p in (a, b, c)} == {schema.ERROR_TRANSIENT}
    assert "FileNotFoundError" in by[a.name]["error"] and "changed since it was listed" in by[b.name]["error"]
    assert "no longer a regular file" in by[c.name]["error"]


def test_an_input_that_is_one_file_reads_as_listed(tmp_path):
    """``--input night.tar`` (or one image): the listing's version is spelled as the reader checks it,
    so an unchanged file is read, not refused as changed since it was listed."""
    one = cells("Uninfected", 1)[0]
    with tarfile.open(tmp_path / "night.tar", "w") as tar:
        tar.add(one, arcname=f"Uninfected/{one.name}")
    shutil.copy(one, tmp_path / one.name)
    for path in (tmp_path / "night.tar", tmp_path / one.name):
        rows = expand_all(sources.list_units(str(path)), sources.Limits(read_timeout_s=5.0, read_attempts=1))
        assert [r["status"] for r in rows] == ["ok"], rows
    (tmp_path / one.name).write_bytes(one.read_bytes() + b"x")
    units = sources.list_units(str(tmp_path / one.name))
    os.utime(tmp_path / one.name, ns=(0, 0))
    rows = expand_all(units, sources.Limits(read_timeout_s=5.0, read_attempts=1))
    assert "changed since it was listed" in rows[0]["error"], rows


def test_archives_read_through_the_bounded_reader(tmp_path):
    """tar and zip members read through ``reads.open_steady`` are the same bytes as the files."""
    pngs = cells("Parasitized", 3)
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        for p in pngs:
            tar.add(p, arcname=f"Parasitized/{p.name}")
    shutil.make_archive(str(tmp_path / "z"), "zip", root_dir=CELLS, base_dir="Parasitized")
    rows = expand_all(sources.list_units(str(tmp_path)), sources.Limits(read_timeout_s=5.0))
    tar_rows = [r for r in rows if ".tar.gz#" in r["uri"]]
    assert [r["data"] for r in tar_rows] == [p.read_bytes() for p in pngs]
    zip_rows = [r for r in rows if ".zip#" in r["uri"]]
    assert len(zip_rows) == len(list((CELLS / "Parasitized").glob("*.png"))) > 3
    assert all(r["status"] == schema.STATUS_OK for r in zip_rows)


# ---------------------------------------------------------------- S3: a stalled server, a flaky proxy
class StalledServer(_Listener):
    """Accepts connections and never answers: a stalled object store."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def _on_connection(self, conn: socket.socket) -> None:
        self.held.append(conn)

    def close(self) -> None:
        super().close()
        for c in self.held:
            c.close()


@pytest.fixture
def cells_bucket(moto_s3):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="flaky")
    png = cells("Uninfected", 1)[0].read_bytes()
    s3.put_object(Bucket="flaky", Key="night/Uninfected/steady.png", Body=png)
    s3.put_object(Bucket="flaky", Key="night/Uninfected/flaky.png", Body=png)
    return png


def test_a_stalled_s3_get_ends_as_a_transient_error_row(cells_bucket, monkeypatch):
    units = sources.list_units("s3://flaky/night")  # listed while the store answers
    stalled = StalledServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", stalled.url)
    try:
        started = time.monotonic()
        once = sources.Limits(read_timeout_s=0.5, read_attempts=1)  # retries: test_a_503_is_retried...
        rows = within_test_time(lambda: expand_all(units, once))
        tar = within_test_time(lambda: list(sources.expand_unit({"kind": "tar", "uri": "s3://flaky/night/a.tar"},
                                                                limits=once)))
    finally:
        stalled.close()
    assert time.monotonic() - started < 5  # 0.5 s per read
    assert [r["status"] for r in rows + tar] == ["error"] * 3
    assert {r[schema.COL_ERROR_KIND] for r in rows + tar} == {schema.ERROR_TRANSIENT}, [r["error"] for r in rows + tar]
    assert all("ReadTimedOut" in r["error"] or "Timeout" in r["error"] for r in rows + tar), rows + tar


def test_a_503_is_retried_in_the_run_with_a_bound(cells_bucket, moto_s3, monkeypatch):
    units = sources.list_units("s3://flaky/night")
    proxy = FaultProxy(moto_s3, fail_key="flaky.png", fail_left=1)  # fails once, then answers
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        rows = within_test_time(lambda: expand_all(units, sources.Limits(read_attempts=3)))
        assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["data"] == cells_bucket
        assert proxy.failed == 1 and sum("flaky.png" in g for g in proxy.gets) == 2  # one 503, one retry
        proxy.fail_left, proxy.failed, proxy.gets = 99, 0, []  # now it fails every time
        rows = within_test_time(lambda: expand_all(units, sources.Limits(read_attempts=3)))
    finally:
        proxy.close()
    assert [r["status"] for r in rows] == ["error", "ok"] and proxy.failed == 3  # bounded: 3 tries in all
    assert rows[0][schema.COL_ERROR_KIND] == schema.ERROR_TRANSIENT
    assert "SlowDown" in rows[0]["error"] or "reduce your request rate" in rows[0]["error"], rows[0]["error"]


def test_an_s3_object_replaced_after_listing_is_not_read_mixed(cells_bucket, moto_s3):
    import boto3

    units = sources.list_units("s3://flaky/night")
    boto3.client("s3", endpoint_url=moto_s3).put_object(Bucket="flaky", Key="night/Uninfected/flaky.png", Body=b"new")
    rows = expand_all(units)
    assert rows[0]["status"] == "error" and "changed since it was listed" in rows[0]["error"]
    assert rows[0][schema.COL_ERROR_KIND] == schema.ERROR_TRANSIENT and rows[1]["status"] == "ok"


# ---------------------------------------------------------------- the next night: what --skip-scored reads again
def _write_part(root: str, run_id: str, rows: list[dict], with_kind: bool = True) -> None:
    table = pa.table({c: [r.get(c) for r in rows] for c in (schema.COL_IMAGE_ID, schema.COL_URI, schema.COL_MODEL_ID,
                                                           schema.COL_ERROR, schema.COL_SOURCE_VERSION,
                                                           schema.COL_ERROR_KIND)})
    w = PredictionWriter(root, run_id)
    w.write(table)
    w.close()
    w.commit()
    if not with_kind:  # a part written before error rows had a kind
        part = pathlib.Path(w.parts[0])
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(part).drop_columns([schema.COL_ERROR_KIND]), part)


def test_skip_scored_reads_a_transient_failure_again_but_not_a_permanent_one(tmp_path):
    from malaria_ray import score

    root = str(tmp_path / "out")
    rows = [{schema.COL_IMAGE_ID: "a" * 64, schema.COL_URI: "/in/ok.png", schema.COL_SOURCE_VERSION: "1:1"},
            {schema.COL_IMAGE_ID: "b" * 64, schema.COL_URI: "/in/timed-out.png", schema.COL_SOURCE_VERSION: "2:2",
             schema.COL_ERROR: "read timed out", schema.COL_ERROR_KIND: schema.ERROR_TRANSIENT},
            {schema.COL_IMAGE_ID: "c" * 64, schema.COL_URI: "/in/undecodable.png", schema.COL_SOURCE_VERSION: "3:3",
             schema.COL_ERROR: "not an image", schema.COL_ERROR_KIND: schema.ERROR_PERMANENT}]
    for r in rows:
        r[schema.COL_MODEL_ID] = "m"
    _write_part(root, "20260101T000000Z-aaaaaa", rows)
    units = sources.Units(pa.table({"kind": ["image"] * 3, "uri": [r[schema.COL_URI] for r in rows],
                                    "version": [r[schema.COL_SOURCE_VERSION] for r in rows]}))
    left, unchanged = score.skip_unchanged(units, outputs.scored_sources(root, "m"))
    assert left.table.column("uri").to_pylist() == ["/in/timed-out.png"] and unchanged == 2
    assert outputs.scored_ids(root, "m").tolist() == [b"a" * 64, b"c" * 64]  # the transient row's id is not skipped
    # A part from before error kinds: its error rows stay settled, as they were.
    _write_part(root, "20260102T000000Z-bbbbbb", [{**rows[1], schema.COL_URI: "/in/old.png"}], with_kind=False)
    old = sources.Units(pa.table({"kind": ["image"], "uri": ["/in/old.png"], "version": ["2:2"]}))
    assert score.skip_unchanged(old, outputs.scored_sources(root, "m"))[1] == 1


def test_the_time_limit_stops_waiting_and_names_the_flag():
    gate = threading.Event()
    started = time.monotonic()
    with pytest.raises(reads.ReadTimedOut, match="--read-timeout-s"):
        reads.within(0.2, gate.wait)
    assert time.monotonic() - started < 1.0
    gate.set()
    assert reads.is_transient(reads.ReadTimedOut()) and not reads.is_transient(ValueError("bad bytes"))
    with pytest.raises(CorpusError, match="does not exist"):
        listing.list_units("/nonexistent/night")


def _read_in_a_forked_child(path: str) -> float:
    started = time.monotonic()
    reads.within(5.0, pathlib.Path(path).read_bytes)
    return time.monotonic() - started


def test_a_forked_child_reads_at_once_after_its_parent_has_read(tmp_path):
    """The field-crop pool forks its workers from a driver that has read files already: the idle
    reader threads it inherits in name only must not take its reads (each waited out the whole
    60 s limit before the fix, and cutting a training corpus took a minute more per worker)."""
    import multiprocessing

    (tmp_path / "f").write_bytes(b"x")
    reads.within(5.0, (tmp_path / "f").read_bytes)  # leaves an idle reader thread in this process
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        took = pool.submit(_read_in_a_forked_child, str(tmp_path / "f")).result(timeout=30)
    assert took < 1.0, f"the child's first read waited {took:.1f} s for a thread its parent owns"
