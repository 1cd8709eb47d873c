"""Confusion-matrix metrics against scikit-learn (pure)."""

import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from malaria_ray import metrics, schema


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.4
    p = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1).round(2)  # ties on purpose
    m = metrics.binary_metrics(y, p, threshold=0.5)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == 500
    assert math.isclose(m["f1"], f1_score(y, p >= 0.5))
    assert math.isclose(m["roc_auc"], roc_auc_score(y, p))
    assert math.isclose(m["sensitivity"], tp / (tp + fn))
    assert math.isclose(m["specificity"], tn / (tn + fp))


def test_single_class_auc_is_nan_and_matrix_layout():
    assert math.isnan(metrics.roc_auc(np.ones(3, bool), np.array([0.1, 0.5, 0.9])))
    cm = metrics.confusion_matrix(np.array([1, 1, 0, 0]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert cm.tolist() == [[1, 1], [1, 1]]


def test_threshold_for_sensitivity_is_the_highest_that_reaches_the_target():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.2, 0.3, 0.1, 0.85])
    assert metrics.threshold_for_sensitivity(y, p, 0.75) == 0.4  # 3 of 4 positives at >= 0.4
    assert metrics.threshold_for_sensitivity(y, p, 0.97) == 0.2  # all 4
    assert metrics.threshold_for_sensitivity(y, p, 0.5) == 0.8
    rng = np.random.default_rng(1)
    y = rng.random(2000) < 0.5
    p = np.clip(y * 0.4 + rng.random(2000) * 0.6, 0, 1)
    for target in (0.9, 0.95, 0.97, 0.99):
        t = metrics.threshold_for_sensitivity(y, p, target)
        assert metrics.binary_metrics(y, p, t)["sensitivity"] >= target
        above = p[y & (p > t)].min()  # the next positive probability up: falls short of the target
        assert metrics.binary_metrics(y, p, above)["sensitivity"] < target
    assert math.isnan(metrics.threshold_for_sensitivity(np.zeros(3, bool), np.ones(3), 0.9))


def test_wilson_interval_known_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 and 0/20 (method 3, Wilson).
    lo, hi = metrics.wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = metrics.wilson_interval(0, 20)
    assert lo == 0.0 and round(hi, 4) == 0.1611
    lo, hi = metrics.wilson_interval(15, 148)
    assert (round(lo, 4), round(hi, 4)) == (0.0624, 0.1605)
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_bootstrap_resamples_patients_not_cells():
    """10 patients x 20 cells; 8 patients all right, 2 all wrong. A patient bootstrap's accuracy is a
    count of right patients out of 10 (so only multiples of 0.1), and its interval is wide;
    resampling cells would pretend 200 independent trials and give a much narrower one."""
    y = np.tile([True, False], 100)
    right = np.repeat([True] * 8 + [False] * 2, 20)
    p = np.where(right, y, ~y).astype(float)
    groups = np.repeat([f"P{i}" for i in range(10)], 20)
    ci = metrics.patient_bootstrap(y, p, groups, 0.5, n_boot=2000, seed=0)
    lo, hi = ci["accuracy"]
    assert lo <= 0.6 and hi == 1.0, ci
    assert round(lo * 10, 9) == int(round(lo * 10)), "accuracy of whole patients: multiples of 1/10"
    cells = metrics.patient_bootstrap(y, p, np.arange(200), 0.5, n_boot=2000, seed=0)["accuracy"]
    assert cells[1] - cells[0] < 0.5 * (hi - lo), (cells, ci)


def _predictions(slides, patients, labels, called, probs=None, errors=None) -> pa.Table:
    n = len(slides)
    return pa.table({schema.COL_SLIDE: pa.array(slides, pa.string()), schema.COL_PATIENT: pa.array(patients, pa.string()),
                     schema.COL_LABEL: pa.array(labels, pa.string()),
                     schema.COL_PRED: ["Parasitized" if c else "Uninfected" for c in called],
                     schema.COL_PROB: pa.array(np.where(called, 0.9, 0.1) if probs is None else probs, pa.float32()),
                     schema.COL_ERROR: pa.array(errors or [None] * n, pa.string())})


