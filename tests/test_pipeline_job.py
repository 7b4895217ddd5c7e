"""The whole score-corpus job on a local Ray, checked against the in-process reference."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from sklearn.metrics import roc_auc_score

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.models.checkpoint import load_checkpoint
from gradood.pipeline import fit, ray_job
from gradood.pipeline.tables import SQNORM_PREFIX, sqnorm_matrix, table_metadata
from gradood.stats import DetectorSuite, log_features
from tests.pipeline_fixtures import reference_scores, tiny_glow_checkpoint, write_png_folder

pytestmark = pytest.mark.slow

FIT_URI = "torchvision://FashionMNIST?split=test"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    return {
        "checkpoint": tiny_glow_checkpoint(root / "ckpt"),
        "corpus": write_png_folder(root / "corpus"),
        "root": root,
    }


def job_config(ws, out: str, *extra: str) -> ScoreCorpusConfig:
    return load_config(ScoreCorpusConfig, [], job_overrides(ws, out, *extra))


def job_overrides(ws, out: str, *extra: str) -> list[str]:
    """The small job's command-line keys (what ``python jobs/score_corpus.py`` takes)."""
    return [
        f"model.checkpoint={ws['checkpoint']}",
        f"corpus.uri={ws['corpus']}",
        f"output.uri={out}",
        f"fit.uri={FIT_URI}",
        "fit.start=0",
        "fit.size=40",
        "extract.batch_size=8",
        "extract.shard_size=8",
        "extract.num_workers=2",
        "extract.method=engine",
        "train.if_missing=false",
        "run.id=night",
        *extra,
    ]


def test_job_matches_in_process_reference(local_ray, workspace, tmp_path, capsys):
    out = tmp_path / "out"
    summary = ray_job.run_score_corpus(job_config(workspace, str(out)))

    # counts reconcile, the corrupt file is an error row, not a failure
    assert summary["inputs"] == 19 and summary["scored"] == 18 and summary["rejected"] == 1
    errors = storage.read_parquet(str(out / "runs" / "night" / "errors")).to_pylist()
    assert [e["id"].endswith("zz-corrupt.png") for e in errors] == [True] and errors[0]["error"]

    # features: readable with plain pyarrow, metadata names the layers and the model
    features = pq.read_table(out / "runs" / "night" / "features")
    part = pq.read_table(sorted((out / "runs" / "night" / "features").glob("*.parquet"))[0])
    meta = table_metadata(part)
    model, ckpt_meta = load_checkpoint(workspace["checkpoint"])
    assert meta["model_fingerprint"] == ckpt_meta["fingerprint"] and meta["group_size"] == 1
    assert [c[len(SQNORM_PREFIX) :] for c in features.column_names if c.startswith(SQNORM_PREFIX)] == meta[
        "layers"
    ]
    assert features.num_rows == 18

    detector = json.loads((out / "detector.json").read_text())
    assert detector["model_fingerprint"] == ckpt_meta["fingerprint"] and detector["fit"]["n_rows"] == 40
    n_cal = detector["fit"]["n_calibration_rows"]
    assert detector["fit"]["n_fit_rows"] + sum(n_cal) == 40 and min(n_cal) >= 1
    assert (out / "runs" / "night" / "run.yaml").read_text().startswith("seed: 0")

    # scores equal the reference computed in-process with the per-sample loop
    scores = storage.read_parquet(str(out / "runs" / "night" / "scores")).to_pylist()
    ref = reference_scores(model, FIT_URI, 40, str(workspace["corpus"]), seed=0)
    assert sorted(r["id"] for r in scores) == sorted(ref)
    for r in scores:
        for key in ("ood_score", "score:typicality", "score:paper", "score:complexity", "log_prob"):
            assert r[key] == pytest.approx(ref[r["id"]][key], rel=1e-4, abs=1e-3), key
        assert r["p_value"] == ref[r["id"]]["p_value"]
        assert len(r["top_layers"]) == 3 and len(r["top_z"]) == 3
    assert summary["flagged"] == sum(r["flagged"] for r in scores)
    assert summary["flagged_by_driver"] == Counter(r["driver"] for r in scores if r["flagged"])
    assert [r["rank"] for r in scores] == list(range(1, 19))
    assert all(a["ood_score"] >= b["ood_score"] for a, b in zip(scores, scores[1:], strict=False))
    assert summary["top10"] == [r["id"] for r in scores[:10]]
    # the prevalence floor: one calibration row of part 2 more or less moves it, and the run states it
    floor = summary["prevalence_floor"]
    assert floor["n_calibration"] == n_cal[1] and floor["min_p_value"] == 1 / (n_cal[1] + 1)
    # (capped at 1: with this tiny part 2 no night can be flagged unless every row is OOD)
    assert floor["share"] == pytest.approx(min(1.0, 1 / ((n_cal[1] + 1) * 0.05))) and floor["method"] == "bh"
    assert json.loads((out / "runs" / "night" / "summary.json").read_text())["prevalence_floor"] == floor
    report = (out / "runs" / "night" / "report.html").read_text()
    assert f"{100 * floor['share']:.2f} % (smallest p-value" in report
    printed = capsys.readouterr().out
    assert f"flags can fire only on a night with at least {100 * floor['share']:.2f} % OOD rows" in printed

    # a rerun reuses the detector; another shard layout gives the same scores
    again = ray_job.run_score_corpus(
        job_config(workspace, str(out), "extract.shard_size=5", "extract.batch_size=3")
    )
    rescored = {r["id"]: r for r in storage.read_parquet(str(out / "runs" / "night" / "scores")).to_pylist()}
    assert again["scored"] == 18
    for r in scores:
        assert rescored[r["id"]]["ood_score"] == pytest.approx(r["ood_score"], rel=1e-5)
        assert rescored[r["id"]]["p_value"] == r["p_value"]

    # a fresh fit with another shard layout splits the held-out rows the same way
    refit = ray_job.run_score_corpus(
        job_config(workspace, str(out), "fit.refit=true", "extract.shard_size=7", "extract.batch_size=5")
    )
    assert refit["scored"] == 18
    detector_again = json.loads((out / "detector.json").read_text())
    assert detector_again["fit"]["n_calibration_rows"] == detector["fit"]["n_calibration_rows"]
    assert detector_again["fit"]["n_fit_rows"] == detector["fit"]["n_fit_rows"]


