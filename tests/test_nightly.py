"""Nightly operation end to end on a local Ray: incremental nights, resume after a killed driver,
atomic publishing, idempotent reruns, an all-rejected night, incomplete sets and the HTML report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.pipeline import ray_job
from tests.pipeline_fixtures import tiny_glow_checkpoint, write_png_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FIT = ["fit.uri=torchvision://FashionMNIST?split=test", "fit.start=0", "fit.size=40"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_glow_checkpoint(tmp_path_factory.mktemp("ckpt"))


def args(checkpoint: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.checkpoint={checkpoint}",
        f"corpus.uri={corpus}",
        f"output.uri={out}",
        *FIT,
        "extract.batch_size=8",
        "extract.shard_size=8",
        "extract.num_workers=2",
        "train.if_missing=false",
        *extra,
    ]


def run(checkpoint, corpus, out, *extra):
    return ray_job.run_score_corpus(load_config(ScoreCorpusConfig, [], args(checkpoint, corpus, out, *extra)))


def scores_by_id(summary) -> dict[str, dict]:
    return {r["id"]: r for r in storage.read_parquet(storage.join(summary["output"], "scores")).to_pylist()}


def test_incremental_nights_score_only_new_or_changed_files(local_ray, checkpoint, tmp_path):
    corpus = write_png_folder(tmp_path / "lake", n_id=10, n_ood=4, corrupt=False)
    out = tmp_path / "out"
    day1 = run(checkpoint, corpus, out, "run.id=day1", "run.incremental=true")
    assert day1["inputs"] == 14 and (out / "runs" / "day1" / "_SUCCESS").is_file()

    # day 2: three new files and one changed file (new content, so new size and mtime)
    test, _ = load_fashion_mnist("test")
    for i in range(3):
        Image.fromarray(test[7000 + i]).save(corpus / "fashion_mnist" / f"new-{i}.png")
    changed = sorted((corpus / "fashion_mnist").glob("test-*.png"))[0]
    time.sleep(0.01)
    Image.fromarray(255 - test[7100]).save(changed)
    day2 = run(checkpoint, corpus, out, "run.id=day2", "run.incremental=true")
    assert day2["inputs"] == 4
    assert set(scores_by_id(day2)) == {
        str(changed),
        *(str(corpus / "fashion_mnist" / f"new-{i}.png") for i in range(3)),
    }

    # rerunning the same night is idempotent: the same rows, once each, and one view entry per night
    again = run(checkpoint, corpus, out, "run.id=day2", "run.incremental=true")
    assert again["inputs"] == 4 and again["resumed_shards"] == 1
    assert {k: v["ood_score"] for k, v in scores_by_id(again).items()} == {
        k: v["ood_score"] for k, v in scores_by_id(day2).items()
    }
    view = json.loads((out / "runs.json").read_text())["runs"]
    assert [r["run_id"] for r in view] == ["day1", "day2"]

    # the union of the nights (the latest score of each file) equals one full run over the final lake
    full = run(checkpoint, corpus, out, "run.id=full")
    union = {**{k: v["ood_score"] for k, v in scores_by_id(day1).items()}}
    union.update({k: v["ood_score"] for k, v in scores_by_id(day2).items()})
    reference = {k: v["ood_score"] for k, v in scores_by_id(full).items()}
    assert union.keys() == reference.keys() and len(reference) == 17
    for key, value in reference.items():
        assert union[key] == pytest.approx(value, rel=1e-5), key
    manifest = pq.read_table(out / "manifest").to_pandas()
    assert sorted(manifest.groupby("run_id").size().to_dict().items()) == [
        ("day1", 14),
        ("day2", 4),
        ("full", 17),
    ]

    # a night with nothing new, its adaptive test below detect.adaptive_rows: trained on part 2 alone
    quiet = run(checkpoint, corpus, out, "run.id=day3", "run.incremental=true", "detect.adaptive_rows=2")
    assert quiet["inputs"] == 0 and quiet["flagged"] == 0
    assert quiet["adaptive_training_rows"]["night"] == 0 and quiet["adaptive_training_rows"]["part_2"] <= 4


def test_a_failed_rerun_is_unpublished_and_stale_shards_never_mix(
    local_ray, checkpoint, tmp_path, monkeypatch
):
    corpus = write_png_folder(tmp_path / "lake", n_id=12, n_ood=4)
    out = tmp_path / "out"
    first = run(checkpoint, corpus, out, "run.id=n1")
    assert first["inputs"] == 17
    marker = out / "runs" / "n1" / "_SUCCESS"
    assert marker.is_file()

    def crash(*a, **k):
        raise RuntimeError("worker node lost")

    monkeypatch.setattr(ray_job, "run_extraction", crash)
    with pytest.raises(RuntimeError, match="worker node lost"):
        run(checkpoint, corpus, out, "run.id=n1")
    # a reader no longer sees the half-rewritten night as complete
    assert not marker.exists() and json.loads((out / "runs.json").read_text())["runs"] == []
    monkeypatch.undo()

    # another shard layout: the earlier attempt's shard files are removed, not mixed in
    (out / "runs" / "n1" / "features" / "part-000099.parquet").write_bytes(b"stale")
    second = run(checkpoint, corpus, out, "run.id=n1", "extract.shard_size=5")
    assert marker.is_file() and second["resumed_shards"] == 0
    files = sorted(p.name for p in (out / "runs" / "n1" / "features").iterdir())
    assert files == [f"part-{i:06d}.parquet" for i in range(4)]  # 17 rows in shards of 5
    assert sorted(scores_by_id(second)) == sorted(scores_by_id(first))


def test_killed_driver_resumes_to_the_same_outputs(local_ray, checkpoint, tmp_path):
    corpus = write_png_folder(tmp_path / "lake", n_id=60, n_ood=20, corrupt=False)
    out = tmp_path / "out"
    night = ["run.id=night", "extract.num_workers=1", "extract.shard_size=4", "extract.batch_size=4"]
    undisturbed = run(checkpoint, corpus, tmp_path / "undisturbed", *night)

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    cmd = [sys.executable, "jobs/score_corpus.py", *args(checkpoint, corpus, out, *night), "ray.num_cpus=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    features = out / "runs" / "night" / "features"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(features.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(features.glob("part-*.parquet")))
    assert 3 <= done < 20 and not (out / "runs" / "night" / "_SUCCESS").exists()

    resumed = run(checkpoint, corpus, out, *night)
    assert resumed["resumed_shards"] >= 3 and resumed["inputs"] == 80
    a, b = scores_by_id(resumed), scores_by_id(undisturbed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["ood_score"] == pytest.approx(b[key]["ood_score"], rel=1e-5)
        assert a[key]["rank"] == b[key]["rank"] or abs(a[key]["ood_score"] - b[key]["ood_score"]) < 1e-6


def test_all_rejected_night_finishes_cleanly(local_ray, checkpoint, tmp_path):
    corpus = tmp_path / "broken"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"bad-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(i))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "jobs/score_corpus.py", *args(checkpoint, corpus, out, "run.id=empty")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "runs" / "empty" / "summary.json").read_text())
    assert (summary["inputs"], summary["scored"], summary["rejected"], summary["flagged"]) == (3, 0, 3, 0)
    assert summary["drift"]["p_value"] is None
    scores = pq.read_table(out / "runs" / "empty" / "scores")
    assert scores.num_rows == 0 and {"id", "ood_score", "p_value", "flagged"} <= set(scores.column_names)
    assert "No scored rows" in (out / "runs" / "empty" / "report.html").read_text()


def test_incomplete_sets_are_marked_not_flagged_and_report_reads_right(local_ray, checkpoint, tmp_path):
    # 16 images + 1 corrupt (its set loses one), and two files that are no inputs
    corpus = write_png_folder(tmp_path / "lake", n_id=12, n_ood=4)
    (corpus / ".DS_Store").write_bytes(b"\0")
    (corpus / "README.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = run(checkpoint, corpus, out, "run.id=sets", "extract.group_size=3", "run.report_top_k=4")
    assert summary["inputs"] == 17 and summary["skipped"] == 2
    assert summary["skipped_reasons"] == {"hidden file": 1, "not an image file extension": 1}
    table = pq.read_table(out / "runs" / "sets" / "scores").to_pandas()
    partial = table[~table["complete_set"]]
    assert (partial["n_rows"] < 3).all() and len(partial) == summary["incomplete_sets"] >= 1
    assert partial["p_value"].isna().all() and not partial["flagged"].any()
    assert (partial["rank"] > table.loc[table["complete_set"], "rank"].max()).all()
    complete = table[table["complete_set"]]
    assert complete["p_value"].notna().all() and (complete["n_rows"] == 3).all()

    page = (out / "runs" / "sets" / "report.html").read_text()
    assert page.count("data:image/png") == 4 + 1  # the top-4 thumbnails and the histograms
    assert f'<td class="num">{summary["inputs"]}</td>' in page and "Drift test" in page
    assert "1 rejected rows by reason" in page and "not a recognised image format" in page
    assert "hidden file" in page and "Skipped files" in page
    assert "http://" not in page and "https://" not in page
    drift = summary["drift"]
    assert drift["n_night"] == len(complete)
    assert f"p = {drift['p_value']:.3g}" in page
    np.testing.assert_array_equal(np.sort(complete["rank"].to_numpy()), np.arange(1, len(complete) + 1))