def test_group_evidence_and_call_rule():
    slides = ["S1"] * 30 + ["S2"] * 30 + ["S3"] * 40
    patients = ["P1"] * 30 + ["P1"] * 30 + ["C3"] * 40
    labels = ["Parasitized"] * 30 + ["Uninfected"] * 30 + ["Uninfected"] * 40
    called = np.array([True] * 15 + [False] * 15 + [False] * 30 + [True] * 2 + [False] * 38)
    rows = metrics.roll_up(_predictions(slides, patients, labels, called), fp_rate=0.05, model_id="m")
    by = {(r["level"], r["slide_id"], r["patient_id"]): r for r in rows.to_pylist()}
    s1 = by[("slide", "S1", "P1")]
    assert (s1["n_cells"], s1["n_pred_parasitized"], s1["frac_parasitized"]) == (30, 15, 0.5)
    assert (s1["frac_parasitized_ci_low"], s1["frac_parasitized_ci_high"]) == metrics.wilson_interval(15, 30)
    assert s1["call_parasitized"] and metrics.infected(s1)
    c3 = by[("patient", None, "C3")]  # 2 of 40 called: within what a 5% false-positive rate explains
    assert not c3["call_parasitized"] and metrics.infected(c3) is False
    p1 = by[("patient", None, "P1")]
    assert p1["n_cells"] == 60 and p1["call_parasitized"] and metrics.infected(p1)
    assert metrics.group_rates(rows, "patient") == {"patient_sensitivity": 1.0, "patient_specificity": 1.0,
                                                    "patient_n": 2}
    assert rows.schema == schema.SLIDES_SCHEMA
    assert [r["level"] for r in rows.to_pylist()] == ["patient"] * 2 + ["slide"] * 3


def test_rollup_leaves_out_error_rows_and_has_no_call_without_a_false_positive_rate():
    t = _predictions(["S1", "S1", "S1"], ["P1"] * 3, [None, "Parasitized", None], [True, False, False],
                     probs=[0.9, 0.2, float("nan")], errors=[None, None, "bad bytes"])
    slide = [r for r in metrics.roll_up(t, fp_rate=None, model_id=None).to_pylist() if r["level"] == "slide"]
    assert [(r["n_cells"], r["n_pred_parasitized"], r["n_label_parasitized"], r["call_parasitized"]) for r in slide] == \
        [(2, 1, 1, None)]
    assert math.isclose(slide[0]["mean_prob"], (0.9 + 0.2) / 2, rel_tol=1e-6)


def test_training_and_scoring_roll_ups_of_the_same_predictions_are_equal(tmp_path):
    """Training's patients.parquet and scoring's slides.parquet come from one function: the
    validation predictions of a training run, committed under a scoring root, roll up to the same
    table the training run writes (scoring streams them in row groups and merges the sums)."""
    from malaria_ray import corpus, outputs, trainrun
    from malaria_ray.schema import CLASS_NAMES
    from malaria_ray.writer import PredictionWriter

    rng = np.random.default_rng(1)
    n = 20_000  # more than one row group, so scoring merges partial sums
    names = [f"C{i % 13}P{i % 5}thinF" for i in range(40)] + ["C50NthinF"]
    uris = [f"/d/{'Parasitized' if i % 3 else 'Uninfected'}/{names[i % len(names)]}_IMG_{i}_cell_{i}.png"
            for i in range(n)]
    labels = np.array([0 if i % 3 else 1 for i in range(n)])
    probs = rng.random(n).astype(np.float32)
    errors = [{schema.COL_URI: "/d/Parasitized/C1P1thinF_IMG_x_cell_0.png", schema.COL_IMAGE_ID: None,
               schema.COL_ERROR: "bad bytes"}]
    known = corpus.Identities.of(uris + [errors[0][schema.COL_URI]], [CLASS_NAMES[i] for i in labels] + ["Parasitized"],
                                 *zip(*[corpus.describe(u)[1:] for u in uris + [errors[0][schema.COL_URI]]]))
    preds = trainrun.predictions_table(uris, [f"id{i}" for i in range(n)], probs, errors, known, "m", "run", 0.4)
    trained = metrics.roll_up(preds, 0.05, "m")
    writer = PredictionWriter(str(tmp_path), "20250101T000000Z-aaaaaa")
    writer.write(preds)
    writer.close()
    writer.commit()
    scored = outputs.rebuild_slides(str(tmp_path), "m", 0.05)
    # the same rows, counts and calls; the mean probability up to the order of a float sum
    mean = schema.COL_MEAN_PROB
    assert scored.drop_columns([mean]).equals(trained.drop_columns([mean]))
    assert np.allclose(scored.column(mean).to_numpy(), trained.column(mean).to_numpy(), rtol=1e-12)
    assert trained.num_rows > 40 and sum(r["n_cells"] for r in trained.to_pylist() if r["level"] == "slide") == n


