"""Identity parsing against NIH's own mapping CSVs, corpus listing and splits (pure: no Ray/TF)."""

import ast
import csv
import os

import numpy as np
import pytest

from malaria_ray import corpus


def _csv_rows_of(path):
    with open(path, newline="") as f:
        for row in csv.reader(f):
            for fn in ast.literal_eval(",".join(row[1:]).rstrip(",")):
                yield row[0], fn


def _csv_rows(folder):
    for name in ("patientid_cellmapping_parasitized.csv", "patientid_cellmapping_uninfected.csv"):
        yield from _csv_rows_of(folder / name)


def test_fixture_mapping_rows_resolve_and_match_its_folders(sample_dir):
    """The repository's fixture carries NIH's mapping rows for exactly its own cells."""
    rows = list(_csv_rows(sample_dir))
    assert len(rows) == 288
    listed = {fn: label for label in ("Parasitized", "Uninfected") for fn in os.listdir(sample_dir / label)}
    assert {fn for _, fn in rows} == set(listed)
    for key, fn in rows:
        assert corpus.parse_identity(fn).slide_id == key, fn
    mapped_as = {fn: ("Parasitized" if "parasitized" in name else "Uninfected")
                 for name in ("patientid_cellmapping_parasitized.csv", "patientid_cellmapping_uninfected.csv")
                 for _, fn in _csv_rows_of(sample_dir / name)}
    assert mapped_as == listed


def test_every_nih_mapping_row_resolves(nih_sample_dir):
    rows = list(_csv_rows(nih_sample_dir))
    assert len(rows) == 27_558
    patients = set()
    for key, fn in rows:
        ident = corpus.parse_identity(fn)
        assert ident.slide_id == key, fn
        assert ident.patient_id is not None, fn
        patients.add(ident.patient_id)
    # 150 infected patients + 50 control slides; P8's two slide keys are one patient.
    assert len(patients) == 200
    assert len({k for k, _ in rows}) == 201
    assert sum(p.startswith("P") for p in patients) == 150


@pytest.mark.parametrize("name, slide, patient", [
    ("C37BP2_thinF_IMG_20150620_133111a_cell_87.png", "C37BP2_thinF", "P2"),
    ("C51AP12thinF_IMG_20150724_152258_cell_30.png", "C51AP12thinF", "P12"),
    ("C47P8thinOriginalOlympusCX21_IMG_x_cell_1.png", "C47P8thinOriginalOlympusCX21", "P8"),
    ("C47P8thin_Original_Motic_IMG_x_cell_1.png", "C47P8thin_Original_Motic", "P8"),
    ("C1_thinF_IMG_20150604_104722_cell_60.png", "C1_thinF", "C1"),
    ("C2NThinF_IMG_20150604_114631_cell_1.png", "C2NThinF", "C2"),
    ("C3thin_original_IMG_20150608_162922_cell_1.png", "C3thin_original", "C3"),
    ("C167P128ReThinF_IMG_20151201_110114_cell_1.png", "C167P128ReThinF", "P128"),
    ("s3://bucket/x/Parasitized/C33P1thinF_IMG_20150619_114756a_cell_179.png", "C33P1thinF", "P1"),
    ("photo 01.png", None, None),
    ("Thumbs.db", None, None),
])
def test_parse_identity_irregular_names(name, slide, patient):
    ident = corpus.parse_identity(name)
    assert (ident.slide_id, ident.patient_id) == (slide, patient)


@pytest.mark.parametrize("which, images, parasitized, identities", [
    ("sample_dir", 288, 144, 18), ("nih_sample_dir", 6000, 3000, 160)])
def test_list_sample(request, which, images, parasitized, identities):
    listing = corpus.list_corpus(str(request.getfixturevalue(which)))
    assert len(listing) == images
    assert listing.labels.count("Parasitized") == parasitized
    assert len(set(listing.patient_ids)) == identities
    assert None not in listing.patient_ids


