"""Pipeline stages in-process (no Ray): grouping, error rows, Parquet contract, reducer, scorer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.data.sources import LoadedRows, open_source
from gradood.features import extract_features
from gradood.models.checkpoint import WEIGHTS_FILE, load_checkpoint, read_checkpoint_meta
from gradood.pipeline.reducer import FitReducer, moments_from_parquet
from gradood.pipeline.score import fit_night
from gradood.pipeline.scoring import Scorer
from gradood.pipeline.stages import (
    ExtractSettings,
    ShardFeatures,
    ShardFeatureWriter,
    completed_shard,
    compute_features,
    decode_shards,
    drop_non_finite,
)
from gradood.pipeline.tables import INCOMPLETE_SET_SPLIT, feature_matrix, suite_feature_names, table_metadata
from gradood.seeding import draw_noise, row_uniforms
from gradood.stats import DetectorSuite, Moments, split_of
from gradood.stats.conformal import EqualTailedCalibrator
from gradood.stats.layout import png_bits
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
        row_index=np.array(keep, np.int64),
        images=rng.integers(0, 256, (len(keep), 1, 28, 28), dtype=np.uint8),
        errors=[(f"row{i}", i, "decode failed") for i in missing],
    )


@pytest.mark.parametrize("group_size,batch_size", [(1, 4), (3, 6), (3, 3)])
def test_compute_features_groups_by_global_index(model, group_size, batch_size):
    rows = rows_with_gap()
    feats = compute_features(
        model, rows, group_size=group_size, batch_size=batch_size, seed=7, method="engine"
    )
    expected_groups = sorted({int(i) // group_size for i in rows.row_index})
    assert len(feats.ids) == len(expected_groups)
    for g, members, lp, bits, sq in zip(
        expected_groups, feats.member_ids, feats.log_prob, feats.complexity_bits, feats.sqnorms, strict=True
    ):
        idx = [k for k, i in enumerate(rows.row_index) if i // group_size == g]
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
        assert bits == pytest.approx(np.mean(png_bits(rows.images[idx])), rel=1e-12)  # per-image scale
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
        complexity_bits=np.array([800.0, 900.0]),
        sqnorms=np.ones((2, 3)),
        layer_names=["p", "q", "r"],
    )
    kept, errors = drop_non_finite(feats, [("z", 9, "decode failed")])
    assert kept.ids == ["b"] and kept.sqnorms.shape == (1, 3) and kept.complexity_bits.tolist() == [900.0]
    assert [e[:2] for e in errors] == [("z", 9), ("a", 0), ("a2", 1)]
    assert "non-finite" in errors[-1][2]


def png_corpus_writer(model_dir: Path, out: Path, group_size: int, batch_size: int):
    """A folder of 25 PNGs (one corrupt), its source, and a shard writer over it writing under ``out``."""
    source = open_source(str(write_png_folder(out.parent / "corpus", n_id=20, n_ood=4)))
    settings = ExtractSettings(
        features_uri=str(out / "features"),
        errors_uri=str(out / "errors"),
        group_size=group_size,
        batch_size=batch_size,
        seed=0,
        method="engine",
        min_sqnorm=1e-30,
        image={"resize": "resize", "interpolation": "bilinear"},
        calibration_fraction=0.5,
    )
    meta = read_checkpoint_meta(model_dir)
    writer = ShardFeatureWriter((model_dir / WEIGHTS_FILE).read_bytes(), meta, source, settings)
    return source, settings, writer


def test_shard_writer_contract(model_dir, tmp_path):
    out = tmp_path / "out"
    source, _, writer = png_corpus_writer(model_dir, out, group_size=1, batch_size=4)
    meta = read_checkpoint_meta(model_dir)
    shards = source.shards(7)
    decoded = decode_shards({"shard": np.array(shards, dtype=object)}, source, writer.converter)
    assert [rows.ids + [e[0] for e in rows.errors] for rows in decoded["rows"]] == [
        [row.id for row in source.read_shard(shard)] for shard in shards
    ]  # every row of every shard decoded or an error, in its shard
    summary = writer(decoded)
    assert list(summary["shard"]) == [s.number for s in shards]
    assert sum(summary["rows_scored"]) + sum(summary["rows_rejected"]) == source.num_rows() == 25

    table = pq.read_table(out / "features")
    file_meta = table_metadata(pq.read_schema(sorted((out / "features").glob("*.parquet"))[0]))
    assert file_meta["model_fingerprint"] == meta["fingerprint"] and file_meta["seed"] == 0
    assert table.num_rows == 24 and table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    assert pq.read_table(out / "errors").column("id").to_pylist()[0].endswith("zz-corrupt.png")
    # complexity_bits: 8 x the bytes of each decoded image saved as PNG at zlib level 9
    png_bytes = {}
    for rows in decoded["rows"]:
        for row_id, image in zip(rows.ids, rows.images, strict=True):
            buffer = io.BytesIO()
            Image.fromarray(image[0]).save(buffer, format="PNG", compress_level=9)
            png_bytes[row_id] = len(buffer.getvalue())
    bits = dict(zip(table.column("id").to_pylist(), table.column("complexity_bits").to_pylist(), strict=True))
    assert bits == {row_id: 8.0 * n for row_id, n in png_bytes.items()}

    # rows are split by a hash of (seed, id); the summaries' moments are those of the fit rows only,
    # equal to a direct computation on the written features; the reducer is idempotent
    layers = file_meta["layers"]
    split = table.column("split").to_numpy()
    ids = table.column("id").to_pylist()
    np.testing.assert_array_equal(split, split_of(row_uniforms(0, ids, "calibration-split"), 0.5))
    assert set(split.tolist()) == {0, 1, 2}
    x = feature_matrix(table, layers, 1e-30)
    reducer = FitReducer(x.shape[1])
    for k in range(len(shards)):
        reducer.add(int(summary["shard"][k]), summary["moments"][k])
    reducer.add(int(summary["shard"][0]), summary["moments"][0])
    merged = Moments.from_dict(reducer.result()["moments"])
    assert merged.count == int((split == 0).sum())
    np.testing.assert_allclose(merged.mean, x[split == 0].mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(merged.covariance(), np.cov(x[split == 0], rowvar=False, ddof=0), rtol=1e-8)
    from_files = moments_from_parquet(str(out / "features"), layers, 1e-30)
    np.testing.assert_allclose(from_files.comoment, merged.comoment, rtol=1e-9)

    # scorer: the suite's scores and p-values for every row; top layers have the largest |z|
    names = suite_feature_names(layers, table)
    assert names[-1] == "complexity_bits" and x.shape[1] == len(names)
    suite = DetectorSuite().fit_parts(merged, x[split == 1], x[split == 2], names)
    detector = {"suite": suite.to_dict(), "layers": layers, "fit": {"min_sqnorm": 1e-30}}
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    scored = Scorer(detector, "combined")(cols)
    np.testing.assert_allclose(scored["ood_score"], suite.ood_score(x))
    np.testing.assert_allclose(scored["p_value"], suite.p_value(x))
    # typicality: two-sided on -log p(x) - H_hat, equal-tailed against calibration part 1
    log_prob, bits = x[:, -2], x[:, -1]
    statistic = -log_prob + log_prob[split == 0].mean()
    calibration = statistic[split == 1]
    high = (1 + (calibration[None, :] >= statistic[:, None]).sum(axis=1)) / (len(calibration) + 1)
    low = (1 + (calibration[None, :] <= statistic[:, None]).sum(axis=1)) / (len(calibration) + 1)
    np.testing.assert_allclose(scored["p_value:typicality"], np.minimum(1, 2 * np.minimum(high, low)))
    tail = EqualTailedCalibrator(calibration).smooth_log_p(statistic)
    np.testing.assert_allclose(scored["score:typicality"], -tail)
    paper = suite.tests_["paper"]
    np.testing.assert_allclose(scored["score:paper"], paper.ood_score(x[:, :-2]))
    # complexity: -log2 p(x) minus the PNG bits, one-sided against part 1
    np.testing.assert_allclose(scored["score:complexity"], -log_prob / np.log(2) - bits)
    p_paper = (1 + (suite.calibrators_["paper"].scores[None, :] >= scored["score:paper"][:, None]).sum(1)) / (
        suite.calibrators_["paper"].n + 1
    )
    np.testing.assert_allclose(scored["p_value:paper"], p_paper)
    assert set(scored["driver"]) <= {"paper", "fullcov", "typicality"}
    z = paper.zscores(x[:, :-2])
    assert max(abs(v) for v in scored["top_z"][0]) == pytest.approx(np.abs(z[0]).max())
    single = Scorer(detector, "typicality")(cols)
    np.testing.assert_array_equal(single["ood_score"], scored["score:typicality"])
    assert set(single["driver"]) == {"typicality"}
    # an adaptive suite ranked by one test fits no night (the files are not even read) and scores the same
    adaptive = DetectorSuite(combination="adaptive").fit_parts(merged, x[split == 1], x[split == 2], names)
    adaptive_detector = {**detector, "suite": adaptive.to_dict()}
    cfg = load_config(ScoreCorpusConfig, overrides=["detect.test=typicality"])
    assert fit_night([str(out / "missing.parquet")], adaptive_detector, cfg) is None
    np.testing.assert_array_equal(Scorer(adaptive_detector, "typicality")(cols)["p_value"], single["p_value"])


def test_storage_same_path_for_local_and_file_uris(tmp_path):
    storage.write_json(f"file://{tmp_path}/a/b.json", {"x": 1})
    assert storage.read_json(str(tmp_path / "a" / "b.json")) == {"x": 1}
    assert storage.list_files(f"file://{tmp_path}", ".json") == [f"file://{tmp_path}/a/b.json"]
    assert storage.exists(str(tmp_path / "a")) and not storage.exists(str(tmp_path / "nope"))


def test_incomplete_sets_of_the_fit_set_stay_out_of_fit_and_calibration(model_dir, tmp_path):
    # 25 files, one corrupt, in sets of 3: the corrupt file's set and the last one (25 = 8 * 3 + 1) are short
    out = tmp_path / "out"
    source, settings, writer = png_corpus_writer(model_dir, out, group_size=3, batch_size=6)
    (shard,) = source.shards(25)
    summary = writer(decode_shards({"shard": np.array([shard], dtype=object)}, source, writer.converter))
    table = pq.read_table(out / "features")
    n_rows, split = table.column("n_rows").to_numpy(), table.column("split").to_numpy()
    assert table.num_rows == 9 and sorted(n_rows.tolist()).count(3) == 7
    np.testing.assert_array_equal(split == INCOMPLETE_SET_SPLIT, n_rows < 3)
    assert Moments.from_dict(summary["moments"][0]).count == int((split == 0).sum())
    expected = {"seed": 0, "group_size": 3}
    assert completed_shard(shard, settings, expected)["feature_rows"] == 9
    # a fit-set file that gave a short set a fit or calibration split (as before) is recomputed
    stale = table.set_column(
        table.column_names.index("split"), "split", pa.array(np.where(n_rows < 3, 1, split).astype(np.int8))
    )
    pq.write_table(stale, sorted((out / "features").glob("*.parquet"))[0])
    assert completed_shard(shard, settings, expected) is None
    # so is a file written before extraction recorded each input's complexity bits
    pq.write_table(table.drop_columns(["complexity_bits"]), sorted((out / "features").glob("*.parquet"))[0])
    assert completed_shard(shard, settings, expected) is None
    pq.write_table(table, sorted((out / "features").glob("*.parquet"))[0])
    assert completed_shard(shard, settings, expected)["feature_rows"] == 9
