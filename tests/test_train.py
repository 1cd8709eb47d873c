"""Training end to end on real NIH cells: 2 Ray Train workers, a killed worker, the run directory."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest
from PIL import Image

from malaria_ray import checkpoint, corpus, faults, train
from malaria_ray.config import TrainConfig
from test_layout import assert_project_parquet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def corpus_with_bad_files(small_corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_corpus, data)
    (data / "Parasitized" / "C999P999ThinF_IMG_20150101_000000_cell_1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (data / "Uninfected" / "Thumbs.db").write_bytes(b"\x00" * 64)
    return data


def cfg_batch(cfg: TrainConfig) -> int:
    return cfg.batch_size_per_worker * cfg.num_workers


@pytest.mark.ray
@pytest.mark.tf
@pytest.mark.slow
def test_two_workers_train_resume_after_killed_worker_and_write_run(corpus_with_bad_files, tmp_path, ray_session,
                                                                   monkeypatch):
    out = tmp_path / "run"
    # max_failures=2 (the product default), not 1: besides the injected kill, a start can fail on
    # its own. Ray's TensorFlow backend picks each worker's collective port by binding port 0 and
    # releasing it; another process can take it before TF binds ("Could not start gRPC server",
    # seen once in CI), and Train retries that start like any worker failure.
    cfg = TrainConfig(data=str(corpus_with_bad_files), output=str(out), image_size=32, epochs=3,
                      batch_size_per_worker=16, num_workers=2, max_failures=2, seed=0)
    marker = tmp_path / "killed-worker"
    monkeypatch.setenv(faults.ENV, faults.spec("train.epoch", 2, str(marker)))
    summary = train.fit(train.plan_run(cfg))
    assert marker.exists(), "the fault injection killed a worker"

    hist = pd.read_parquet(out / "history.parquet")
    assert hist["epoch"].tolist() == [1, 2, 3], "each epoch exactly once despite the killed worker"
    assert np.isfinite(hist["loss"]).all(), hist.to_string()
    assert summary["epochs"] == 3
    # The restarted workers went on from the checkpoint, weights and optimizer both: the optimizer's
    # step count in every kept checkpoint is epochs x steps, which a restart with a fresh optimizer
    # (8 steps by epoch 3) would not give. Whether the loss fell over 12 steps on 128 cells is noise,
    # not a property of resuming (CI once saw 0.96 -> 0.99).
    steps = int(hist["train_images"].iloc[0]) // cfg_batch(cfg)
    for ckpt in sorted(d for d in out.glob("checkpoints/*/checkpoint_*") if d.is_dir()):
        epoch = checkpoint.read_state(str(ckpt))["epoch"]
        iterations = int(np.load(ckpt / checkpoint.OPTIMIZER_FILE)["v0"])
        assert iterations == epoch * steps, (ckpt.name, epoch, iterations, steps)

    import keras

    keras.models.load_model(out / "model.keras", safe_mode=True)
    cfg_saved = json.loads((out / "config.json").read_text())
    assert cfg_saved["num_workers"] == 2 and cfg_saved["split"] == "patient"
    assert cfg_saved["batch_size"] == 32 and cfg_saved["batch_size_per_worker"] == 16

    split = pd.read_parquet(out / "split.parquet")
    assert len(split) == len(corpus.list_corpus(str(corpus_with_bad_files)))
    assert not set(split.loc[split.split == "val", "patient_id"]) & set(split.loc[split.split == "train", "patient_id"])
    bad = split[~split.readable]
    assert bad["uri"].str.endswith("C999P999ThinF_IMG_20150101_000000_cell_1.png").tolist() == [True]

    preds = pd.read_parquet(out / "predictions.parquet")
    n_val = int((split.split == "val").sum())
    # Validation predictions are made by the workers: both ranks' files merged into each checkpoint,
    # together the readable validation images once each (the driver did not predict them again).
    ckpts = sorted(d for d in out.glob("checkpoints/*/checkpoint_*") if d.is_dir())
    assert ckpts
    for ckpt in ckpts:
        assert sorted(f.name for f in ckpt.glob("val_predictions.rank*.parquet")) == [
            "val_predictions.rank000.parquet", "val_predictions.rank001.parquet"], list(ckpt.iterdir())
    made = checkpoint.read_val_predictions(str(ckpts[-1]))
    assert made.num_rows == n_val - int((~split.readable & (split.split == "val")).sum())
    assert made.column("uri").to_pylist() != [] and len(set(made.column("uri").to_pylist())) == made.num_rows
    assert len(preds) == n_val, "one row per validation image, unreadable ones as error rows"
    assert preds["prob_parasitized"].dropna().between(0, 1).all()
    m = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert m.tp + m.fp + m.fn + m.tn == preds["error"].isna().sum()
    assert m.n_images == n_val and m.model_id == summary["model_id"] == preds["model_id"].iloc[0]
    for png in ("curves.png", "confusion_matrix.png", "disagreements.png"):
        assert Image.open(out / "plots" / png).size[0] > 200

    # The scoring job, given the run's model.keras, reproduces validation's probabilities image by
    # image: one preprocessing contract, carried by the artifact, and inference-mode BatchNorm.
    from malaria_ray import score
    from malaria_ray.config import ScoreConfig

    val_dir = tmp_path / "val"
    for uri in split.loc[split.split == "val", "uri"]:
        (val_dir / os.path.basename(os.path.dirname(uri))).mkdir(parents=True, exist_ok=True)
        os.symlink(uri, val_dir / os.path.basename(os.path.dirname(uri)) / os.path.basename(uri))
    scored = score.score_archive(ScoreConfig(input=str(val_dir), model=str(out), output=str(tmp_path / "scores")))
    assert scored.model_id == summary["model_id"]
    got, want = (df.dropna(subset=["prob_parasitized"]).drop_duplicates("image_id").set_index("image_id")
                 for df in (pd.read_parquet(scored.predictions_uri), preds))
    assert len(got) == len(want) > 0
    assert np.allclose(got.loc[want.index, "prob_parasitized"], want["prob_parasitized"], atol=1e-5)


@pytest.mark.tf
def test_learning_rate_follows_schedule_and_batch_scaling(tmp_path):
    from malaria_ray.cli import parse_train
    from malaria_ray.config import ConfigError
    from malaria_ray.worker import collective_implementation, learning_rate

    base = {"data": "d", "output": str(tmp_path), "epochs": 4, "learning_rate": 1e-3}
    assert learning_rate(TrainConfig(**base), 10) == 1e-3  # the notebook: constant
    cos = learning_rate(TrainConfig(**base, lr_schedule="cosine", warmup_epochs=1), 10)
    got = [float(cos(s)) for s in (0, 5, 10, 25, 40)]
    assert np.allclose(got, [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9), got  # linear up over 10 steps, cosine to 0
    # The global batch: given directly, or per worker; the learning rate scales from a batch of 32.
    per_worker = TrainConfig(**base, batch_size_per_worker=64, num_workers=4)
    assert per_worker.batch_size == 256
    assert per_worker.peak_learning_rate == 1e-3  # --lr-scaling none: as given
    assert np.isclose(TrainConfig(**base, batch_size=256, num_workers=4, lr_scaling="sqrt").peak_learning_rate,
                      1e-3 * 8 ** 0.5)
    linear = TrainConfig(**base, batch_size_per_worker=64, num_workers=4, lr_scaling="linear")
    assert np.isclose(linear.peak_learning_rate, 8e-3) and np.isclose(float(learning_rate(linear, 10)), 8e-3)
    assert TrainConfig.from_dict(json.loads(linear.to_json())) == linear  # a resumed run keeps its batch
    cfg, _ = parse_train(["--data", "d", "--output", "o", "--recipe", "cpu", "--num-workers", "2",
                          "--batch-size-per-worker", "48", "--lr-scaling", "sqrt"])
    assert (cfg.batch_size, cfg.image_size, cfg.lr_scaling) == (96, 64, "sqrt")
    with pytest.raises(ConfigError, match="not both"):
        parse_train(["--data", "d", "--output", "o", "--batch-size", "64", "--batch-size-per-worker", "16"])
    with pytest.raises(ConfigError, match="--lr-scaling"):
        TrainConfig(**base, lr_scaling="cubic")
    with pytest.raises(ConfigError, match="--batch-size-per-worker"):
        TrainConfig(**base, batch_size_per_worker=0)
    # Gradients: NCCL between GPUs, RING (through the hosts) on CPUs.
    assert (collective_implementation(True), collective_implementation(False)) == ("NCCL", "RING")


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "jobs", "train.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_error_without_traceback(tmp_path, small_corpus):
    only_one_class = tmp_path / "one"
    (only_one_class / "Parasitized").mkdir(parents=True)
    shutil.copy(next((small_corpus / "Parasitized").iterdir()), only_one_class / "Parasitized")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / checkpoint.FINISHED_MARKER).write_bytes(b"")
    cases = [
        (["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--data", str(only_one_class), "--output", str(tmp_path / "o")], "Uninfected"),
        (["--data", str(small_corpus), "--output", str(finished)], "--overwrite"),
        (["--data", str(small_corpus), "--output", str(tmp_path / "o"), "--batch-size", "3", "--num-workers", "2"],
         "multiple of"),
    ]
    for args, needle in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr


def test_random_split_plan_is_the_notebooks(tmp_path, sample_dir):
    plan = train.plan_run(TrainConfig(data=str(sample_dir), output=str(tmp_path / "o"), split="random"))
    assert plan.val_mask.sum() == round(0.3 * 288) and not plan.cfg.synthetic


def test_synthetic_corpus_is_labelled(tmp_path):
    r = subprocess.run([sys.executable, "-m", "malaria_ray.cli", "synth", str(tmp_path / "s"), "--n", "24"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SYNTHETIC" in r.stdout
    plan = train.plan_run(TrainConfig(data=str(tmp_path / "s"), output=str(tmp_path / "o")))
    assert plan.cfg.synthetic and len(plan.listing) == 24
    assert None not in plan.listing.patient_ids  # NIH-style names: grouped splits work on synthetic data too


@pytest.mark.tf
def test_batchnorm_recalibration_makes_inference_mode_match_batch_statistics(sample_dir):
    """After recalibrating on one batch, every BatchNorm layer normalizes it in inference mode exactly
    as in training mode; before, the moving statistics of a fresh model are far off."""
    from malaria_ray.model import build_model
    from malaria_ray.preprocess import decode_image
    from malaria_ray.worker import bn_recalibrator

    files = sorted((sample_dir / "Parasitized").glob("*.png"))[:8] + sorted((sample_dir / "Uninfected").glob("*.png"))[:8]
    x = np.stack([decode_image(f.read_bytes(), 32) for f in files]).astype(np.float32)
    model = build_model(image_size=32, seed=0)
    base, scaled = model.get_layer("resnet50v2"), x / 255.0  # the base sees the rescaled pixels
    gap = lambda: float(np.abs(base(scaled, training=False).numpy() - base(scaled, training=True).numpy()).max())
    before = gap()
    momenta = [la.momentum for la in model._flatten_layers() if hasattr(la, "moving_mean")]
    bn_recalibrator(model)([x.astype(np.uint8)])
    assert gap() < 1e-3 < before, (gap(), before)
    assert [la.momentum for la in model._flatten_layers() if hasattr(la, "moving_mean")] == momenta


@pytest.mark.tf
def test_bf16_precision_trains_with_float32_weights_and_probabilities(sample_dir):
    """--precision bf16: layers compute in bfloat16, variables and the softmax stay float32, and a
    step on real cells lowers the loss; the policy is reset for what runs next in this process."""
    import keras
    import tensorflow as tf

    from malaria_ray.preprocess import decode_image
    from malaria_ray.worker import compile_model

    files = sorted((sample_dir / "Parasitized").glob("*.png"))[:8] + sorted((sample_dir / "Uninfected").glob("*.png"))[:8]
    x = tf.constant(np.stack([decode_image(f.read_bytes(), 32) for f in files]))
    y = tf.one_hot([0] * 8 + [1] * 8, 2)
    cfg = TrainConfig(data="d", output="o", image_size=32, batch_size=16, precision="bf16", augment=False)
    try:
        compiled = compile_model(cfg, tf.distribute.get_strategy(), steps_per_epoch=4)
        conv = next(la for la in compiled.model.get_layer("resnet50v2").layers if isinstance(la, keras.layers.Conv2D))
        assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
        assert compiled.model.output.dtype == "float32"
        seed = tf.constant([0, 0], tf.int64)
        losses = [float(compiled.train_step(x, y, seed)[0]) for _ in range(4)]
        assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.tf
def test_weighted_loss_scales_each_example_by_its_class():
    import tensorflow as tf

    from malaria_ray.worker import weighted

    losses = tf.constant([0.5, 2.0, 1.0])
    y = tf.one_hot([0, 1, 1], 2)  # parasitized, uninfected, uninfected
    assert np.allclose(weighted(losses, y, [4.0, 0.5]).numpy(), [2.0, 1.0, 0.5])
    assert np.allclose(weighted(losses, y, [1.0, 1.0]).numpy(), losses.numpy())


@pytest.mark.tf
@pytest.mark.slow
def test_xla_step_matches_the_default_step(sample_dir):
    """--xla compiles the forward and backward pass around the (non-XLA) augmentation: from the
    same weights, batch and augmentation seed, its first loss is the default step's, and it trains."""
    import tensorflow as tf

    from malaria_ray.preprocess import decode_image
    from malaria_ray.worker import compile_model

    files = sorted((sample_dir / "Parasitized").glob("*.png"))[:8] + sorted((sample_dir / "Uninfected").glob("*.png"))[:8]
    x = tf.constant(np.stack([decode_image(f.read_bytes(), 32) for f in files]))
    y = tf.one_hot([0] * 8 + [1] * 8, 2)
    seed = tf.constant([3, 4], tf.int64)
    losses = {}
    for xla in (False, True):
        cfg = TrainConfig(data="d", output="o", image_size=32, batch_size=16, xla=xla, seed=0)
        compiled = compile_model(cfg, tf.distribute.get_strategy(), steps_per_epoch=4)
        compiled.model.get_layer("dropout_head").rate = 0.0  # XLA draws other dropout masks: compare without
        losses[xla] = [float(compiled.train_step(x, y, seed)[0]) for _ in range(4)]
    assert np.isclose(losses[True][0], losses[False][0], rtol=1e-4), losses  # the same function
    assert losses[True][-1] < losses[True][0] / 2, losses  # and it trains (later steps drift apart by rounding)