@pytest.mark.parametrize("which", ["sample_dir", "nih_sample_dir"])
def test_patient_split_is_disjoint_stratified_and_deterministic(request, which):
    listing = corpus.list_corpus(str(request.getfixturevalue(which)))
    a = corpus.split_patient(listing, 0.3, seed=0)
    b = corpus.split_patient(listing, 0.3, seed=0)
    c = corpus.split_patient(listing, 0.3, seed=1)
    assert (a == b).all() and not (a == c).all()
    pids = np.asarray(listing.patient_ids)
    assert not set(pids[a]) & set(pids[~a])
    assert 0.25 < a.mean() < 0.35
    labels = np.asarray(listing.labels)
    for side in (a, ~a):  # both sides hold both classes, infected patients and controls
        assert {"Parasitized", "Uninfected"} <= set(labels[side])
        assert any(p.startswith("C") for p in pids[side]) and any(p.startswith("P") for p in pids[side])


@pytest.mark.parametrize("which", ["sample_dir", "nih_sample_dir"])
def test_random_split_matches_fraction(request, which):
    listing = corpus.list_corpus(str(request.getfixturevalue(which)))
    m = corpus.split_random(listing, 0.3, seed=0)
    assert m.sum() == round(0.3 * len(listing))
    pids = np.asarray(listing.patient_ids)
    assert set(pids[m]) & set(pids[~m]), "an image-level split leaks patients (that is why it is not the default)"


def test_listing_skips_non_images_and_needs_both_classes(tmp_path):
    (tmp_path / "deep" / "Parasitized").mkdir(parents=True)
    (tmp_path / "deep" / "Parasitized" / "a.png").write_bytes(b"x")
    (tmp_path / "deep" / "Parasitized" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(corpus.CorpusError, match="Uninfected"):
        corpus.list_corpus(str(tmp_path))
    (tmp_path / "Uninfected").mkdir()
    (tmp_path / "Uninfected" / "b.JPG").write_bytes(b"x")
    listing = corpus.list_corpus(str(tmp_path))
    assert len(listing) == 2 and len(listing.skipped) == 1
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        corpus.list_corpus(str(tmp_path / "nope"))


def test_subsample_is_balanced_and_stable(sample_dir):
    listing = corpus.list_corpus(str(sample_dir))
    a = corpus.stable_subsample(listing, 101, seed=3)
    assert len(a) == 101 and a.uris == corpus.stable_subsample(listing, 101, seed=3).uris
    assert a.labels.count("Parasitized") == 51


def test_file_uri_lists_the_same_corpus(sample_dir):
    plain = corpus.list_corpus(str(sample_dir))
    via_uri = corpus.list_corpus("file://" + str(sample_dir))
    assert via_uri.uris == plain.uris and len(via_uri) == 288


def test_identity_is_what_was_decided_before_decoding_else_the_names():
    """``corpus.identify``: a listing's or a --manifest's identity wins; a manifest row without a
    label keeps the image's own; an image it does not know is described from its names."""
    nih = "/d/Parasitized/C33P1thinF_IMG_20150619_114756a_cell_179.png"
    known = corpus.Identities.from_manifest({"/d/a.png": ("S9", "Q9", "Uninfected"), nih: ("S8", None, None)})
    assert len(known) == 2 and known.get("/d/b.png") is None
    assert corpus.identify("/d/a.png", known) == ("Uninfected", "S9", "Q9")
    assert corpus.identify(nih, known) == ("Parasitized", "S8", None)  # the manifest's slide and (no) patient
    assert corpus.identify(nih, None) == corpus.describe(nih) == ("Parasitized", "C33P1thinF", "P1")
    assert corpus.identify("/d/x.png", known, "Parasitized", "S1", "Q1") == ("Parasitized", "S1", "Q1")


def test_class_weights_balance_the_training_part_only():
    labels = ["Parasitized"] * 2 + ["Uninfected"] * 8 + ["Parasitized"] * 5  # the last five are validation
    listing = corpus.Listing(uris=[f"u{i}" for i in range(15)], labels=labels, slide_ids=[None] * 15,
                             patient_ids=[None] * 15, skipped=[])
    val = np.array([False] * 10 + [True] * 5)
    w = corpus.class_weights(listing, val, "balanced")
    assert np.allclose(w, [10 / (2 * 2), 10 / (2 * 8)])  # n / (2 n_c) over the ten training images
    assert np.isclose(2 * w[0] + 8 * w[1], 10), "the mean weight is 1: the loss keeps its scale"
    assert corpus.class_weights(listing, val, "none") == [1.0, 1.0]
    only_one = corpus.class_weights(listing, np.array([True, True] + [False] * 8 + [True] * 5), "balanced")
    assert only_one == [1.0, 1.0 * 8 / (2 * 8)], only_one
