"""Training reads its corpus from s3:// and writes its run directory to s3:// (real moto server)."""

import io

import boto3
import pandas as pd
import pytest

from malaria_ray import corpus, train
from malaria_ray.config import TrainConfig


@pytest.mark.ray
@pytest.mark.tf
@pytest.mark.slow
def test_train_from_and_to_s3(small_corpus, moto_s3, ray_session):
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="cells")
    s3.create_bucket(Bucket="runs")
    listing = corpus.stable_subsample(corpus.list_corpus(str(small_corpus)), 48, seed=0)
    for uri, label in zip(listing.uris, listing.labels):
        with open(uri, "rb") as f:
            s3.put_object(Bucket="cells", Key=f"nih/{label}/{uri.rsplit('/', 1)[1]}", Body=f.read())

    cfg = TrainConfig(data="s3://cells/nih", output="s3://runs/r1", image_size=32, epochs=1,
                      batch_size=16, num_workers=1, augment=False)
    summary = train.fit(train.plan_run(cfg))

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="r1/")["Contents"]}
    for name in ("model.keras", "config.json", "history.parquet", "split.parquet", "predictions.parquet",
                 "metrics.parquet", "plots/curves.png", "plots/confusion_matrix.png"):
        assert f"r1/{name}" in keys, name
    split = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="runs", Key="r1/split.parquet")["Body"].read()))
    assert len(split) == 48 and split["uri"].str.startswith("s3://cells/nih/").all()
    preds = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="runs", Key="r1/predictions.parquet")["Body"].read()))
    assert len(preds) == (split.split == "val").sum() and preds["error"].isna().all()
    assert summary["model_id"] == preds["model_id"].iloc[0]

    with pytest.raises(Exception, match="bucket nope does not exist"):
        train.plan_run(TrainConfig(data="s3://cells/nih", output="s3://nope/r"))