def test_stream_decision_follows_the_flag_the_object_store_and_existing_shards():
    from malaria_ray.cli import parse_train
    from malaria_ray.config import ConfigError

    cfg = TrainConfig(data="d", output="o", image_size=128)
    gib = train.decoded_gib(27_558, 128)
    assert round(gib * 2**30 / 1e9, 2) == 1.35  # NIH's whole corpus at 128 px, as the issue measured
    store = 4 * gib * 2**30
    assert not train.should_stream(cfg, 27_558, store * 1.01, shards_done=False)
    assert train.should_stream(cfg, 27_558, store * 0.99, shards_done=False)
    assert train.should_stream(cfg, 100, store, shards_done=True), "an interrupted streamed run keeps streaming"
    assert train.should_stream(TrainConfig(data="d", output="o", stream="on"), 10, 1e12, False)
    assert not train.should_stream(TrainConfig(data="d", output="o", stream="off"), 10**9, 1.0, False)
    assert parse_train(["--data", "d", "--output", "o", "--stream", "on"])[0].stream == "on"
    with pytest.raises(ConfigError, match="--stream"):
        TrainConfig(data="d", output="o", stream="always")


@pytest.mark.ray
def test_streamed_corpus_is_decoded_once_into_shards_read_in_a_fresh_order_each_epoch(
        corpus_with_bad_files, tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(train, "SHARD_ROWS", 8)  # many small shards, so that their order can show
    cfg = TrainConfig(data=str(corpus_with_bad_files), output=str(tmp_path / "run"), image_size=32, stream="on")
    listing = corpus.list_corpus(cfg.data)
    val_mask = corpus.make_split(listing, "patient", 0.3, 0)
    train_ds, val_ds, unreadable = train.stream_datasets(listing, val_mask, cfg)
    root = tmp_path / "run" / train.DECODED_DIR
    assert (root / train.DECODED_DONE).exists()
    assert len(list((root / "subset=train").glob("*.parquet"))) >= 4
    assert [r["uri"].endswith("C999P999ThinF_IMG_20150101_000000_cell_1.png") for r in unreadable] == [True]
    bad_in_val = int(unreadable[0]["uri"] in set(np.asarray(listing.uris)[val_mask]))
    assert (train_ds.count(), val_ds.count()) == (int((~val_mask).sum()) - (1 - bad_in_val),
                                                  int(val_mask.sum()) - bad_in_val)
    assert train_ds.schema().names == train.TRAIN_COLUMNS
    epochs = [[r["image_id"] for r in train_ds.iter_rows()] for _ in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs), "every epoch sees every training image once"
    assert len({tuple(e) for e in epochs}) > 1, "the shards are read in a fresh order each epoch"
    batch = next(iter(train_ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    # A resumed run reuses complete shards; a pass cut short (no marker) is decoded again.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    train.stream_datasets(listing, val_mask, cfg)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == before
    (root / train.DECODED_DONE).unlink()
    (root / "subset=train" / "stale.parquet").write_bytes(b"partial")
    train_ds, _, _ = train.stream_datasets(listing, val_mask, cfg)
    assert not (root / "subset=train" / "stale.parquet").exists() and (root / train.DECODED_DONE).exists()
    assert sorted(r["image_id"] for r in train_ds.iter_rows()) == sorted(epochs[0])
    # Shards of another split are never reused; a "decoded" folder malaria-ray did not write is not deleted.
    other = corpus.make_split(listing, "patient", 0.3, 1)
    assert not np.array_equal(other, val_mask) and not train.shards_ready(
        cfg, train.shards_fingerprint(listing, other, cfg))
    _, val_other, _ = train.stream_datasets(listing, other, cfg)
    assert val_other.count() == int(other.sum()) - int(unreadable[0]["uri"] in set(np.asarray(listing.uris)[other]))
    foreign = tmp_path / "other-run" / train.DECODED_DIR
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(train.CorpusError, match="not written by malaria-ray"):
        train.stream_datasets(listing, val_mask, dataclasses.replace(cfg, output=str(tmp_path / "other-run")))
    assert (foreign / "notes.txt").exists()


@pytest.mark.ray
def test_streamed_archive_corpus_is_shuffled_row_by_row_into_mixed_shards(small_corpus, tmp_path, ray_session,
                                                                         monkeypatch):
    """One tar holds all Parasitized members, then all Uninfected: its shards must still mix both."""
    import tarfile

    monkeypatch.setattr(train, "SHARD_ROWS", 16)
    data = tmp_path / "tars"
    data.mkdir()
    with tarfile.open(data / "cells.tar", "w") as tar:
        for label in ("Parasitized", "Uninfected"):
            for png in sorted((small_corpus / label).glob("*.png"))[:48]:
                tar.add(png, arcname=f"{label}/{png.name}")
    cfg = TrainConfig(data=str(data), output=str(tmp_path / "run"), image_size=32, stream="on")
    listing = corpus.list_corpus(cfg.data)
    train_ds, _, _ = train.stream_datasets(listing, corpus.make_split(listing, "random", 0.3, 0), cfg)
    shards = sorted((tmp_path / "run" / train.DECODED_DIR / "subset=train").glob("*.parquet"))
    mixed = [pd.read_parquet(f, columns=["label"])["label"].nunique() == 2 for f in shards]
    assert len(shards) >= 3 and all(mixed), mixed
    for f in shards:  # Ray Data's writer too: the project's codec and schema version
        assert_project_parquet(f)
    assert train_ds.count() == int((~corpus.make_split(listing, "random", 0.3, 0)).sum())


@pytest.mark.ray
@pytest.mark.tf
@pytest.mark.slow
def test_streamed_training_runs_from_decoded_shards_and_removes_them(small_corpus, tmp_path, ray_session):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(small_corpus), output=str(out), image_size=32, epochs=2, batch_size=16,
                      stream="on", max_images=160, seed=0)
    summary = train.fit(train.plan_run(cfg))
    hist = pd.read_parquet(out / "history.parquet")
    saved = json.loads((out / "config.json").read_text())
    assert hist["epoch"].tolist() == [1, 2] and (hist["train_images"] == saved["steps_per_epoch"] * 16).all()
    assert saved["streamed"] is True and saved["stream"] == "on" and not (out / train.DECODED_DIR).exists()
    assert (out / "plots" / "disagreements.png").stat().st_size > 1000
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == summary["n_val"] and preds["prob_parasitized"].between(0, 1).all()
    # patients.parquet: the roll-up of scoring's slides.parquet, over the validation predictions
    import pyarrow.parquet as pq

    from malaria_ray import schema

    patients = pq.read_table(out / "patients.parquet")
    assert patients.schema == schema.SLIDES_SCHEMA
    slides = patients.filter(pc.equal(patients.column(schema.COL_LEVEL), "slide")).to_pandas()
    assert slides[schema.COL_N_CELLS].sum() == preds["error"].isna().sum()
    assert "Evidence by patient" in (out / "model_card.md").read_text()
    for name in ("history", "predictions", "split", "patients", "metrics"):
        assert_project_parquet(out / f"{name}.parquet")


@pytest.mark.ray
@pytest.mark.tf
@pytest.mark.slow
def test_a_parquet_corpus_keeps_its_own_slides_and_patients_through_training(small_corpus, tmp_path, ray_session):
    """A Parquet corpus whose rows name their slide and patient, under file names that say nothing:
    the split, predictions.parquet and patients.parquet all name the listing's patients."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for label, first in (("Parasitized", 0), ("Uninfected", 4)):  # patients Q0-Q3 infected, Q4-Q7 not
        for i, png in enumerate(sorted((small_corpus / label).glob("*.png"))[:32]):
            patient = f"Q{first + i % 4}"
            rows.append({"image": png.read_bytes(), "path": f"cell-{len(rows):03d}.png", "label": label,
                         "slide_id": f"{patient}-slide{i % 2}", "patient_id": patient})
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "cells.parquet")
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(tmp_path / "corpus"), output=str(out), image_size=32, epochs=1, batch_size=16,
                      num_workers=1, augment=False, seed=0)
    summary = train.fit(train.plan_run(cfg))

    split = pd.read_parquet(out / "split.parquet")
    assert set(split["patient_id"]) == {f"Q{i}" for i in range(8)}
    val = split[split["split"] == "val"]
    val_patients = set(val["patient_id"])
    assert 2 <= len(val_patients) <= 6 and not val_patients & set(split.loc[split["split"] == "train", "patient_id"])
    preds = pd.read_parquet(out / "predictions.parquet").set_index("uri")
    assert len(preds) == len(val) == summary["n_val"]
    want = val.set_index("uri")
    for column in ("slide_id", "patient_id", "label"):
        assert (preds.loc[want.index, column] == want[column]).all(), column
    patients = pd.read_parquet(out / "patients.parquet")
    assert set(patients.loc[patients["level"] == "patient", "patient_id"]) == val_patients
    assert set(patients.loc[patients["level"] == "slide", "slide_id"]) == set(val["slide_id"])
    m = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert m["patient_n"] == len(val_patients)


def test_decoded_training_rows_and_run_files_carry_the_listings_identity(small_corpus, tmp_path):
    """Without Ray: the decode path of training (``ingest.read_and_prepare`` with the listing's
    identities, then ``train.training_rows``) and ``trainrun.predictions_table`` keep the label,
    slide and patient a Parquet corpus's own columns gave, not what its file names would say."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from malaria_ray import ingest, trainrun

    rows = [{"image": png.read_bytes(), "path": f"{label}/C1P1thinF_IMG_x_cell_{i}.png", "label": label,
             "slide_id": f"S{i % 3}", "patient_id": f"Q{i % 3}"}
            for label in ("Parasitized", "Uninfected")
            for i, png in enumerate(sorted((small_corpus / label).glob("*.png"))[:6])]
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "cells.parquet")
    listing = corpus.list_corpus(str(tmp_path / "corpus"))
    assert set(listing.patient_ids) == {"Q0", "Q1", "Q2"}  # the names alone would say P1
    known = listing.identities()
    units = {c: listing.units.column(c).to_numpy(zero_copy_only=False) for c in listing.units.column_names}
    decoded = [train.training_rows(b, np.sort(np.asarray(listing.uris, dtype=str)), np.array([], dtype=str))
               for b in ingest.read_and_prepare(units, 32, ingest.NO_IDS, batch_size=5, known=known)]
    uris = np.concatenate([d["uri"] for d in decoded]).tolist()
    labels = np.concatenate([d["label"] for d in decoded])
    want = dict(zip(listing.uris, listing.labels))
    assert sorted(uris) == sorted(listing.uris)
    assert [("Parasitized", "Uninfected")[i] for i in labels] == [want[u] for u in uris]
    preds = trainrun.predictions_table(uris, [f"id{i}" for i in range(len(uris))], np.full(len(uris), 0.7), [],
                                       known, "m", "run")
    by_uri = dict(zip(listing.uris, zip(listing.labels, listing.slide_ids, listing.patient_ids)))
    got = zip(preds.column("label").to_pylist(), preds.column("slide_id").to_pylist(),
              preds.column("patient_id").to_pylist())
    assert list(got) == [by_uri[u] for u in uris]