def test_group_features_and_detector_mismatch(local_ray, workspace, tmp_path):
    out = tmp_path / "out"
    summary = ray_job.run_score_corpus(
        job_config(workspace, str(out), "extract.group_size=3", "extract.batch_size=6")
    )
    scores = storage.read_parquet(str(out / "runs" / "night" / "scores"))
    # plain Arrow lists, not Ray's pickled-object extension: readable without Ray (and without pickle)
    assert scores.schema.field("member_ids").type == pa.list_(pa.string())
    assert scores.schema.field("top_layers").type == pa.list_(pa.string())
    members = scores.column("member_ids").to_pylist()
    assert sum(len(m) for m in members) == summary["scored"] == 18
    assert max(len(m) for m in members) == 3

    # an old-format detector file is refused with the reason
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**json.loads((out / "detector.json").read_text()), "format_version": 1}))
    with pytest.raises(ValueError, match="format_version 1"):
        ray_job.run_score_corpus(
            job_config(workspace, str(out), "extract.group_size=3", f"output.detector_uri={old}")
        )

    # the detector of a group_size=3 run is refused for group_size=1, and for another model
    with pytest.raises(ValueError, match="group_size"):
        ray_job.run_score_corpus(job_config(workspace, str(out)))
    other = tiny_glow_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        ray_job.run_score_corpus(
            job_config(
                workspace,
                str(out),
                f"model.checkpoint={other}",
                "extract.group_size=3",
                "extract.batch_size=6",
            )
        )


