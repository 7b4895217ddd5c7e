"""jobs/evaluate.py on a user's own data: their in-distribution folder with one OOD folder, and with
none (synthetic OOD sets derived from the in-distribution images), through the shipped VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from sklearn.datasets import load_digits

from gradood.config import EvaluateConfig, load_config
from gradood.core.cli import ConfigError
from gradood.data.fashion_mnist import load_fashion_mnist
from gradood.evaluation.own_data import OWN_ID_SOURCE, SYNTHETIC
from gradood.evaluation.run import run_evaluation

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RUNS = ["fit.size=300", "extract.shard_size=64", "extract.num_workers=2"]


def folder_of(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    garments = folder_of(load_fashion_mnist("test")[0][:150], tmp / "mine")  # never trained or fitted on
    digits = (load_digits().images[:30] * 255 / 16).astype(np.uint8)
    digits = np.stack([np.asarray(Image.fromarray(d).resize((28, 28), Image.BILINEAR)) for d in digits])
    return garments, folder_of(digits, tmp / "digits")


def settings(out: Path, mine: Path, *extra: str) -> list[str]:
    return [
        f"output.uri={out}",
        "evaluate.families=[vae]",
        "evaluate.group_sizes=[1]",
        "evaluate.bergamin=false",
        f"evaluate.id_uri={mine}",
        "evaluate.id_rows=120",
        "evaluate.rows_per_source=20",
        "evaluate.night_draws=1",
        f"evaluate.checkpoints={{vae: {REPO / 'gradood/pretrained/vae_fmnist_small'}}}",
        *extra,
    ]


def test_own_in_distribution_folder_with_one_ood_folder(local_ray, folders, tmp_path):
    mine, digits = folders
    cfg = load_config(EvaluateConfig, [], settings(tmp_path, mine, f"evaluate.ood={{my_digits: {digits}}}"))
    summary = run_evaluation(cfg, RUNS, "test")
    corpus = tmp_path / "own_corpus"
    assert len(list((corpus / OWN_ID_SOURCE).glob("*.png"))) == 120
    assert len(list((corpus / "my_digits").glob("*.png"))) == 20
    metrics = pq.read_table(tmp_path / "metrics.parquet").to_pandas()
    assert set(metrics["source"]) == {"my_digits"} and metrics["far_ood"].all()
    assert set(metrics["n_id"]) == {120} and set(metrics["n_ood"]) == {20}
    # the ID rows of the nights are the user's: nights of 120 rows (0.5 % of them rounds to one OOD row)
    nights = pq.read_table(tmp_path / "nights.parquet").to_pandas()
    assert set(nights["n_rows"]) == {120} and set(nights["prevalence"]) == {0.005, 0.01, 0.02, 0.05, 0.1}
    assert set(nights["source"]) == {"my_digits"}
    report = Path(summary["markdown"]).read_text()
    assert "Recommended family: vae" in report and f"In-distribution rows: 120 at most of {mine}" in report
    assert summary["family_ranking"] == {
        "vae": pytest.approx(metrics.query("test == 'combined'")["auroc"].mean())
    }


def test_without_ood_examples_synthetic_sets_are_derived_and_said_to_be(local_ray, folders, tmp_path):
    mine, _ = folders
    cfg = load_config(EvaluateConfig, [], settings(tmp_path, mine))
    summary = run_evaluation(cfg, RUNS, "test")
    corpus = tmp_path / "own_corpus"
    first = corpus / OWN_ID_SOURCE / "000000.png"
    with Image.open(first) as original, Image.open(corpus / "synthetic_inverted" / first.name) as inverted:
        assert np.array_equal(np.asarray(inverted), np.asarray(ImageOps.invert(original)))
    metrics = pq.read_table(tmp_path / "metrics.parquet").to_pandas()
    assert set(metrics["source"]) == set(SYNTHETIC)
    far = dict(zip(metrics["source"], metrics["far_ood"], strict=False))
    assert far == {name: is_far for name, (is_far, _) in SYNTHETIC.items()}
    assert "SYNTHETIC, derived from the in-distribution images" in Path(summary["markdown"]).read_text()


def test_checkpoints_must_name_evaluated_families(tmp_path, folders):
    mine, _ = folders
    cfg = load_config(EvaluateConfig, [], [*settings(tmp_path, mine), "evaluate.checkpoints={glow: x}"])
    with pytest.raises(ValueError, match=r"evaluate.checkpoints names families \['glow'\]"):
        from gradood.evaluation.grid import run_configs

        run_configs(cfg, [], str(tmp_path), str(tmp_path))
    with pytest.raises(ConfigError, match="evaluate.extra_sources was renamed to evaluate.ood"):
        load_config(EvaluateConfig, [], ["evaluate.extra_sources={a: b}"])
