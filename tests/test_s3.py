"""Object storage end to end on a local S3 server (moto): the checkpoint, the fit set, the corpus
(Parquet, and the demo's folder), the outputs and the detector on ``s3://``, with the scores
those of the same job on local disk (to float32 rounding).

Every location goes through pyarrow's ``FileSystem.from_uri``; the endpoint reaches pyarrow (driver and
Ray workers alike) through ``AWS_ENDPOINT_URL_S3`` in the environment, set by the ``s3_server`` fixture
before Ray starts. The inputs are uploaded with boto3, an independent client, so nothing of gradood's
own writing (directory markers, say) is needed to read them.

The model is the shipped PixelCNN: it draws no noise, so its features depend on the pixels alone and
not on the row ids, which hold the location (the other families draw their noise, and every family
its fit/calibration split, from (seed, row id)). ``extract.method=loop`` rather than the engine, which
picks its kernels by timing in each process and may differ in the last bits between processes.

One corpus, three ways: the demo corpus (4 sources x 3 images and 2 corrupt files) as rows of two
Parquet files in a bucket, the same Parquet files on local disk, and the demo built by the job itself
as a folder under an ``s3://`` output. The three runs share one detector, so their scores must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, DEMO_OOD_SOURCES, build_demo_corpus
from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source
from gradood.models.checkpoint import load_checkpoint
from gradood.pipeline import ray_job
from gradood.pipeline.stages import compute_features
from gradood.pipeline.tables import SQNORM_PREFIX, feature_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "gradood" / "pretrained" / "pixelcnn_fmnist_small"
BUCKET = "lake"
FIT_ROWS = 40
DEMO_ROWS = 3  # per demo source: 12 images and the 2 corrupt files
S3 = {
    "checkpoint": f"s3://{BUCKET}/models/pixelcnn",
    "parquet": f"s3://{BUCKET}/parquet",
    "fit": f"s3://{BUCKET}/fit",
    "out": f"s3://{BUCKET}/screening",
    "detector": f"s3://{BUCKET}/detectors/pixelcnn.json",
    "demo_out": f"s3://{BUCKET}/demo",
}


@pytest.fixture(scope="module")
def s3_ray(s3_server, local_ray):
    """The S3 server, then Ray: its workers inherit the endpoint and credentials."""
    return s3_server


@pytest.fixture(scope="module")
def client(s3_ray):
    s3 = boto3.client("s3", endpoint_url=s3_ray.endpoint)
    s3.create_bucket(Bucket=BUCKET)
    return s3


def key_of(uri: str) -> str:
    return uri.removeprefix(f"s3://{BUCKET}/")


def get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def upload_dir(client, local: Path, uri: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(
            Bucket=BUCKET, Key=f"{key_of(uri)}/{path.relative_to(local).as_posix()}", Body=path.read_bytes()
        )


@pytest.fixture(scope="module")
def inputs(client, tmp_path_factory):
    """The same inputs on local disk and in the bucket: checkpoint, fit folder and Parquet corpus."""
    root = tmp_path_factory.mktemp("s3_inputs")
    test, _ = load_fashion_mnist("test")
    (root / "fit").mkdir()
    for i in range(FIT_ROWS):
        Image.fromarray(test[i]).save(root / "fit" / f"test-{i:05d}.png")
    demo = root / "demo"
    demo_manifest = build_demo_corpus(demo, rows_per_source=DEMO_ROWS, id_rows=DEMO_ROWS)
    # the demo's images, byte for byte and in the order a folder listing gives, as rows of two files
    names = sorted(p.relative_to(demo).as_posix() for p in demo.rglob("*.png"))
    (root / "parquet").mkdir()
    parts = (names[:6], names[6:])
    for k, part in enumerate(parts):
        table = pa.table(
            {"name": part, "image": pa.array([(demo / name).read_bytes() for name in part], pa.binary())}
        )
        pq.write_table(table, root / "parquet" / f"part-{k}.parquet", row_group_size=4)
    upload_dir(client, root / "fit", S3["fit"])
    upload_dir(client, root / "parquet", S3["parquet"])
    for name in ("model.pt", "model.json"):
        client.put_object(
            Bucket=BUCKET, Key=f"{key_of(S3['checkpoint'])}/{name}", Body=(MODEL / name).read_bytes()
        )
    return {
        "root": root,
        "fit": root / "fit",
        "parquet": root / "parquet",
        "demo": demo,
        "demo_manifest": demo_manifest,
        "names": names,
        # Parquet row id (without the location) -> the demo file it holds
        "row_names": {
            f"part-{k}.parquet#{i}": name for k, part in enumerate(parts) for i, name in enumerate(part)
        },
    }


def run(*, checkpoint, corpus, out, detector, fit=S3["fit"], extra=()) -> dict:
    overrides = [
        f"model.checkpoint={checkpoint}",
        f"corpus.uri={corpus}",
        f"fit.uri={fit}",
        "fit.start=0",
        f"fit.size={FIT_ROWS}",
        f"output.uri={out}",
        f"output.detector_uri={detector}",
        "run.id=night",
        "extract.method=loop",
        "extract.batch_size=16",
        "extract.shard_size=16",
        "extract.num_workers=1",
        "train.if_missing=false",
        "run.report_top_k=4",
        *extra,
    ]
    return ray_job.run_score_corpus(load_config(ScoreCorpusConfig, [], overrides))


def read(uri: str) -> pa.Table:
    """A folder of Parquet files read with plain pyarrow (its own S3 filesystem), in file order."""
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


def relative(ids: list[str], root: str) -> list[str]:
    root = root.rstrip("/") + "/"
    assert all(i.startswith(root) for i in ids), (ids[:3], root)
    return [i[len(root) :] for i in ids]


def assert_same_features(a: pa.Table, b: pa.Table) -> None:
    """log p and every layer's squared gradient norm, row for row, to float32 rounding (a few ulps:
    the CPU's convolution kernels may sum in another order on another machine or buffer)."""
    assert a.column("row_index").equals(b.column("row_index"))
    columns = [c for c in a.column_names if c == "log_prob" or c.startswith(SQNORM_PREFIX)]
    assert columns == [c for c in b.column_names if c == "log_prob" or c.startswith(SQNORM_PREFIX)]
    assert len(columns) > 40
    for column in columns:
        np.testing.assert_allclose(
            a.column(column).to_numpy(), b.column(column).to_numpy(), rtol=1e-5, err_msg=column
        )


