"""Field photographs through scoring: detection as a Ray Data stage, cell rows, fields.parquet,
--skip-scored keyed by the detector, bad input. SYNTHETIC fields everywhere; the real IML fields
when ``MALARIA_FIELDS_DIR`` holds them (conftest's ``fields_dir``)."""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from malaria_ray import detect, fields, nightpage, outputs, schema, sources
from malaria_ray.config import ConfigError, ScoreConfig
from malaria_ray.preprocess import DecodeError, decode_image
from malaria_ray.synth_fields import make_field

W, H = 640, 480


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _raw(items: dict[str, bytes]) -> dict[str, np.ndarray]:
    rows = [{schema.COL_URI: uri, schema.COL_STATUS: schema.STATUS_OK, schema.COL_DATA: data, schema.COL_ERROR: None,
             schema.COL_LABEL_HINT: None, schema.COL_SLIDE_HINT: None, schema.COL_PATIENT_HINT: None,
             schema.COL_SOURCE_VERSION: None, schema.COL_ERROR_KIND: None} for uri, data in items.items()]
    return sources.rows_to_batch(rows)


def _by_uri(out: dict[str, np.ndarray]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for i, uri in enumerate(out[schema.COL_URI]):
        found.setdefault(uri, []).append(i)
    return found


def test_a_field_becomes_one_row_per_detected_cell_with_its_box_and_own_id():
    f = make_field(seed=1)
    out = fields.prepare_fields(_raw({"/night/slide-7/a.png": _png(f.image)}), 32)
    det = detect.detect_cells(f.image, 32)
    assert len(out[schema.COL_URI]) == len(det) > 20
    boxes = np.stack([out[c] for c in fields.BOX_COLUMNS], axis=1).astype(int)
    assert (boxes == det.boxes).all() and (out[schema.COL_CELL] == np.arange(len(det))).all()
    assert (out[schema.COL_PIXELS] == det.crops).all()
    ids = out[schema.COL_IMAGE_ID]
    assert len(set(ids)) == len(ids) and ids[0] == fields.cell_id(out[schema.COL_FIELD_ID][0], det.boxes[0])
    assert set(out[schema.COL_FIELD_ID]) == {__import__("hashlib").sha256(_png(f.image)).hexdigest()}
    assert set(out[schema.COL_SLIDE]) == {"slide-7"}, "the folder names the slide"
    assert set(out[schema.COL_LABEL]) == {None}, "a field's folder label is not its cells'"
    assert set(out[schema.COL_STATUS]) == {schema.STATUS_OK}
    assert set(out[schema.COL_DETECTOR]) == {detect.DetectParams().key()}


def test_bad_fields_are_one_error_row_each_with_the_reason():
    f = make_field(seed=2)
    jpeg = io.BytesIO()
    Image.fromarray(f.image).save(jpeg, "JPEG")
    gray16 = (np.asarray(Image.fromarray(f.image).convert("L"), np.uint16) * 257)
    blank = np.full((H, W, 3), 230, np.uint8)
    cell = np.zeros((130, 130, 3), np.uint8)
    cell[20:110, 20:110] = (190, 120, 140)
    cases = {
        "corrupt.jpg": (jpeg.getvalue()[:2000], "not a decodable image"),
        "gray.png": (_png(np.asarray(Image.fromarray(f.image).convert("L"))), "grayscale"),
        "gray16.png": (_png(gray16), "grayscale"),
        "blank.png": (_png(blank), "no red cells found"),
        "cell.png": (_png(cell), "a cut-out cell, not a field photograph"),
        "huge.png": (_png(np.zeros((1200, 1200, 3), np.uint8)), "the cap"),
    }
    out = fields.prepare_fields(_raw({k: v for k, (v, _) in cases.items()}), 32, max_pixels=1_000_000)
    assert list(out[schema.COL_URI]) == list(cases), "one row per bad field, in order"
    assert set(out[schema.COL_STATUS]) == {schema.STATUS_ERROR}
    for (name, (_, reason)), error in zip(cases.items(), out[schema.COL_ERROR]):
        assert reason in error, (name, error)
    assert out[schema.COL_FIELD_FLAGS][list(cases).index("blank.png")] == detect.FLAG_NO_CELLS
    assert np.isnan(out[schema.COL_BOX_X]).all()
    assert set(out[schema.COL_ERROR_KIND]) == {schema.ERROR_PERMANENT}, "the bytes are what they are"


def test_exif_rotation_is_applied_before_detection():
    f = make_field(seed=3)
    upright = fields.prepare_fields(_raw({"u.jpg": _png(f.image)}), 32)
    # Stored turned a quarter (as a camera held on its side writes it), with EXIF orientation 6 (turn
    # back 90 degrees clockwise to view): the boxes come out in the upright frame.
    turned = Image.fromarray(f.image).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    turned.save(buf, "PNG", exif=exif.tobytes())
    rotated = fields.prepare_fields(_raw({"r.png": buf.getvalue()}), 32)
    a = np.stack([upright[c] for c in fields.BOX_COLUMNS], axis=1)
    b = np.stack([rotated[c] for c in fields.BOX_COLUMNS], axis=1)
    assert abs(len(a) - len(b)) <= 1 and np.median(b[:, 0]) == pytest.approx(np.median(a[:, 0]), abs=20)


def test_a_field_passed_to_the_cut_out_cell_path_is_an_error_not_a_cell():
    f = make_field(seed=4)
    with pytest.raises(DecodeError, match="score those with --fields"):
        decode_image(_png(f.image), 32)


def test_an_annotation_file_that_cannot_be_read_is_one_line(tmp_path):
    from malaria_ray import fieldeval
    from malaria_ray.annotations import AnnotationError

    with pytest.raises(AnnotationError, match="cannot read annotation JSON"):
        fieldeval.load_truth(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"not": "annotations"}')
    with pytest.raises(AnnotationError, match="not an annotation file"):
        fieldeval.load_truth(str(tmp_path / "bad.json"))


def test_field_flags_need_fields():
    with pytest.raises(ConfigError, match="add --fields"):
        ScoreConfig(input="i", model="m", output="o", cell_diameter=40.0)


def _night(sample_dir: pathlib.Path, dest: pathlib.Path) -> dict[str, np.ndarray]:
    """Three SYNTHETIC fields on two slides, three bad entries and a non-image; returns the fields."""
    made = {}
    for i, slide in enumerate(("slide-a", "slide-a", "slide-b")):
        (dest / slide).mkdir(parents=True, exist_ok=True)
        made[f"{slide}/f{i}.png"] = make_field(seed=10 + i).image
        (dest / slide / f"f{i}.png").write_bytes(_png(made[f"{slide}/f{i}.png"]))
    (dest / "slide-b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (dest / "slide-b" / "gray.png").write_bytes(_png(np.asarray(Image.fromarray(made["slide-a/f0.png"]).convert("L"))))
    shutil.copy(next((sample_dir / "Uninfected").glob("*.png")), dest / "slide-b" / "cell.png")
    (dest / "notes.txt").write_text("not an image")
    return made


@pytest.mark.ray
@pytest.mark.tf
def test_score_fields_cells_fields_table_roll_ups_and_rescore_on_detector_change(ray_session, sample_dir, score_model,
                                                                                 tmp_path):
    from malaria_ray import score

    data, out = tmp_path / "night", tmp_path / "out"
    made = _night(sample_dir, data)
    expected = {k: len(detect.detect_cells(v, 32)) for k, v in made.items()}
    coco = {"images": [{"id": i, "file_name": rel.split("/")[1], "width": W, "height": H} for i, rel in enumerate(made)],
            "categories": [{"id": 0, "name": "red blood cell"}, {"id": 1, "name": "ring"}],
            "annotations": [{"id": 1000 * i + j, "image_id": i, "bbox": [int(v) for v in b], "category_id": int(sick)}
                            for i, rel in enumerate(made) for j, (b, sick) in
                            enumerate(zip(make_field(seed=10 + i).boxes, make_field(seed=10 + i).parasitized))]}
    (tmp_path / "truth.json").write_text(json.dumps(coco))
    cfg = ScoreConfig(input=str(data), model=str(score_model), output=str(out), fields=True, batch_size=64,
                      skip_scored=True, run_id="20260101T000000Z-a", annotations=str(tmp_path / "truth.json"))
    first = score.score_archive(cfg)
    assert first.evaluation["fields"] == 3 and first.evaluation["detection_recall"] > 0.8
    assert (out / "runs" / cfg.run_id / "field_eval.parquet").is_file() and "vs annotations" in score.summary(first)
    assert (out / "runs" / cfg.run_id / "plots" / "fields_overlay.png").is_file() and len(first.overlay) == 3
    assert first.counts[schema.COUNT_FIELDS] == 3 and first.counts[schema.COUNT_ERRORS] == 3
    assert first.counts[schema.COUNT_SCORED] == sum(expected.values())
    assert first.counts[schema.STATUS_NON_IMAGE] == 1
    manifest = json.loads((out / "runs" / cfg.run_id / "manifest.json").read_text())
    assert manifest["entries"] == 7 and manifest["detector"]["key"] == detect.DetectParams().key()
    assert "entries                    7" in score.summary(first).replace(",", "")
    night = pd.read_parquet(out / outputs.METRICS_FILE).iloc[0]  # a --fields night: photographs and cells, both
    assert night[schema.COL_CELLS] == schema.CELLS_FIELDS and night[schema.COL_N_FIELDS] == 3
    assert night[schema.COL_N_SCORED] == sum(expected.values()) and night[schema.COL_N_PERMANENT] == 3
    assert night[schema.COL_ERROR_RATE] == 0.5 and 0 <= night[schema.COL_N_PRED_POS] <= night[schema.COL_N_SCORED]
    assert pd.isna(night[schema.COL_N_SLIDES])  # no false-positive rate for cells found in fields: no slide calls
    pos, neg = nightpage.disputed(str(out), cfg.run_id, n=2)  # a field's cell is cut from its photograph by its box
    assert len(pos) + len(neg) >= 2
    cell = (pos + neg)[0]
    cut = Image.open(io.BytesIO(nightpage.cell_png(cell, {})))
    x, y, w, h, pad = (*(cell[c] for c in fields.BOX_COLUMNS), nightpage.CELL_PAD)
    want = Image.new("RGB", (min(x + w + pad, W) - max(x - pad, 0), min(y + h + pad, H) - max(y - pad, 0)))
    want.thumbnail((nightpage.THUMB, nightpage.THUMB))
    assert cut.size == want.size and np.asarray(cut).std() > 5  # the cell, not a blank

    preds = pd.read_parquet(out / "predictions")
    assert list(preds.columns) == [*schema.PREDICTIONS_SCHEMA.names, outputs.PARTITION_KEY]  # the partition's column
    cells = preds[preds[schema.COL_ERROR].isna()]
    assert cells[schema.COL_IMAGE_ID].is_unique and cells[schema.COL_PROB].between(0, 1).all()
    for rel, n in expected.items():
        mine = cells[cells[schema.COL_URI] == str(data / rel)]
        assert len(mine) == n and sorted(mine[schema.COL_CELL]) == list(range(n)), rel
    errors = preds[preds[schema.COL_ERROR].notna()].set_index(schema.COL_URI)[schema.COL_ERROR]
    assert "grayscale" in errors[str(data / "slide-b" / "gray.png")]
    assert "cut-out cell" in errors[str(data / "slide-b" / "cell.png")]

    table = pd.read_parquet(out / outputs.FIELDS_FILE).set_index(schema.COL_URI)
    assert len(table) == 6
    for rel, n in expected.items():
        row = table.loc[str(data / rel)]
        assert row[schema.COL_N_CELLS] == n and row[schema.COL_FRAC_LOW] <= row[schema.COL_FRAC_POS] <= row[
            schema.COL_FRAC_HIGH]
        assert row[schema.COL_SLIDE] == rel.split("/")[0] and pd.isna(row[schema.COL_ERROR])
    assert table.loc[str(data / "slide-b" / "corrupt.jpg"), schema.COL_N_CELLS] == 0
    # The test model records no validation rates: nothing to correct with, and the table says so.
    assert table[schema.COL_FRAC_CORR].isna().all() and table[schema.COL_CORRECTION].str.contains("no validation").all()
    slides = pd.read_parquet(out / outputs.SLIDES_FILE)
    per_slide = slides[slides[schema.COL_LEVEL] == "slide"].set_index(schema.COL_SLIDE)[schema.COL_N_CELLS]
    assert per_slide.to_dict() == {"slide-a": expected["slide-a/f0.png"] + expected["slide-a/f1.png"],
                                   "slide-b": expected["slide-b/f2.png"]}

    # The next night, unchanged: nothing is read again.
    again = score.score_archive(ScoreConfig(**{**cfg.__dict__, "run_id": "20260102T000000Z-b", "annotations": None}))
    assert again.unchanged == 6 and again.counts[schema.COUNT_SCORED] == 0
    quiet = pd.read_parquet(out / outputs.METRICS_FILE).iloc[-1]  # nothing new: no rate to compare, not 0
    assert quiet[schema.COL_N_SCORED] == 0 and pd.isna(quiet[schema.COL_POS_RATE]) and pd.isna(quiet[schema.COL_ERROR_RATE])
    assert len(pd.read_parquet(out / "predictions")) == len(preds)
    # A detector change rescores every field; the tables count each field once, from the newest run.
    other = ScoreConfig(**{**cfg.__dict__, "run_id": "20260103T000000Z-c", "cell_diameter": 44.0, "annotations": None})
    third = score.score_archive(other)
    assert third.counts[schema.COUNT_FIELDS] == 3
    table = pd.read_parquet(out / outputs.FIELDS_FILE)
    assert len(table) == 6 and set(table[schema.COL_RUN_ID]) == {other.run_id}
    newest = pd.read_parquet(out / "predictions")
    newest = newest[(newest[schema.COL_RUN_ID] == other.run_id) & newest[schema.COL_ERROR].isna()]
    slides = pd.read_parquet(out / outputs.SLIDES_FILE)
    assert slides.loc[slides[schema.COL_LEVEL] == "slide", schema.COL_N_CELLS].sum() == len(newest)


@pytest.mark.ray
@pytest.mark.tf
def test_real_field_photographs_score_about_as_many_cells_as_are_boxed(ray_session, fields_dir, score_model, tmp_path):
    from malaria_ray import annotations, score

    names = sorted(p.name for p in (fields_dir / "images").iterdir())[100:103]
    data = tmp_path / "night" / "slide"
    data.mkdir(parents=True)
    for n in names:
        (data / n).symlink_to(fields_dir / "images" / n)
    truth = annotations.load_annotations(str(fields_dir / "annotations.json"))
    result = score.score_archive(ScoreConfig(input=str(tmp_path / "night"), model=str(score_model),
                                             output=str(tmp_path / "out"), fields=True))
    assert result.counts[schema.COUNT_FIELDS] == 3 and result.counts[schema.COUNT_ERRORS] == 0
    table = pd.read_parquet(tmp_path / "out" / outputs.FIELDS_FILE)
    for uri, n in zip(table[schema.COL_URI], table[schema.COL_N_CELLS]):
        boxed = len(truth[pathlib.Path(uri).name].boxes)
        assert abs(n - boxed) <= 0.15 * boxed, (uri, n, boxed)


def _cells(uri: str, boxes: np.ndarray, called: list[bool]):
    import pyarrow as pa

    b = np.asarray(boxes, np.int32).reshape(-1, 4)
    return pa.table({schema.COL_URI: [uri] * len(b), schema.COL_ERROR: pa.nulls(len(b), pa.string()),
                     schema.COL_PRED: [schema.POSITIVE_CLASS if c else schema.NEGATIVE_CLASS for c in called],
                     **{c: b[:, i] for i, c in enumerate(fields.BOX_COLUMNS)}})


def test_evaluation_against_boxes_counts_detection_cells_fields_and_blocks():
    import pyarrow as pa

    from malaria_ray import fieldeval
    from malaria_ray.annotations import FieldBoxes

    def field(name, n, sick, stage="ring"):
        boxes = np.array([[60 * i, 10, 50, 50] for i in range(n)], np.int32)
        labels = ["Parasitized" if i < sick else "Uninfected" for i in range(n)]
        return FieldBoxes(name, boxes, labels, [stage if i < sick else "red blood cell" for i in range(n)],
                          difficult=np.array([[60 * n, 10, 50, 50]], np.int32))

    truth = {"a.jpg": field("a.jpg", 10, 2), "b.jpg": field("b.jpg", 10, 0), "c.jpg": field("c.jpg", 10, 1, "schizont"),
             "not-scored.jpg": field("not-scored.jpg", 5, 0)}
    # a: every cell found (difficult too) plus one phantom box; parasite 0 called, parasite 1 missed,
    # one uninfected cell called. b: the last cell not found, nothing called. c: its parasite called.
    a_boxes = np.r_[truth["a.jpg"].all_boxes(), [[700, 300, 50, 50]]]
    a_calls = [True, False, True] + [False] * 9
    b_boxes = truth["b.jpg"].all_boxes()[:9]
    c_boxes = truth["c.jpg"].all_boxes()
    cells = pa.concat_tables([_cells("/n/s/a.jpg", a_boxes, a_calls), _cells("s3://b/x/b.jpg", b_boxes, [False] * 9),
                              _cells("/n/t.tar#s/c.jpg", c_boxes, [True] + [False] * 10),
                              _cells("/n/s/extra.jpg", np.zeros((1, 4)), [False])])
    table, f = fieldeval.evaluate(cells, truth, block=2)
    assert table.column("field").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert f["fields"] == 3 and f["annotated_fields_not_scored"] == 1 and f["scored_fields_not_annotated"] == 1
    assert (f["detection_recall"], f["detection_precision"]) == (pytest.approx(31 / 33), pytest.approx(31 / 32))
    assert (f["tp"], f["fn"], f["fp"], f["tn"]) == (2, 1, 1, 25)  # difficult cells have no class
    assert f["infected_cell_sensitivity"] == pytest.approx(2 / 3)
    assert f["false_positive_cells_per_field"] == pytest.approx(1 / 3)  # a's called uninfected cell
    assert f["stage_sensitivity"] == {"ring": 0.5, "schizont": 1.0} and f["stage_counts"] == {"ring": 2, "schizont": 1}
    assert f["field_sensitivity"] == 1.0 and f["field_sensitivity_2plus"] == 1.0 and f["field_specificity"] == 1.0
    # a: called 2 of 12 found vs 2 of 11 annotated cells (difficult ones count); b: 0 vs 0; c: 1/11 vs 1/11
    assert f["field_parasitemia_mae"] == pytest.approx(abs(2 / 12 - 2 / 11) / 3)
    assert [b["first"] for b in f["blocks"]] == ["a.jpg"]  # blocks of 2: [a, b]; c alone is left out
    assert f["blocks"][0]["true_fraction"] == pytest.approx(2 / 22)  # difficult boxes count as cells
    assert f["blocks"][0]["called_fraction"] == pytest.approx(2 / 21) and f["blocks_within_25pct"] == 1.0
