"""Training from annotated field photographs: the crop corpus (cut as scoring cuts), training on it
and fine-tuning from a run. SYNTHETIC fields with their COCO boxes (``synth --fields``)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from malaria_ray import corpus, detect, fieldcrops, synth_fields
from malaria_ray.annotations import load_annotations, match_boxes
from malaria_ray.config import CorpusError, TrainConfig
from malaria_ray.model import ModelError


@pytest.fixture(scope="module")
def annotated_fields(tmp_path_factory):
    dest = tmp_path_factory.mktemp("fields")
    synth_fields.write_fields(str(dest), 8, slides=4, seed=3)
    return dest


def test_crop_corpus_holds_the_detected_cells_that_match_a_box_with_its_label(annotated_fields, tmp_path):
    s = fieldcrops.write_corpus(str(annotated_fields), str(annotated_fields / "annotations.json"), str(tmp_path / "c"),
                                size=32, group_fields=2, workers=2)
    truth = load_annotations(str(annotated_fields / "annotations.json"))
    crops = pd.read_parquet(tmp_path / "c" / "crops.parquet")
    assert s["fields"] == 8 and s["groups"] == 4 and s["crops"] == len(crops) == s["matched"]
    assert s["matched"] + s["annotated_not_found"] == s["annotated"] == sum(len(t.boxes) for t in truth.values())
    assert s["matched"] >= 0.85 * s["annotated"] and s["parasitized"] == (crops["label"] == "Parasitized").sum() > 0
    assert set(crops["stage"]) == {"ring", "red blood cell"}
    assert set(crops["slide_id"]) == {f"slide-{k}" for k in range(4)}, "one folder per slide: the folder"
    assert (crops["slide_id"] == crops["patient_id"]).all()
    one_folder = fieldcrops.identity_groups([f"/x/f{i:02d}.jpg" for i in range(25)], 10)
    assert sorted(set(one_folder.values())) == ["fields-0000", "fields-0001", "fields-0002"]
    assert one_folder["/x/f09.jpg"] == "fields-0000" and one_folder["/x/f10.jpg"] == "fields-0001"
    # each crop is the scoring detector's crop of a detected cell, labelled by the box it matches
    row = crops.iloc[0]
    name = row["field"].rsplit("/", 1)[1]
    image = np.asarray(Image.open(row["field"]).convert("RGB"))
    det = detect.detect_cells(image, 32)
    k = [list(b) for b in det.boxes.tolist()].index(list(row["box"]))
    assert (np.asarray(Image.open(io.BytesIO(row["image"]))) == det.crops[k]).all()
    m = match_boxes(truth[name].boxes, det.boxes[k:k + 1])
    assert truth[name].labels[m.pairs[0, 0]] == row["label"]
    # the existing Parquet corpus path reads it: labels and groups as identity
    listing = corpus.list_corpus(str(tmp_path / "c"))
    assert len(listing) == len(crops) and set(listing.patient_ids) == set(crops["patient_id"])
    assert json.loads((tmp_path / "c" / fieldcrops.SUMMARY_FILE).read_text())["crops"] == len(crops)


def test_no_annotated_field_under_data_is_one_line(annotated_fields, tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(CorpusError, match="is named in"):
        fieldcrops.write_corpus(str(tmp_path / "other"), str(annotated_fields / "annotations.json"), str(tmp_path / "c"))


@pytest.mark.tf
def test_init_from_copies_every_weight_and_refuses_another_size(tmp_path):
    from malaria_ray.model import build_model, check_init, copy_weights, save_model

    save_model(build_model(image_size=32, seed=1), str(tmp_path / "run"))
    fresh = build_model(image_size=32, seed=2)
    copy_weights(fresh, str(tmp_path / "run"))
    trained = build_model(image_size=32, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), trained.get_weights()))
    with pytest.raises(ModelError, match="--image-size 32"):
        check_init(str(tmp_path / "run"), 64)
    with pytest.raises(ModelError, match="does not exist"):
        check_init(str(tmp_path / "nope"), 32)
    local = TrainConfig(data="d", output="o", init_from="run", weights="file://w.h5").with_absolute_inputs()
    assert (local.init_from, local.weights) == (os.path.abspath("run"), os.path.abspath("w.h5"))
    remote = TrainConfig(data="d", output="o", init_from="s3://b/run", weights="imagenet").with_absolute_inputs()
    assert (remote.init_from, remote.weights) == ("s3://b/run", "imagenet")


@pytest.mark.ray
@pytest.mark.tf
@pytest.mark.slow
def test_fine_tune_a_run_on_annotated_fields(annotated_fields, ray_session, tmp_path, monkeypatch):
    """One real Ray Train run through both new paths: the crop corpus of annotated fields, and
    --init-from (a saved 32 px model standing in for a trained run; copy_weights is checked above),
    named as a user in its folder names it: relative (Ray Train's workers run in other folders)."""
    from malaria_ray import train
    from malaria_ray.model import build_model, save_model
    from malaria_ray.schema import CELLS_FIELDS, KEY_VAL_CELLS

    save_model(build_model(image_size=32, seed=1), str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data=str(annotated_fields), annotations=str(annotated_fields / "annotations.json"),
                      output=str(tmp_path / "tuned"), init_from="base", image_size=32, epochs=1,
                      batch_size=16, bn_recal_batches=2, val_fraction=0.5)
    summary = train.fit(train.plan_run(cfg))
    assert summary["epochs"] == 1
    contract = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert contract[KEY_VAL_CELLS] == CELLS_FIELDS, "the operating point was chosen on field cells"
    split = pd.read_parquet(tmp_path / "tuned" / "split.parquet")
    assert split["uri"].str.contains("field_crops/crops.parquet#").all()
    # --class-weight balanced (the default): the rare parasitized crops weigh more, the mean weight is 1
    w = json.loads((tmp_path / "tuned" / "config.json").read_text())["class_weights"]
    train_labels = split.loc[split.split == "train", "label"]
    counts = [int((train_labels == c).sum()) for c in ("Parasitized", "Uninfected")]
    assert counts[0] < counts[1] and w[0] > 1 > w[1], (counts, w)
    assert np.isclose(w[0] * counts[0] + w[1] * counts[1], sum(counts)), (counts, w)
    assert set(split["patient_id"]) == {f"slide-{k}" for k in range(4)}
    assert not set(split.loc[split.split == "val", "patient_id"]) & set(split.loc[split.split == "train", "patient_id"])