def assert_same_scores(a: pa.Table, b: pa.Table) -> None:
    """Every column but the ids (ranks, scores, p- and q-values, flags, drivers, top layers, each
    test's score and p-value) in rank order: floats to the rounding the features carry, the rest
    exactly."""
    assert a.column_names == b.column_names and a.num_rows == b.num_rows > 0
    for column in a.column_names:
        if column != "id":
            x, y = a.column(column), b.column(column)
            if pa.types.is_floating(x.type):
                np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=1e-4, err_msg=column)
            else:
                assert x.to_pylist() == y.to_pylist(), column


def in_process_features(uri: Path) -> pa.Table:
    """Features of a local folder computed here, without Ray: the reference for what the workers read."""
    model, _ = load_checkpoint(MODEL)
    rows = load_all(open_source(str(uri)), ImageConverter(model.image_mode, model.input_shape[1:]))
    feats = compute_features(model, rows, group_size=1, batch_size=16, seed=0, method="loop")
    return feature_table(
        feats.ids, feats.row_index, feats.n_rows, feats.log_prob, feats.sqnorms, feats.layer_names, {}
    )


@pytest.fixture(scope="module")
def s3_night(client, inputs):
    """Everything on s3: model, fit set, a Parquet corpus, outputs, and the detector kept elsewhere."""
    return run(
        checkpoint=S3["checkpoint"],
        corpus=S3["parquet"],
        out=S3["out"],
        detector=S3["detector"],
        extra=["run.incremental=true"],
    )