def test_brier_and_reliability():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.6, 0.4])
    assert math.isclose(metrics.brier(y, p), (0.01 + 0.01 + 0.16 + 0.16) / 4)
    bins = metrics.reliability(y, p, bins=2)
    assert [b["n"] for b in bins] == [2, 2] and bins[1]["frac_positive"] == 1.0


def test_confident_disagreements_are_the_most_confident_errors_each_way_and_render():
    import io

    from PIL import Image

    from malaria_ray import report

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    p = np.array([0.9, 0.01, 0.3, 0.001, 0.2, 0.95, 0.6, 0.99])
    missed, flagged = report.confident_disagreements(y, p, 0.5, n=5)
    assert missed.tolist() == [3, 1, 2] and flagged.tolist() == [7, 5, 6]
    missed, flagged = report.confident_disagreements(y, p, 0.5, n=1)
    assert missed.tolist() == [3] and flagged.tolist() == [7]
    assert [a.tolist() for a in report.confident_disagreements(y, p, 0.25, n=5)] == [[3, 1], [7, 5, 6]]
    cell = np.zeros((32, 32, 3), np.uint8)
    for m, f in (([(cell, 0.001)], [(cell, 0.99), (cell, 0.6)]), ([], [])):
        png = report.disagreements_png(m, f, 0.5)
        assert Image.open(io.BytesIO(png)).size[0] > 100


def test_disagreement_rows_are_found_by_image_id_in_str_and_object_batches():
    from malaria_ray.trainrun import _rows_with_ids

    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    for ids_dtype in ("<U64", object):
        batch = {"image_id": np.array(["a", "b", "c", "d"], dtype=ids_dtype), "image": images, "label": np.zeros(4)}
        got = _rows_with_ids(batch, np.array(["d", "b", "x"], dtype=object))
        assert got["image_id"].tolist() == ["b", "d"] and np.array_equal(got["image"], images[[1, 3]])
        assert set(got) == {"image_id", "image"}


def test_rogan_gladen_corrects_a_known_error_and_covers_the_truth():
    import math

    from malaria_ray.metrics import rogan_gladen

    # 2% true parasitemia seen through Se 0.9 / Sp 0.98: the raw fraction is 0.9*0.02 + 0.02*0.98 = 0.0376.
    est, low, high = rogan_gladen(376, 10_000, 0.9, 0.98)
    assert abs(est - 0.02) < 1e-12 and low < 0.02 < high
    assert rogan_gladen(0, 100, 0.9, 0.98)[0] == 0.0  # below the false-positive rate: clipped, not negative
    assert rogan_gladen(100, 100, 0.9, 0.98)[0] == 1.0
    assert all(math.isnan(v) for v in rogan_gladen(5, 100, 0.5, 0.5))  # no better than chance
    assert all(math.isnan(v) for v in rogan_gladen(0, 0, 0.9, 0.98))
    # Uncertain rates widen the interval.
    exact, rates_measured = rogan_gladen(376, 10_000, 0.9, 0.98), rogan_gladen(376, 10_000, 0.9, 0.98, 100, 1000)
    assert rates_measured[2] - rates_measured[1] > exact[2] - exact[1]

    # Coverage: the truth is inside the 95% interval about 95% of the time when Se, Sp and the
    # field's count are all sampled (Se from 150 infected validation cells, Sp from 2,000 uninfected).
    rng = np.random.default_rng(0)
    se, sp, truth, n, hits, runs = 0.92, 0.985, 0.05, 2000, 0, 2000
    for _ in range(runs):
        se_hat = rng.binomial(150, se) / 150
        sp_hat = rng.binomial(2000, sp) / 2000
        infected = rng.binomial(n, truth)
        k = rng.binomial(infected, se) + rng.binomial(n - infected, 1 - sp)
        _, low, high = rogan_gladen(k, n, se_hat, sp_hat, 150, 2000)
        hits += low <= truth <= high
    assert 0.92 <= hits / runs <= 0.99, hits / runs