def test_reducer_death_falls_back_to_parquet(local_ray, workspace, tmp_path, monkeypatch, capsys):
    """Killing the reducer mid-fit must give the same detector, recomputed from the Parquet shards."""
    original_start, original_extract = fit.start_reducer, fit.run_extraction
    handles = []

    def start_and_remember(num_features):
        handles.append(original_start(num_features))
        return handles[-1]

    def extract_and_kill(*args, on_shard=None, **kwargs):
        def kill_after_first(summary):
            on_shard(summary)
            ray.kill(handles[-1])

        return original_extract(*args, on_shard=kill_after_first if on_shard else None, **kwargs)

    cfg = job_config(workspace, str(tmp_path / "healthy"))
    healthy = json.loads(
        json.dumps(fit.fit_detector(cfg, str(tmp_path / "healthy"), *_model_args(workspace)))
    )
    monkeypatch.setattr(fit, "start_reducer", start_and_remember)
    monkeypatch.setattr(fit, "run_extraction", extract_and_kill)
    recovered = fit.fit_detector(cfg, str(tmp_path / "killed"), *_model_args(workspace))
    assert handles, "the reducer was not started through start_reducer"
    assert "recomputing the fit from" in capsys.readouterr().out
    # each detector equals a one-pass numpy fit over its own run's fit rows: the healthy one came from
    # the reducer, the other from the fallback (the two runs' float32 features may differ in the last
    # bits, as the engine times its kernels per run)
    for run, detector in (("healthy", healthy), ("killed", recovered)):
        table = storage.read_parquet(str(tmp_path / run / "fit" / "features"))
        fit_rows = np.asarray(table.column("split").to_numpy()) == 0
        logf = log_features(sqnorm_matrix(table, detector["layers"]), cfg.fit.min_sqnorm)[fit_rows]
        suite = DetectorSuite.from_dict(detector["suite"])
        paper = suite.tests_["paper"]
        np.testing.assert_allclose(paper.mean_, logf.mean(axis=0)[paper.kept_], rtol=1e-9)
        np.testing.assert_allclose(paper.std_, logf.std(axis=0)[paper.kept_], rtol=1e-9)
        nll = -table.column("log_prob").to_numpy()[fit_rows]
        assert suite.tests_["typicality"].entropy_ == pytest.approx(nll.mean(), rel=1e-12)
    np.testing.assert_allclose(
        DetectorSuite.from_dict(healthy["suite"]).tests_["paper"].mean_,
        DetectorSuite.from_dict(recovered["suite"]).tests_["paper"].mean_,
        rtol=1e-6,
    )


def _model_args(ws):
    from gradood.features import feature_layer_names
    from gradood.models.checkpoint import WEIGHTS_FILE

    model, meta = load_checkpoint(ws["checkpoint"])
    meta = {**json.loads((ws["checkpoint"] / "model.json").read_text()), "fingerprint": meta["fingerprint"]}
    return (ws["checkpoint"] / WEIGHTS_FILE).read_bytes(), meta, feature_layer_names(model)


def test_demo_corpus_run_reports_auroc_per_source(local_ray, workspace, tmp_path):
    summary = ray_job.run_score_corpus(
        job_config(
            workspace,
            str(tmp_path / "out"),
            "corpus.uri=demo",
            "corpus.demo_rows_per_source=10",
            "corpus.demo_id_rows=10",
            "extract.group_size=5",
            "extract.batch_size=10",
        )
    )
    assert summary["inputs"] == 42 and summary["rejected"] == 2  # 4 sources x 10 + 2 corrupt files
    demo = summary["demo"]
    assert set(demo["sources"]) == {"digits", "fashion_mnist_inverted", "uniform_noise"}
    # sets of 5 consecutive rows: 2 corrupt files shift the folders, so 3 boundary sets mix two sources
    assert demo["mixed_sets_left_out"] == 3
    # the report's numbers, recomputed from the scores file: a set's label is its members' folder
    scores = storage.read_parquet(storage.join(summary["output"], "scores")).to_pylist()
    folders = [{PurePosixPath(m).parent.name for m in r["member_ids"]} for r in scores]
    label = np.array([f.pop() if len(f) == 1 else "mixed" for f in folders])
    assert (label == "mixed").sum() == 3
    for name, row in demo["sources"].items():
        pair = np.isin(label, ["fashion_mnist", name])
        is_ood = label[pair] == name
        for score in ("ood_score", "score:typicality"):
            s = np.array([r[score] for r in scores])[pair]
            assert row[score]["n_id"] == 1 and row[score]["n_ood"] == is_ood.sum() >= 1
            assert row[score]["auroc"] == pytest.approx(roc_auc_score(is_ood, s), abs=1e-12), (name, score)
        assert demo["flagged"][name] == sum(
            r["flagged"] for r, lab in zip(scores, label, strict=True) if lab == name
        )
    scores = storage.read_parquet(str(tmp_path / "out" / "runs" / "night" / "scores"))
    assert sum(demo["flagged"].values()) == summary["flagged"] == sum(scores.column("flagged").to_pylist())
    # per source: its share of the night's sets, its power, and the false discoveries
    assert demo["false_discoveries"] == demo["flagged"]["fashion_mnist"]
    for name in demo["sources"]:
        assert demo["power"][name] == demo["flagged"][name] / demo["rows"][name]
        assert demo["ood_share"][name] == demo["rows"][name] / (
            summary["feature_rows"] - demo["mixed_sets_left_out"]
        )
