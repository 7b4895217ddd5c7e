"""Configs: YAML + CLI merging fails fast with the key named; cluster.yaml is accepted by Ray."""

from __future__ import annotations

import pytest
import yaml
from omegaconf.errors import ConfigKeyError, ValidationError

from gradood.config import CONF_DIR, ScoreCorpusConfig, TrainJobConfig, load_config, to_yaml

SCORE_YAML = CONF_DIR / "score_corpus.yaml"


def test_yaml_and_cli_merge():
    cfg = load_config(ScoreCorpusConfig, [SCORE_YAML], ["extract.group_size=5", "corpus.uri=s3://lake/x/"])
    assert cfg.extract.group_size == 5 and cfg.corpus.uri == "s3://lake/x/"
    assert cfg.model.name == "vae" and cfg.model.params["latent_dim"] == 16  # from conf/model/vae.yaml
    assert yaml.safe_load(to_yaml(cfg))["extract"]["group_size"] == 5


@pytest.mark.parametrize(
    "override,error,key",
    [
        ("extract.bogus=1", ConfigKeyError, "bogus"),
        ("extract.batch_size=many", ValidationError, "extract.batch_size"),
        ("fit.refit=maybe", ValidationError, "fit.refit"),
        ("detect.detector=best", ValidationError, "detect.detector"),
        ("detect.combination=mean", ValidationError, "detect.combination"),
        ("detect.components=[paper,magic]", ValidationError, "detect.components"),
        ("flag.method=holm", ValidationError, "flag.method"),
        ("detect.adaptive_rows=0", ValueError, "detect.adaptive_rows"),
        ("flag.fdr=1.0", ValueError, "flag.fdr"),
        ("flag.fdr=0", ValueError, "flag.fdr"),
    ],
)
def test_bad_overrides_name_the_key(override, error, key):
    with pytest.raises(error, match=key.replace(".", r"\.")):
        load_config(ScoreCorpusConfig, [SCORE_YAML], [override])


def test_model_shortcut_replaces_params():
    for name in ("glow", *[p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "glow"]):
        cfg = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"], [f"model={name}"])
        assert cfg.model.name == name
        assert (
            cfg.model.params
            == yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())["model"]["params"]
        )
    with pytest.raises(ValueError, match="no config"):
        load_config(TrainJobConfig, [], ["model=nope"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_a_family_trains_with_its_own_budget_whichever_default_family_came_first(name):
    """The training job starts from Glow's YAML, the scoring job (which trains a missing checkpoint) from
    the VAE's; model=NAME must give the same model and training settings in both."""
    trained = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"], [f"model={name}"])
    scored = load_config(ScoreCorpusConfig, [SCORE_YAML], [f"model={name}"])
    assert scored.model == trained.model and scored.train == trained.train
    assert trained.train.name == f"{name}_fmnist_small"
    if name == "glow":  # the training job's default family, with or without model=glow
        default = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"])
        assert default.model == trained.model and default.train == trained.train


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CONF_DIR.parent / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert all("resources" in t for t in config["available_node_types"].values())
    assert any(t["resources"].get("GPU") for t in config["available_node_types"].values())
