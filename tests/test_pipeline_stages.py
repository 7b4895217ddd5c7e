"""Pipeline stages in-process (no Ray): grouping, error rows, Parquet contract, reducer, scorer."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gradood.data.sources import LoadedRows, open_source
from gradood.features import extract_features
from gradood.models.checkpoint import WEIGHTS_FILE, load_checkpoint, read_checkpoint_meta
from gradood.pipeline import storage
from gradood.pipeline.reducer import FitReducer, moments_from_parquet
from gradood.pipeline.stages import (
    ExtractSettings,
    Scorer,
    ShardFeatures,
    ShardFeatureWriter,
    compute_features,
    drop_non_finite,
)
from gradood.pipeline.tables import sqnorm_matrix, table_metadata
from gradood.seeding import draw_noise
from gradood.stats.detector import LogGaussianDetector, TypicalityTest, log_features
from gradood.stats.moments import Moments
from tests.pipeline_fixtures import tiny_glow_checkpoint, write_png_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_glow_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_checkpoint(model_dir)[0]


def rows_with_gap(n: int = 11, missing: tuple[int, ...] = (4,)) -> LoadedRows:
    rng = np.random.default_rng(0)
    keep = [i for i in range(n) if i not in missing]
    return LoadedRows(
        ids=[f"row{i}" for i in keep],
        indices=np.array(keep, np.int64),
        images=rng.integers(0, 256, (len(keep), 1, 28, 28), dtype=np.uint8),
        errors=[(f"row{i}", i, "decode failed") for i in missing],
    )


@pytest.mark.parametrize("group_size,batch_size", [(1, 4), (3, 6), (3, 3)])
def test_compute_features_groups_by_global_index(model, group_size, batch_size):
    rows = rows_with_gap()
    feats = compute_features(
        model, rows, group_size=group_size, batch_size=batch_size, seed=7, method="engine"
    )
    expected_groups = sorted({int(i) // group_size for i in rows.indices})
    assert len(feats.ids) == len(expected_groups)
    for g, members, lp, sq in zip(
        expected_groups, feats.member_ids, feats.log_prob, feats.sqnorms, strict=True
    ):
        idx = [k for k, i in enumerate(rows.indices) if i // group_size == g]
        assert members == [rows.ids[k] for k in idx]
        x = torch.from_numpy(rows.images[idx]).float()
        ref = extract_features(
            model,
            x,
            draw_noise(model.noise_spec(), members, 7),
            torch.zeros(len(idx), dtype=torch.long),
            method="loop",
        )
        assert lp == pytest.approx(ref.log_prob.mean(), rel=1e-5)
        np.testing.assert_allclose(sq, ref.sqnorms[0], rtol=1e-4, atol=1e-12)
    assert feats.n_rows.sum() == len(rows.ids)


def test_compute_features_rejects_bad_sizes(model):
    with pytest.raises(ValueError, match="group_size"):
        compute_features(model, rows_with_gap(), group_size=4, batch_size=2, seed=0, method="engine")


def test_non_finite_groups_become_error_rows():
    feats = ShardFeatures(
        ids=["a", "b"],
        row_index=np.array([0, 2]),
        n_rows=np.array([2, 1], np.int32),
        member_ids=[["a", "a2"], ["b"]],
        member_index=[np.array([0, 1]), np.array([2])],
        log_prob=np.array([np.nan, -1.0]),
        sqnorms=np.ones((2, 3)),
        layer_names=["p", "q", "r"],
    )
    kept, errors = drop_non_finite(feats, [("z", 9, "decode failed")])
    assert kept.ids == ["b"] and kept.sqnorms.shape == (1, 3)
    assert [e[:2] for e in errors] == [("z", 9), ("a", 0), ("a2", 1)]
    assert "non-finite" in errors[-1][2]


def test_shard_writer_contract(model_dir, tmp_path):
    corpus = write_png_folder(tmp_path / "corpus", n_id=5, n_ood=2)
    source = open_source(str(corpus))
    out = tmp_path / "out"
    settings = ExtractSettings(
        features_uri=str(out / "features"),
        errors_uri=str(out / "errors"),
        group_size=1,
        batch_size=4,
        seed=0,
        method="engine",
        min_sqnorm=1e-30,
        image={"resize": "resize", "interpolation": "bilinear"},
    )
    meta = read_checkpoint_meta(model_dir)
    writer = ShardFeatureWriter((model_dir / WEIGHTS_FILE).read_bytes(), meta, source, settings)
    shards = source.shards(3)
    batch = {"shard": np.array(shards, dtype=object)}
    summary = writer(batch)
    assert list(summary["shard"]) == [s.index for s in shards]
    assert sum(summary["rows_scored"]) + sum(summary["rows_rejected"]) == source.num_rows() == 8

    table = pq.read_table(out / "features")
    file_meta = table_metadata(pq.read_schema(sorted((out / "features").glob("*.parquet"))[0]))
    assert file_meta["model_fingerprint"] == meta["fingerprint"] and file_meta["seed"] == 0
    assert table.num_rows == 7 and table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    assert pq.read_table(out / "errors").column("id").to_pylist()[0].endswith("zz-corrupt.png")

    # the summaries' moments equal a direct fit on the written features; the reducer is idempotent
    layers = file_meta["layers"]
    logf = log_features(sqnorm_matrix(table, layers), 1e-30)
    reducer = FitReducer(len(layers))
    for k in range(len(shards)):
        reducer.add(int(summary["shard"][k]), summary["logf_moments"][k], summary["nll_moments"][k])
    reducer.add(int(summary["shard"][0]), summary["logf_moments"][0], summary["nll_moments"][0])
    merged = Moments.from_dict(reducer.result()["logf"])
    assert merged.count == 7
    np.testing.assert_allclose(merged.mean, logf.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(merged.variance(), logf.var(axis=0), rtol=1e-9, atol=1e-12)
    logf_pq, nll_pq, shard_ids = moments_from_parquet(str(out / "features"), layers, 1e-30)
    np.testing.assert_allclose(logf_pq.mean, merged.mean, rtol=1e-9)
    assert shard_ids == sorted(s.index for s in shards)

    # scorer: detector fitted on these rows, scores = detector.ood_score; top layers have largest |z|
    det = LogGaussianDetector().fit(sqnorm_matrix(table, layers), layers)
    typ = TypicalityTest().fit(table.column("log_prob").to_numpy())
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    scored = Scorer({"log_gaussian": det.to_dict(), "typicality": typ.to_dict()})(cols)
    np.testing.assert_allclose(scored["ood_score"], det.ood_score(sqnorm_matrix(table, layers)))
    np.testing.assert_allclose(scored["typicality"], typ.ood_score(cols["log_prob"]))
    z = det.zscores(sqnorm_matrix(table, layers))
    assert max(abs(v) for v in scored["top_z"][0]) == pytest.approx(np.abs(z[0]).max())


def test_storage_same_path_for_local_and_file_uris(tmp_path):
    storage.write_json(f"file://{tmp_path}/a/b.json", {"x": 1})
    assert storage.read_json(str(tmp_path / "a" / "b.json")) == {"x": 1}
    assert storage.list_files(f"file://{tmp_path}", ".json") == [f"file://{tmp_path}/a/b.json"]
    assert storage.exists(str(tmp_path / "a")) and not storage.exists(str(tmp_path / "nope"))
