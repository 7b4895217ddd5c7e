"""The evaluation grid end to end on a local Ray with the shipped Glow, on small public sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import false_discovery_control
from test_data_fashion_mnist import write_fake_mnist

from gradood.config import DetectConfig, EvaluateConfig, load_config
from gradood.evaluation.run import run_evaluation
from gradood.stats import ood_metrics

pytestmark = pytest.mark.slow


def test_grid_metrics_flags_calibration_and_report(local_ray, tmp_path):
    write_fake_mnist(tmp_path / "tv" / "MNIST" / "raw", {"train": 4, "test": 30})
    out = tmp_path / "eval"
    own = [
        f"output.uri={out}",
        "evaluate.families=[glow]",
        "evaluate.group_sizes=[1,5]",
        "evaluate.rows_per_source=20",
        "evaluate.id_rows=200",
        "evaluate.night_rows=200",
        "evaluate.night_draws=1",
        "evaluate.sources=[digits,fashion_mnist_vflip,glyphs]",
        f"evaluate.ood={{mnist: 'torchvision://MNIST?split=test&root={tmp_path / 'tv'}'}}",
    ]
    runs = ["fit.size=300", "extract.shard_size=64", "extract.num_workers=2"]
    cfg = load_config(EvaluateConfig, [], own)
    summary = run_evaluation(cfg, runs, "test")

    metrics = pq.read_table(out / "metrics.parquet").to_pandas()
    tests = {"combined", "paper", "fullcov", "fisher_layers", "gradnorm", "typicality", "nll"}
    tests |= {"complexity", "combined_fisher", "combined_tippett", "combined_all", "bergamin"}
    assert set(metrics["test"]) == tests
    assert set(metrics["source"]) == {"digits", "fashion_mnist_vflip", "glyphs", "mnist"}
    assert len(metrics) == 2 * 4 * len(tests)  # group sizes x sources x tests
    assert dict(zip(metrics["source"], metrics["far_ood"], strict=True))["fashion_mnist_vflip"] == False  # noqa: E712

    # every metric row is recomputable from the scores table; flags are BH over ID + that source
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    for (group_size, test), sub in scores.groupby(["group_size", "test"]):
        rows = metrics[(metrics["group_size"] == group_size) & (metrics["test"] == test)]
        id_rows = sub[~sub["is_ood"]]
        assert len(id_rows) == 200 // group_size
        for r in rows.to_dict("records"):
            ood = sub[sub["source"] == r["source"]]
            expected = ood_metrics(id_rows["ood_score"].to_numpy(), ood["ood_score"].to_numpy())
            assert r["auroc"] == pytest.approx(expected["auroc"], abs=1e-12)
            assert r["fpr_at_95_tpr"] == pytest.approx(expected["fpr_at_95_tpr"], abs=1e-12)
            p = np.concatenate([id_rows["p_value"].to_numpy(), ood["p_value"].to_numpy()])
            flagged = false_discovery_control(p, method="bh") <= 0.05
            assert r["n_flagged"] == flagged.sum() and r["n_id"] == len(id_rows) and r["n_ood"] == len(ood)
            assert r["flag_power"] == pytest.approx(flagged[len(id_rows) :].mean())
            if flagged.any():
                assert r["flag_fdr"] == pytest.approx(flagged[: len(id_rows)].sum() / flagged.sum())

    # the calibration table is the share of held-out ID rows with p <= alpha
    calibration = pq.read_table(out / "calibration.parquet").to_pandas()
    for r in calibration.to_dict("records"):
        sub = scores[(scores["group_size"] == r["group_size"]) & (scores["test"] == r["test"])]
        assert r["rate"] == pytest.approx(np.mean(sub.loc[~sub["is_ood"], "p_value"] <= r["alpha"]))

    # realistic nights (B=1): every far-OOD source at every OOD share, the default and the fixed Fisher
    # combination, BH and Storey; each night has round(share * 200) OOD rows
    nights = pq.read_table(out / "nights.parquet").to_pandas()
    assert set(nights["source"]) == {"digits", "glyphs", "mnist"}
    assert set(nights["test"]) == {"combined", "combined_fisher"} and set(nights["method"]) == {
        "bh",
        "storey",
    }
    assert len(nights) == 3 * 5 * 1 * 2 * 2
    np.testing.assert_array_equal(nights["n_ood"], np.round(nights["prevalence"] * 200).astype(int))
    assert (nights["n_rows"] == 200).all() and nights["power"].between(0, 1).all()
    assert "| glow | glyphs | 0.5 % |" in (out / "nights.md").read_text()

    html = (out / "report.html").read_text()
    assert "gradood evaluation grid" in html and "mnist" in html and "bergamin" in html
    assert "http://" not in html and "https://" not in html
    assert json.loads((out / "summary.json").read_text())["family_ranking"].keys() == {"glow"}
    assert summary["html"].endswith("report.html")

    # the combination study reads the grid's B=1 runs and reproduces the job's combinations' AUROCs
    study = tmp_path / "combinations.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "combination_search.py"
    subprocess.run(
        [sys.executable, str(script), "--grid", str(out), "--out", str(study)], check=True, timeout=300
    )
    combinations = {(r["rule"], tuple(r["tests"])): r for r in json.loads(study.read_text())["combinations"]}
    b1 = metrics[metrics["group_size"] == 1].set_index(["test", "source"])["auroc"]
    for test, rule in (("combined_fisher", "fisher"), ("combined_tippett", "tippett")):
        found = combinations[(rule, tuple(c.value for c in DetectConfig().components))]["auroc"]["glow"]
        assert found == pytest.approx({s: b1[(test, s)] for s in found}, abs=1e-12)

    # the adaptive-combination study recomputes the job's adaptive test in-process (the grid's night is
    # below detect.adaptive_rows, so every row trained it) and the fixed one
    study = tmp_path / "adaptive.json"
    script = script.with_name("adaptive_combination.py")
    subprocess.run(
        [sys.executable, str(script), "--grid", str(out), "--out", str(study), "--shares", "5"],
        check=True,
        timeout=300,
    )
    adaptive = json.loads(study.read_text())
    (grid_night,) = adaptive["nights"]["glow"]["grid"]
    for rule, test in (("fixed", "combined_fisher"), ("adaptive", "combined")):
        assert grid_night[rule] == pytest.approx({s: b1[(test, s)] for s in grid_night[rule]}, abs=1e-12)
    assert set(adaptive["nights"]["glow"]) == {"grid", "grid_without", "one_source", "k=5"}
    left_out = adaptive["nights"]["glow"]["grid_without"]
    assert sorted(n["without"] for n in left_out) == sorted(grid_night["adaptive"])
    for night in left_out:  # the grid's night less one source: the others are all scored
        assert set(night["adaptive"]) == set(grid_night["adaptive"]) - {night["without"]}
    assert len(adaptive["nights"]["glow"]["k=5"]) == 4  # one night per OOD source