def test_metrics_accumulator_matches_exact_metrics():
    rng = np.random.default_rng(0)
    n = 5000
    y = rng.random(n) < 0.4
    prob = np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1).astype(np.float32)
    acc = metrics.MetricsAccumulator(0.5)
    labels = np.where(y, "Parasitized", "Uninfected").astype(object)
    labels[:100] = None  # unknown labels: counted as images, not in the confusion matrix
    errors = np.array([None] * n, dtype=object)
    errors[100:110] = "bad bytes"
    for a in range(0, n, 700):
        acc.update(labels[a:a + 700], prob[a:a + 700], errors[a:a + 700])
    keep = np.arange(n) >= 110
    exact = metrics.binary_metrics(y[keep], prob[keep], 0.5)
    row = acc.row()
    assert {k: row[k] for k in ("tp", "fp", "fn", "tn")} == {k: exact[k] for k in ("tp", "fp", "fn", "tn")}
    assert row["n_images"] == n and row["n_errors"] == 10 and row["n_labelled"] == n - 110
    assert abs(row["roc_auc"] - exact["roc_auc"]) < 1e-3
    assert acc.confusion().sum() == n - 110


def test_one_bootstrap_serves_both_thresholds():
    """trainrun's two metrics rows share one set of patient resamples: each gets the intervals a
    bootstrap of its own threshold (same seed) gives, and the AUC's is the same for both."""
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.5
    p = np.clip(y * 0.4 + rng.random(400) * 0.6, 0, 1)
    groups = np.repeat([f"P{i}" for i in range(20)], 20)
    both = metrics.patient_bootstraps(y, p, groups, [0.3, 0.5], n_boot=200, seed=7)
    assert both == [metrics.patient_bootstrap(y, p, groups, t, n_boot=200, seed=7) for t in (0.3, 0.5)]
    assert both[0]["roc_auc"] == both[1]["roc_auc"] and both[0]["sensitivity"] != both[1]["sensitivity"]


def test_correction_applies_only_with_rates_of_the_same_cells_at_their_threshold():
    contract = {schema.KEY_THRESHOLD: 0.3, schema.KEY_VAL_SENSITIVITY: 0.95, schema.KEY_VAL_SPECIFICITY: 0.98,
                schema.KEY_VAL_N_POSITIVE: 400, schema.KEY_VAL_N_NEGATIVE: 600}
    own = metrics.Correction.of(contract, 0.3, schema.CELLS_CROPS)
    assert own.reason is None
    cols = own.columns(50, 1000)
    assert (cols["frac_corrected"], cols["frac_corrected_ci_low"], cols["frac_corrected_ci_high"]) == \
        metrics.rogan_gladen(50, 1000, 0.95, 0.98, 400, 600)
    assert cols["frac_corrected"] == pytest.approx((0.05 + 0.98 - 1) / (0.95 + 0.98 - 1))
    fields = metrics.Correction.of(contract, 0.3, schema.CELLS_FIELDS)  # a model.json of a crop-trained model
    assert "uncalibrated" in fields.reason and "cut-out cells" in fields.reason
    assert fields.columns(50, 1000)["frac_corrected"] is None
    assert "not the model's operating point" in metrics.Correction.of(contract, 0.5, schema.CELLS_CROPS).reason
    assert "no validation rates" in metrics.Correction.of({}, 0.5, schema.CELLS_CROPS).reason
    chance = {**contract, schema.KEY_VAL_SENSITIVITY: 0.5, schema.KEY_VAL_SPECIFICITY: 0.5}
    assert "not correctable" in metrics.Correction.of(chance, 0.3, schema.CELLS_CROPS).reason
    rows = metrics.roll_up(_predictions(["s1"] * 4, ["p1"] * 4, [None] * 4, [True, False, False, False]), 0.02, "m",
                           own).to_pylist()
    assert all(r["correction"] == metrics.CORRECTED and r["frac_corrected"] is not None for r in rows)