def test_job_on_s3_equals_the_job_on_local_disk(s3_night, client, inputs):
    summary = s3_night
    assert (summary["inputs"], summary["scored"], summary["rejected"]) == (14, 12, 2)
    assert summary["output"] == f"{S3['out']}/runs/night" and summary["corpus"] == S3["parquet"]
    out_keys = keys(client, "screening/")
    run_files = ("_SUCCESS", "run.yaml", "summary.json", "report.html")
    for key in (
        "runs.json",
        "manifest/run_id=night/part-0.parquet",
        *(f"runs/night/{f}" for f in run_files),
    ):
        assert f"screening/{key}" in out_keys, key
    assert keys(client, "detectors/") == ["detectors/pixelcnn.json"]
    assert "screening/detector.json" not in out_keys
    assert [r["run_id"] for r in json.loads(get(client, "screening/runs.json"))["runs"]] == ["night"]
    detector = json.loads(get(client, "detectors/pixelcnn.json"))
    assert detector["fit"]["n_rows"] == FIT_ROWS and detector["fit"]["source"]["uri"] == S3["fit"]
    # the top rows' thumbnails, decoded from the bucket's Parquet rows
    assert get(client, "screening/runs/night/report.html").count(b"data:image/png;base64") >= 4

    scores = read(f"{S3['out']}/runs/night/scores")
    assert scores.num_rows == 12 and scores.column("rank").to_pylist() == list(range(1, 13))
    errors = read(f"{S3['out']}/runs/night/errors").to_pylist()
    assert [inputs["row_names"][i] for i in relative([e["id"] for e in errors], S3["parquet"])] == [
        "corrupt/empty.png",
        "corrupt/truncated.png",
    ]
    manifest = read(f"{S3['out']}/manifest/run_id=night").to_pylist()
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix="parquet/")["Contents"]
    assert {r["uri"]: r["size"] for r in manifest} == {
        f"s3://{BUCKET}/{o['Key']}": o["Size"] for o in objects
    }
    assert all(r["mtime_ns"] > 0 for r in manifest)

    # the fit set the workers read from the bucket is the local folder, feature for feature
    fit_features = read(f"{S3['out']}/fit/features")
    reference = in_process_features(inputs["fit"])
    assert relative(fit_features.column("id").to_pylist(), S3["fit"]) == relative(
        reference.column("id").to_pylist(), str(inputs["fit"])
    )
    assert_same_features(fit_features, reference)

    # the same job on local disk, with the same detector (a local copy: the fit/calibration split is a
    # hash of the row ids, which hold the location, so a detector fitted from the local copy of the fit
    # set would be calibrated on other rows): every feature and every score column
    copy = inputs["root"] / "detector.json"
    copy.write_bytes(get(client, "detectors/pixelcnn.json"))
    local_out = inputs["root"] / "out"
    local = run(
        checkpoint=MODEL,
        corpus=inputs["parquet"],
        out=local_out,
        detector=copy,  # reused, so the fit set is not read; its fit settings (fit.uri too) must match
        extra=["run.incremental=true"],
    )
    for key in ("inputs", "scored", "rejected", "skipped", "flagged", "drift", "incomplete_sets"):
        assert local[key] == summary[key], key
    s3_features = read(f"{S3['out']}/runs/night/features")
    local_features = read(str(local_out / "runs" / "night" / "features"))
    assert relative(s3_features.column("id").to_pylist(), S3["parquet"]) == relative(
        local_features.column("id").to_pylist(), str(inputs["parquet"])
    )
    assert_same_features(s3_features, local_features)
    local_scores = read(str(local_out / "runs" / "night" / "scores"))
    assert relative(scores.column("id").to_pylist(), S3["parquet"]) == relative(
        local_scores.column("id").to_pylist(), str(inputs["parquet"])
    )
    assert_same_scores(scores, local_scores)


def test_demo_corpus_on_s3(s3_night, client, inputs):
    """corpus.uri=demo with an s3 output: the job writes the demo folder into the bucket and scores it
    through the folder reader; its scores are the Parquet night's (the same images, the same detector)."""
    summary = run(
        checkpoint=S3["checkpoint"],
        corpus="demo",
        out=S3["demo_out"],
        detector=S3["detector"],
        extra=[f"corpus.demo_rows_per_source={DEMO_ROWS}", f"corpus.demo_id_rows={DEMO_ROWS}"],
    )
    corpus = f"{S3['demo_out']}/demo_corpus"
    assert (summary["inputs"], summary["scored"], summary["rejected"]) == (14, 12, 2)
    assert summary["corpus"] == corpus and summary["skipped_reasons"] == {"not an image file extension": 1}
    assert set(summary["demo"]["sources"]) == set(DEMO_OOD_SOURCES)
    assert sum(summary["demo"]["flagged"].values()) == summary["flagged"]
    report = get(client, "demo/runs/night/report.html")  # the errors, read back from the bucket
    assert f"{corpus}/corrupt/empty.png".encode() in report

    # the demo folder in the bucket is the one built on local disk, file for file, byte for byte
    local = inputs["demo"]
    local_files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert [k.removeprefix("demo/demo_corpus/") for k in keys(client, "demo/demo_corpus/")] == local_files
    for name in local_files:
        if name != "manifest.json":
            assert get(client, f"demo/demo_corpus/{name}") == (local / name).read_bytes(), name
    assert json.loads(get(client, "demo/demo_corpus/manifest.json")) == inputs["demo_manifest"]

    scores = read(f"{S3['demo_out']}/runs/night/scores")
    parquet_scores = read(f"{S3['out']}/runs/night/scores")
    assert relative(scores.column("id").to_pylist(), corpus) == [
        inputs["row_names"][i] for i in relative(parquet_scores.column("id").to_pylist(), S3["parquet"])
    ]
    assert {name.split("/")[0] for name in relative(scores.column("id").to_pylist(), corpus)} == {
        DEMO_ID_SOURCE,
        *DEMO_OOD_SOURCES,
    }
    assert_same_scores(scores, parquet_scores)

    # building again with the same parameters writes nothing; with others it replaces the folders, so
    # no object of the larger build lingers in the bucket
    before = {
        o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="demo/")["Contents"]
    }
    assert build_demo_corpus(corpus, rows_per_source=DEMO_ROWS, id_rows=DEMO_ROWS) == inputs["demo_manifest"]
    after = {
        o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="demo/")["Contents"]
    }
    assert after == before
    build_demo_corpus(corpus, rows_per_source=1, id_rows=1)
    assert len(keys(client, "demo/demo_corpus/digits/")) == 1
    assert storage.read_json(f"{corpus}/manifest.json")["params"]["rows_per_source"] == 1
