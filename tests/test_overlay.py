"""Field pictures (malaria_ray.overlay): boxes coloured by call, annotated boxes dashed, the run's
sheet (most Parasitized first) and ``malaria-ray overlay``. SYNTHETIC fields only."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from malaria_ray import overlay, schema
from malaria_ray.annotations import FieldBoxes
from malaria_ray.synth_fields import make_field


def _cells(f, positive: np.ndarray) -> overlay.FieldCells:
    return overlay.FieldCells("/night/slide-1/f.png", "r1", f.boxes.astype(np.int64),
                              np.where(positive, 0.93, 0.07), positive)


def _edge_pixel(im: np.ndarray, box, scale: float = 1.0) -> np.ndarray:
    """The pixel in the middle of a box's left edge, at the drawn scale."""
    x, y, _, h = (float(v) * scale for v in box)
    return im[int(round(y + h / 2)), int(round(x))]


def test_a_parasitized_box_is_red_an_uninfected_box_green_and_the_cell_inside_untouched():
    f = make_field(seed=5)
    positive = np.zeros(len(f.boxes), bool)
    positive[::5] = True
    drawn = overlay.draw_field(f.image, _cells(f, positive), with_legend=False)
    im = np.asarray(drawn)
    assert im.shape == f.image.shape, "full size, no strips asked for"
    others = list(f.boxes)

    def alone(i: int) -> bool:  # no other box's edge crosses this box's left edge midpoint
        x, y, _, h = f.boxes[i]
        px, py = x, y + h // 2
        return not any(j != i and bx - 3 <= px <= bx + bw + 2 and by - 3 <= py <= by + bh + 2
                       for j, (bx, by, bw, bh) in enumerate(others))

    pos = [i for i in np.flatnonzero(positive) if alone(i)]
    neg = [i for i in np.flatnonzero(~positive) if alone(i)]
    assert pos and neg
    for i in pos:
        assert tuple(_edge_pixel(im, f.boxes[i])) == overlay.PARASITIZED_RGB, i
        x, y, w, h = f.boxes[i]
        assert tuple(im[y + h // 2, x + 2]) == overlay.PARASITIZED_RGB, "thick: 3 px"
    for i in neg:
        x, y, w, h = f.boxes[i]
        assert tuple(_edge_pixel(im, f.boxes[i])) == overlay.UNINFECTED_RGB, i
        assert (im[y + h // 2, x + 2] == f.image[y + h // 2, x + 2]).all(), "thin: 1 px"
    centre = [(b[1] + b[3] // 2, b[0] + b[2] // 2) for b in f.boxes[neg]]
    assert all((im[r, c] == f.image[r, c]).all() for r, c in centre), "the cell itself stays visible"
    # A Parasitized call carries its probability above the box: red text pixels appear there.
    x, y, w, _ = next(f.boxes[i] for i in pos if f.boxes[i][1] >= 25)
    above = im[max(0, y - 20):y, x:x + w + 30].reshape(-1, 3)
    assert (above == overlay.PARASITIZED_RGB).all(axis=1).sum() > 10


def test_annotated_boxes_are_dashed_in_their_own_colours_under_the_legend():
    f = make_field(seed=6)
    truth = FieldBoxes("f.png", f.boxes[:2].astype(np.int32), [schema.POSITIVE_CLASS, schema.NEGATIVE_CLASS],
                       ["ring", "red blood cell"])
    none = overlay.FieldCells("f.png", "r1", np.zeros((0, 4), np.int64), np.zeros(0), np.zeros(0, bool))
    drawn = overlay.draw_field(f.image, none, truth, title="f.png")
    im = np.asarray(drawn)
    title_h = im.shape[0] - f.image.shape[0] - np.asarray(overlay.legend(im.shape[1])).shape[0]
    assert title_h == 22 and im.shape[1] == f.image.shape[1]
    body = im[title_h:title_h + f.image.shape[0]]
    for box, colour in zip(truth.boxes, (overlay.TRUTH_POS_RGB, overlay.TRUTH_NEG_RGB)):
        x, y, w, _ = box
        top = body[y, x:x + w]
        on = (top == colour).all(axis=1)
        assert 0.3 < on.mean() < 0.7, f"dashed: about half the edge is drawn ({on.mean():.2f})"
    legend = im[title_h + f.image.shape[0]:].reshape(-1, 3)
    for colour in (overlay.PARASITIZED_RGB, overlay.UNINFECTED_RGB, overlay.TRUTH_POS_RGB, overlay.TRUTH_NEG_RGB):
        assert (legend == colour).all(axis=1).any(), colour
    plain = np.asarray(overlay.legend(640, truth=False)).reshape(-1, 3)
    assert not (plain == overlay.TRUTH_POS_RGB).all(axis=1).any(), "no annotated style where none is drawn"


def test_a_thumbnail_is_downscaled_and_its_boxes_scaled_with_it():
    f = make_field(seed=7)
    positive = np.ones(len(f.boxes), bool)
    im = np.asarray(overlay.draw_field(f.image, _cells(f, positive), max_side=320, with_legend=False))
    assert im.shape[:2] == (240, 320)
    hits = [tuple(_edge_pixel(im, b, 0.5)) == overlay.PARASITIZED_RGB for b in f.boxes]
    assert np.mean(hits) > 0.75, "most edges red where the scaled box lies (labels cover a few)"
    wrong = [tuple(_edge_pixel(im, b, 0.4)) == overlay.PARASITIZED_RGB for b in f.boxes]
    assert np.mean(wrong) < 0.3


def test_the_sheet_orders_a_runs_fields_by_parasitized_calls_and_leaves_out_errors_and_other_runs():
    t = pa.table({schema.COL_URI: ["a", "b", "c", "d", "e"], schema.COL_RUN_ID: ["r2", "r2", "r2", "r1", "r2"],
                  schema.COL_N_PRED_POS: [1, 4, 4, 9, None], schema.COL_N_CELLS: [50, 80, 40, 60, None],
                  schema.COL_FRAC_POS: [0.02, 0.05, 0.1, 0.15, None],
                  schema.COL_ERROR: [None, None, None, None, "no red cells found"]})
    assert overlay.choose_fields(t, "r2") == ["c", "b", "a"]
    assert overlay.choose_fields(t, "r2", n=1) == ["c"]
    assert overlay.choose_fields(t, "r3") == []


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _overlay_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malaria_ray.cli", "overlay", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.ray
@pytest.mark.tf
def test_a_fields_run_writes_its_sheet_most_parasitized_first_and_overlay_draws_one_field(
        ray_session, score_model, tmp_path):
    from malaria_ray import score
    from malaria_ray.config import ScoreConfig

    data, out = tmp_path / "night" / "slide-1", tmp_path / "out"
    data.mkdir(parents=True)
    # Threshold 0: every cell is called Parasitized, so the field with more cells has more calls.
    # It is named last, so neither the URI nor the listing order puts it first.
    (data / "a.png").write_bytes(_png(make_field(seed=21, n_cells=15).image))
    (data / "z.png").write_bytes(_png(make_field(seed=22, n_cells=40).image))
    cfg = ScoreConfig(input=str(tmp_path / "night"), model=str(score_model), output=str(out), fields=True,
                      batch_size=64, threshold=0.0, run_id="20260101T000000Z-o")
    result = score.score_archive(cfg)
    assert [u.rsplit("/", 1)[-1] for u in result.overlay] == ["z.png", "a.png"]
    sheet = out / "runs" / cfg.run_id / "plots" / overlay.SHEET_FILE
    with Image.open(sheet) as im:
        im.verify()
    with Image.open(sheet) as im:
        assert im.format == "PNG" and 2 * overlay.THUMB_SIDE <= im.width <= 2 * overlay.THUMB_SIDE + 40
        assert im.height < 500, "thumbnails, not full-size fields"
        assert (np.asarray(im.convert("RGB")).reshape(-1, 3) == overlay.PARASITIZED_RGB).all(axis=1).any()

    uri = result.overlay[0]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image_name": "z.png", "objects": [
        {"type": "ring", "bbox": {"x": 10, "y": 10, "w": 60, "h": 60}}]}]))
    done = _overlay_cli("--output", str(out), "--uri", uri, "--annotations", str(ann), "--to",
                        str(tmp_path / "z.png.out.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "z.png" in done.stdout and cfg.run_id in done.stdout
    with Image.open(tmp_path / "z.png.out.png") as im:
        drawn = np.asarray(im.convert("RGB"))
    assert drawn.shape[1] == 640 and drawn.shape[0] > 480
    assert (drawn.reshape(-1, 3) == overlay.TRUTH_POS_RGB).all(axis=1).sum() > 30, "the annotated ring, dashed"
    bad = _overlay_cli("--output", str(out), "--uri", str(data / "missing.png"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no scored rows" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_sheet_that_cannot_be_drawn_is_a_warning_not_a_failed_run(tmp_path, caplog):
    import logging

    from malaria_ray import logs
    from malaria_ray.scoringrun import ScoringRun

    t = pa.table({schema.COL_URI: ["/night/f.png"], schema.COL_RUN_ID: ["r1"], schema.COL_N_PRED_POS: [3],
                  schema.COL_N_CELLS: [40], schema.COL_FRAC_POS: [0.075], schema.COL_ERROR: [None]})
    logger = logs.get("score")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            drawn = ScoringRun(str(tmp_path), "r1")._field_sheet(t, ["r1.part00000.parquet"])  # a part never written
    finally:
        logger.removeHandler(caplog.handler)
    assert drawn == []
    assert "field overlay sheet was not drawn" in caplog.text and "r1" in caplog.text
    assert not (tmp_path / "runs" / "r1" / "plots" / overlay.SHEET_FILE).exists()
