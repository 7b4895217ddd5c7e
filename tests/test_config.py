"""Configs: YAML + CLI merging fails fast with the key named; cluster.yaml is accepted by Ray."""

from __future__ import annotations

import pytest
import yaml

from gradood.config import CONF_DIR, ScoreCorpusConfig, TrainJobConfig, load_config, to_yaml
from gradood.core.cli import ConfigError
from gradood.train.trainer import run_name

SCORE_YAML = CONF_DIR / "score_corpus.yaml"


def test_yaml_and_cli_merge():
    cfg = load_config(ScoreCorpusConfig, [SCORE_YAML], ["extract.group_size=5", "corpus.uri=s3://lake/x/"])
    assert cfg.extract.group_size == 5 and cfg.corpus.uri == "s3://lake/x/"
    assert cfg.model.name == "vae" and cfg.model.params["latent_dim"] == 16  # from conf/model/vae.yaml
    assert yaml.safe_load(to_yaml(cfg))["extract"]["group_size"] == 5


@pytest.mark.parametrize(
    "override,message",
    [
        ("extract.bogus=1", "unknown key extract.bogus; see --help for the keys"),
        ("corpus.urii=x", "unknown key corpus.urii; did you mean corpus.uri?"),
        ("corpu.uri=x", "unknown key corpu.uri; did you mean corpus.uri or "),
        ("extract.batchsize=3", "unknown key extract.batchsize; did you mean extract.batch_size "),
        ("extract.batch_size=many", "extract.batch_size: Value 'many' of type 'str' could not be converted"),
        ("fit.refit=maybe", "fit.refit: Value 'maybe' is not a valid bool"),
        ("detect.test=best", "detect.test: Invalid value 'best', expected one of [combined, "),
        ("detect.combination=mean", "detect.combination: Invalid value 'mean', expected one of [fisher,"),
        ("detect.components=[paper,magic]", "detect.components[1]: Invalid value 'magic'"),
        ("flag.method=holm", "flag.method: Invalid value 'holm', expected one of [bh, storey, by]"),
        ("image.resize=stretch", "image.resize: Invalid value 'stretch', expected one of [resize, "),
        ("detect.adaptive_rows=0", "detect.adaptive_rows must be at least 1, got 0"),
        ("flag.fdr=1.0", "flag.fdr must be in (0, 1), got 1.0"),
        ("flag.fdr=0", "flag.fdr must be in (0, 1), got 0.0"),
        ("fit.size", "'fit.size': settings are key=value (see --help)"),
        ("model=nope", "model=nope: no such family; one of ddpm, glow, pixelcnn, vae"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(ScoreCorpusConfig, [SCORE_YAML], [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert isinstance(error.value, ValueError)  # callers that catch ValueError keep working


def test_model_shortcut_replaces_params():
    for name in ("glow", *[p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "glow"]):
        cfg = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"], [f"model={name}"])
        assert cfg.model.name == name
        assert (
            cfg.model.params
            == yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())["model"]["params"]
        )
    with pytest.raises(ConfigError, match="no such family"):
        load_config(TrainJobConfig, [], ["model=nope"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_a_family_trains_with_its_own_budget_in_either_job(name):
    """The training job and the scoring job (which trains a missing checkpoint) merge model=NAME over
    their own YAML and the default family's; both must give the same model and training settings."""
    trained = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"], [f"model={name}"])
    scored = load_config(ScoreCorpusConfig, [SCORE_YAML], [f"model={name}"])
    assert scored.model == trained.model and scored.train == trained.train
    assert run_name(trained) == f"{name}_fmnist_small"  # the shipped checkpoint's folder
    if name == "vae":  # the default family, with or without model=vae
        default = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"])
        assert default.model == trained.model and default.train == trained.train


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CONF_DIR.parent / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert all("resources" in t for t in config["available_node_types"].values())
    assert any(t["resources"].get("GPU") for t in config["available_node_types"].values())
