"""Seven real scoring nights on one output root, then `malaria-ray report` as a user runs it and
the page in a real headless Chromium; `score --alarm-drift` on the night that drifts.

Marked ``fresh`` (tests/test_commands.py): the nights are scored by ``malaria-ray score``'s own
entry (``cli.main``) inside ONE subprocess that starts one local Ray for all of them and stops it
(seven Ray starts would cost minutes); the report command needs no Ray at all.

The nights: real NIH cells from the fixture, scored by the random 32 px test model whose
model.json is given an operating point at the median probability of the fixture's cells (a first
scoring pass measures it), so each night's predicted-Parasitized rate is what its mix of cells
makes it. Nights 1-6 hold about half cells above the threshold (labelled and unlabelled nights;
night 2 with two undecodable files: error rows); night 7 holds only cells above it: its rate
(100%) is far outside the band of nights 1-6 (~50%), and --alarm-drift exits 4 on it. Night 8 is
a normal mix again with two undecodable files: its error rate (3.2%) leaves the band of nights
that had none but one, and it exits 5.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys

import pandas as pd
import pytest

from malaria_ray import schema

pytestmark = [pytest.mark.fresh, pytest.mark.timeout(900)]

TESTS = pathlib.Path(__file__).resolve().parent
# (cells above the threshold, below it, labelled (class folders), undecodable files) per night
NIGHTS = [(30, 30, True, 0), (29, 31, False, 2), (28, 32, False, 0), (31, 29, True, 0), (32, 28, False, 0),
          (30, 30, False, 0), (60, 0, False, 0), (30, 30, False, 2)]


def build(work: str, cells: str, model: str) -> None:
    """Run in a subprocess (the fixture): one Ray, the first pass, then every night via ``cli.main``;
    each night's exit code and stderr go to ``work/codes.json``; copies of the root after nights 6 and 7."""
    import contextlib
    import io
    import statistics

    import ray

    from malaria_ray import cli

    work, cells = pathlib.Path(work), pathlib.Path(cells)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        assert cli.main(["score", "--input", str(cells), "--model", model, "--output", str(work / "pass")]) == 0
        preds = pd.read_parquet(work / "pass" / "predictions")
        probs = dict(zip(preds[schema.COL_URI], preds[schema.COL_PROB]))
        threshold = float(statistics.median(probs.values()))
        contract = json.loads((pathlib.Path(model) / schema.CONTRACT_FILE).read_text())
        tuned = work / "model"
        shutil.copytree(model, tuned)
        (tuned / schema.CONTRACT_FILE).write_text(json.dumps({**contract, schema.KEY_THRESHOLD: threshold,
                                                              schema.KEY_VAL_SPECIFICITY: 0.9}))
        ranked = sorted(probs, key=probs.get)  # cells nearest the threshold left out: no call rests on rounding
        low, high = [u for u in ranked if probs[u] < threshold][:-8], [u for u in ranked if probs[u] >= threshold][8:]
        codes = []
        for i, (n_pos, n_neg, labelled, bad) in enumerate(NIGHTS, 1):
            night = work / f"in{i}"
            for uri in high[i:i + n_pos] + low[i:i + n_neg]:
                src = pathlib.Path(uri)
                dest = night / src.parent.name if labelled else night
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dest / src.name)
            for j in range(bad):
                (night / f"scanner_glitch_{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = cli.main(["score", "--input", str(night), "--model", str(tuned), "--output", str(work / "root"),
                                 "--run-id", f"night-{i}", "--alarm-drift", "4", "--max-error-fraction", "0.5"])
            codes.append({"code": code, "stderr": err.getvalue()})
            if i in (6, 7):
                shutil.copytree(work / "root", work / f"root{i}")
        (work / "codes.json").write_text(json.dumps({"threshold": threshold, "nights": codes}))
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def nights(sample_dir, score_model, tmp_path_factory) -> pathlib.Path:
    from test_commands import run

    work = tmp_path_factory.mktemp("nights")
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_night_report as t; "
            f"t.build({str(work)!r}, {str(sample_dir)!r}, {str(score_model)!r})")
    r = run(sys.executable, "-c", code, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


def test_nights_carry_their_metrics_and_the_drifting_nights_exit_4_and_5(nights):
    done = json.loads((nights / "codes.json").read_text())["nights"]
    assert [n["code"] for n in done] == [0, 0, 0, 0, 0, 0, 4, 5], [n["stderr"][-500:] for n in done]
    for night, what in ((done[6], "predicted-Parasitized rate 100.00% is OUTSIDE the band"),
                        (done[7], "error rate 3.23% is OUTSIDE the band")):
        alarm = [line for line in night["stderr"].splitlines() if line.startswith("malaria-ray: error:")]
        assert len(alarm) == 1 and what in alarm[0] and "--alarm-drift 4" in alarm[0], alarm
    m = pd.read_parquet(nights / "root" / "metrics.parquet").set_index(schema.COL_RUN_ID)
    assert list(m.index) == [f"night-{i}" for i in range(1, 9)]
    assert set(schema.METRICS_COLUMNS) <= {schema.COL_RUN_ID, *m.columns}
    for i, (n_pos, n_neg, labelled, bad) in enumerate(NIGHTS, 1):
        row = m.loc[f"night-{i}"]
        assert row[schema.COL_N_SCORED] == n_pos + n_neg and row[schema.COL_N_ERRORS] == bad
        assert row[schema.COL_N_PRED_POS] == n_pos and row[schema.COL_POS_RATE] == pytest.approx(n_pos / (n_pos + n_neg))
        assert row[schema.COL_N_PERMANENT] == bad and row[schema.COL_N_TRANSIENT] == 0
        assert row[schema.COL_ERROR_RATE] == pytest.approx(bad / (n_pos + n_neg + bad))
        assert row[schema.COL_STARTED_AT] < row[schema.COL_FINISHED_AT] and row[schema.COL_SECONDS] > 0
        assert row[schema.COL_IMAGES_PER_S] == pytest.approx(row[schema.COL_N_IMAGES] / row[schema.COL_SECONDS])
        assert row[schema.COL_CELLS] == schema.CELLS_CROPS and pd.isna(row[schema.COL_N_FIELDS])
        assert row[schema.COL_N_SLIDES] >= 1 and 0 <= row[schema.COL_N_SLIDES_POS] <= row[schema.COL_N_SLIDES]
        # rates that need labels: set on labelled nights, null on unlabelled ones
        assert pd.isna(row["accuracy"]) != labelled and (row[schema.COL_N_LABELLED] > 0) == labelled


def test_report_command_shows_the_drift_only_on_the_night_that_drifted(nights):
    from test_commands import run

    before = run("malaria-ray", "report", str(nights / "root6"), cwd=nights)
    assert before.returncode == 0, before.stderr[-3000:]
    page6 = (nights / "root6" / "report.html").read_text()
    assert "DRIFT" not in before.stdout and "DRIFT:" not in page6 and "inside the band" in page6
    after = run("malaria-ray", "report", str(nights / "root7"), "--out", "night.html", "--nights", "5", cwd=nights)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "DRIFT: predicted-Parasitized rate 100.00% is OUTSIDE the band" in after.stdout
    page = (nights / "night.html").read_text()
    assert "DRIFT: predicted-Parasitized rate 100.00% is OUTSIDE the band" in page
    assert "night-7" in page and "night-2" not in page.split("Night over night")[1]  # --nights 5: nights 3-7
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page  # nothing from anywhere
    assert page.count("data:image/png;base64,") >= 5 + 6  # five plots, six Parasitized calls (none Uninfected)
    bad = run("malaria-ray", "report", str(nights / "nowhere"), cwd=nights)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no finished scoring run" in bad.stderr


def test_the_page_in_a_real_headless_browser(nights, tmp_path):
    import cdp

    if cdp.browser() is None:
        if cdp.required():
            pytest.fail("MALARIA_REQUIRE_BROWSER=1 but no Chromium on PATH: apt-get install chromium")
        pytest.skip("no Chromium on PATH: apt-get install chromium")
    page_file = nights / "browser.html"
    from test_commands import run

    assert run("malaria-ray", "report", str(nights / "root7"), "--out", str(page_file), cwd=nights).returncode == 0
    with cdp.Page() as page:
        page.load(page_file)
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        flagged = page.evaluate("Array.from(document.querySelectorAll('.drift.flag')).map(e => e.innerText)")
        png = page.screenshot(tmp_path / "report.png")
    assert page.errors == []
    assert len(images) >= 11 and all(done and w > 0 and h > 0 for done, w, h in images), images
    assert len(flagged) == 1 and flagged[0].startswith("DRIFT: predicted-Parasitized rate"), flagged
    from PIL import Image

    shot = Image.open(tmp_path / "report.png")
    assert png.startswith(b"\x89PNG") and 1000 <= shot.width <= 1100 and shot.height > 1400  # the whole page
