"""Configuration of ``jobs/analyse.py``: the paper's analyses of per-layer gradient norms for one model.

The same omegaconf scheme as the other jobs (:func:`gradood.config.load_config`): dataclass defaults <-
``conf/analyse.yaml`` <- the family's ``model:`` section <- ``key=value`` overrides. The model defaults
to the project's default family, the ``model/<name>`` entry of ``conf/score_corpus.yaml``'s
``defaults`` list, so both jobs follow one choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import OmegaConf

from gradood.config import (
    CONF_DIR,
    ExtractConfig,
    FitConfig,
    ImageConfig,
    ModelConfig,
    RayConfig,
    load_config,
)
from gradood.core.cli import ConfigError

ANALYSE_YAML = CONF_DIR / "analyse.yaml"
SCORE_CORPUS_YAML = CONF_DIR / "score_corpus.yaml"


class FisherSource(StrEnum):
    """Where the Monte Carlo Fisher estimate draws its x from."""

    #: model samples where the family samples in one pass (Glow, VAE), else held-out data
    auto = "auto"
    #: x ~ p_theta (DensityModel.sample; Glow at temperature 1): the Fisher information itself
    samples = "samples"
    #: held-out in-distribution rows: the empirical Fisher
    data = "data"


@dataclass
class AnalyseSettings:
    #: OOD sources of gradood.data.demo beside held-out FashionMNIST (the in-distribution source)
    sources: list[str] = field(
        default_factory=lambda: [
            "digits",
            "fashion_mnist_inverted",
            "uniform_noise",
            "glyphs",
            "photo_patches",
        ]
    )
    #: held-out FashionMNIST test rows (from id_start) shown as the in-distribution histograms
    id_rows: int = 1000
    #: rows per OOD source (rounded down to a multiple of every group size)
    rows_per_source: int = 300
    #: first FashionMNIST test row of the in-distribution corpus rows (the fit set lies before it)
    id_start: int = 5000
    #: B values of the histograms (features of the summed log-likelihood of B consecutive rows)
    group_sizes: list[int] = field(default_factory=lambda: [1, 5])
    #: layers shown: the n_separating with the largest mean |2 AUROC - 1| over OOD sources at B=1 ...
    n_separating_layers: int = 3
    #: ... plus n_random drawn from the others with numpy's default_rng(seed)
    n_random_layers: int = 3
    #: bins of the per-layer histograms
    histogram_bins: int = 40
    #: level of the per-layer normality tests of log f_j on the fit set
    normality_alpha: float = 0.05
    #: probabilities of the per-layer QQ data written to the JSON
    qq_points: int = 41
    #: permutations of the layer order in the correlation-decay test
    permutations: int = 500
    #: layers of the FIM slices (the shown layers with >= 2 weights first, then seed-random ones)
    fisher_layers: int = 4
    #: weights per FIM slice: min(fisher_weights, |theta_j|), drawn per layer from (seed, layer name)
    fisher_weights: int = 50
    #: Monte Carlo draws of the FIM estimate
    fisher_samples: int = 300
    #: where the Fisher estimate draws x from: auto, samples (x ~ p_theta) or data (held-out rows)
    fisher_source: FisherSource = FisherSource.auto
    #: column permutations averaged in the independent-coordinates null of the diagonal dominance ratio
    fisher_null_permutations: int = 20
    #: rows of the representation-invariance check (float64, per-sample loop)
    invariance_rows: int = 6


@dataclass
class AnalyseOutput:
    #: where report.html, report.md, analysis.json and the figures go
    uri: str = "runs/analyse"


def _fit_default() -> FitConfig:
    return FitConfig(size=1500)


def _extract_default() -> ExtractConfig:
    return ExtractConfig(batch_size=60, shard_size=600)


@dataclass
class AnalyseConfig:
    """Model, image conversion, fit set (log f_j statistics), extraction and Ray settings, plus the
    analyses' own. ``fit.calibration_fraction`` and ``fit.refit`` are not used (nothing is calibrated)."""

    #: every random draw derives from the seed and the row id
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    fit: FitConfig = field(default_factory=_fit_default)
    extract: ExtractConfig = field(default_factory=_extract_default)
    ray: RayConfig = field(default_factory=RayConfig)
    output: AnalyseOutput = field(default_factory=AnalyseOutput)
    analyse: AnalyseSettings = field(default_factory=AnalyseSettings)


def default_family() -> str | None:
    """The family named by ``model/<name>`` in conf/score_corpus.yaml's ``defaults`` (None if absent)."""
    if not SCORE_CORPUS_YAML.is_file():
        return None
    defaults = OmegaConf.load(SCORE_CORPUS_YAML).get("defaults") or []
    models = [str(d).split("/", 1)[1] for d in defaults if str(d).startswith("model/")]
    return models[-1] if models else None


def load_analyse_config(overrides: Sequence[str] = ()) -> AnalyseConfig:
    """Defaults <- conf/analyse.yaml <- the model family's ``model:`` section <- ``overrides``.

    The family is the project's default one unless a ``model=NAME`` override names another. A bad key
    or value raises :class:`~gradood.core.cli.ConfigError` naming it.
    """
    default = default_family()
    named = any(o.startswith("model=") for o in overrides)
    family = [f"model={default}"] if default and not named else []
    yaml_files = [ANALYSE_YAML] if ANALYSE_YAML.is_file() else []
    cfg = load_config(AnalyseConfig, yaml_files, [*family, *overrides])
    try:
        check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def check_config(cfg: AnalyseConfig) -> None:
    a = cfg.analyse
    if not a.sources:
        raise ValueError("analyse.sources must name at least one OOD source")
    if 1 not in a.group_sizes or any(b < 1 for b in a.group_sizes):
        raise ValueError(f"analyse.group_sizes must hold 1 and only positive sizes, got {a.group_sizes}")
    if not 0 < a.normality_alpha < 1:
        raise ValueError(f"analyse.normality_alpha must lie in (0, 1), got {a.normality_alpha}")
    for key in ("id_rows", "rows_per_source", "fisher_samples", "fisher_weights", "invariance_rows"):
        if getattr(a, key) < 2:
            raise ValueError(f"analyse.{key} must be at least 2, got {getattr(a, key)}")
    if max(a.group_sizes) > cfg.extract.batch_size:
        raise ValueError(
            f"extract.batch_size={cfg.extract.batch_size} is smaller than the largest group size "
            f"{max(a.group_sizes)}"
        )


def to_plain(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-safe values (enums as their values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]
