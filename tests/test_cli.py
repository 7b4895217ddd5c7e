"""Every job answers --help with its keys, defaults and docs; a bad key or value is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradood.analysis.config import load_analyse_config
from gradood.config import CONF_DIR, EvaluateConfig, ScoreCorpusConfig, TrainJobConfig, load_config
from gradood.core.cli import (
    RENAMED_KEYS,
    USAGE_ERROR,
    ConfigError,
    field_docs,
    help_text,
    leaf_settings,
    run_job,
)

REPO = Path(__file__).resolve().parents[1]

#: job -> (its settings with their defaults, a misspelt key, the key the error must suggest)
JOBS = {
    "score_corpus": (
        lambda: load_config(ScoreCorpusConfig, [CONF_DIR / "score_corpus.yaml"]),
        "corpus.urii=x",
        "corpus.uri",
    ),
    "train": (
        lambda: load_config(TrainJobConfig, [CONF_DIR / "train.yaml"]),
        "train.epoch=2",
        "train.epochs",
    ),
    "analyse": (load_analyse_config, "analyse.id_row=5", "analyse.id_rows"),
    "evaluate": (lambda: load_config(EvaluateConfig), "evaluate.familes=[vae]", "evaluate.families"),
}


def _job(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "jobs" / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_help_lists_every_key_with_its_default_and_a_misspelt_key_exits_2(name):
    defaults, misspelt, suggestion = JOBS[name]
    shown = _job(name, "--help")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"usage: python jobs/{name}.py")
    for key, _, _ in leaf_settings(defaults()):
        listed = [line for line in lines if line.startswith(f"  {key}=")]
        assert len(listed) == 1, (key, listed)
    bad = _job(name, misspelt)
    assert bad.returncode == USAGE_ERROR
    assert bad.stderr.strip().splitlines() == [
        f"error: unknown key {misspelt.split('=')[0]}; did you mean {suggestion}?"
    ]
    assert bad.stdout == ""


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_setting_is_documented(name):
    """--help and the configuration reference are written from the ``#:`` comments: none may be missing."""
    undocumented = [key for key, _, doc in leaf_settings(JOBS[name][0]()) if not doc]
    assert undocumented == []


def test_help_shows_the_defaults_and_the_choices_of_closed_settings():
    cfg = load_config(ScoreCorpusConfig, [CONF_DIR / "score_corpus.yaml"], ["extract.group_size=5"])
    text = help_text("usage: x", cfg)
    lines = text.splitlines()
    assert "  extract.group_size=5" in lines and "  run.id=null" in lines and "  fit.refit=false" in lines
    assert "  detect.components=[paper,fullcov,typicality,complexity]" in lines
    method = lines.index("  extract.method=engine")
    assert lines[method + 1].strip().startswith("how the per-sample norms are computed")
    assert "(one of: loop, vmap, engine)" in " ".join(lines[method + 1 : method + 4])


def test_field_docs_are_the_comments_above_each_field():
    from dataclasses import dataclass

    @dataclass
    class Example:
        """Class docstring, not a field's."""

        #: first line
        #: second line
        documented: int = 1
        bare: int = 2
        #: only the next field
        after: str = "x"

    assert field_docs(Example) == {"documented": "first line second line", "after": "only the next field"}


def test_run_job_turns_a_config_error_into_one_line_and_status_2(capsys):
    def main(argv: list[str]) -> int:
        raise ConfigError(f"bad {argv[0]}")

    assert run_job(main, ["a=1"], lambda: "help") == USAGE_ERROR
    assert capsys.readouterr().err == "error: bad a=1\n"
    assert run_job(main, ["a=1", "--help"], lambda: "the help") == 0
    assert capsys.readouterr().out == "the help\n"

    def failing(argv: list[str]) -> int:
        raise ValueError("not a config error")

    with pytest.raises(ValueError, match="not a config error"):  # a job's own failure keeps its traceback
        run_job(failing, [], lambda: "")


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_KEYS.items()))
def test_a_renamed_key_fails_naming_its_new_name(old, new, tmp_path):
    schema, yamls = {
        "train": (TrainJobConfig, [CONF_DIR / "train.yaml"]),
        "evaluate": (EvaluateConfig, []),
    }.get(old.split(".")[0], (ScoreCorpusConfig, [CONF_DIR / "score_corpus.yaml"]))
    with pytest.raises(ConfigError, match=f"^{old} was renamed to {new}$"):
        load_config(schema, yamls, [f"{old}=1"])
    section, leaf = old.split(".")
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text(f"{section}:\n  {leaf}: 1\n")
    with pytest.raises(ConfigError, match=f"^{old} was renamed to {new}$"):
        load_config(schema, [*yamls, old_yaml])
    # the new key takes a value of its type: an enum, a mapping, or a number (runs_uri: a string)
    value, expected = {
        "detect.test": ("typicality", "typicality"),
        "evaluate.ood": ("{a: b}", {"a": "b"}),
    }.get(new, ("2", 2.0))
    renamed = load_config(schema, yamls, [f"{new}={value}"])
    got = getattr(getattr(renamed, section), new.split(".")[1])
    got = getattr(got, "value", got)
    assert (float(got) if isinstance(expected, float) else got) == expected


def test_the_default_model_family_is_the_shipped_default():
    from gradood.config import ModelConfig

    scoring = load_config(ScoreCorpusConfig, [CONF_DIR / "score_corpus.yaml"])
    training = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"])
    assert ModelConfig().name == scoring.model.name == training.model.name == "vae"
    assert ModelConfig().checkpoint == scoring.model.checkpoint == training.model.checkpoint
