"""The analyses on extracted features and on the model, in-process (no Ray): what :mod:`.run` feeds
the report with. Feature files are the pipeline's Parquet layout (:mod:`gradood.pipeline.tables`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradood.analysis import fisher, layers
from gradood.analysis.config import AnalyseConfig
from gradood.analysis.invariance import AffineMap, LogitMap, invariance_check
from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, demo_source_of
from gradood.features.core import trainable_parameters
from gradood.models.base import DensityModel
from gradood.pipeline.tables import sqnorm_matrix
from gradood.seeding import draw_noise, row_seed
from gradood.stats.layout import log_features


@dataclass
class FeatureSet:
    """Feature rows (images, or groups of B consecutive images) of one extraction."""

    ids: list[str]
    sources: list[str | None]
    sqnorms: np.ndarray
    log_prob: np.ndarray

    def select(self, mask: np.ndarray) -> FeatureSet:
        idx = np.flatnonzero(mask)
        return FeatureSet(
            [self.ids[i] for i in idx], [self.sources[i] for i in idx], self.sqnorms[idx], self.log_prob[idx]
        )


def read_features(features_uri: str, layer_names: list[str], by_folder: bool) -> FeatureSet:
    """A features folder; ``by_folder``: each row's source is its images' folder (None when a group's
    members come from two folders), else every row's source is ``"fit"``."""
    table = storage.read_parquet(features_uri)
    ids = table.column("id").to_pylist()
    if not by_folder:
        sources: list[str | None] = ["fit"] * len(ids)
    elif "member_ids" in table.column_names:
        members = table.column("member_ids").to_pylist()
        sources = layers.group_sources([[demo_source_of(m) for m in ms] for ms in members])
    else:
        sources = [demo_source_of(i) for i in ids]
    log_prob = table.column("log_prob").to_numpy().astype(np.float64)
    return FeatureSet(ids, sources, sqnorm_matrix(table, layer_names), log_prob)


def layer_analyses(
    cfg: AnalyseConfig, layer_names: list[str], fit: FeatureSet, corpus: dict[int, FeatureSet]
) -> dict[str, Any]:
    """Normality, scaled chi-square fits, QQ data and correlation decay on the fit set (B=1); per-layer
    separation of ID from each OOD source, the shown layers and their histograms per B."""
    a = cfg.analyse
    fit_logs = log_features(fit.sqnorms, cfg.fit.min_sqnorm)
    keep = np.flatnonzero(fit_logs.std(axis=0) >= cfg.fit.min_std)
    kept = [layer_names[j] for j in keep]
    probs = np.linspace(0.5 / a.qq_points, 1 - 0.5 / a.qq_points, a.qq_points)
    out: dict[str, Any] = {
        "layers": layer_names,
        "kept": kept,
        "dropped": [n for n in layer_names if n not in kept],
        "fit_rows": len(fit.ids),
        "normality": layers.normality(fit_logs[:, keep], a.normality_alpha),
        "chi2": layers.chi2_fits(fit.sqnorms[:, keep]),
        "qq": {
            "probs": probs,
            "sample": np.stack([layers.qq_data(fit_logs[:, j], probs)["sample"] for j in keep]),
        },
        "correlation": layers.correlation_decay(fit_logs[:, keep], a.permutations, cfg.seed, positions=keep),
        "fit_logs": fit_logs[:, keep],
    }
    per_b: dict[int, Any] = {}
    for b, feats in corpus.items():
        logs = log_features(feats.sqnorms[:, keep], cfg.fit.min_sqnorm)
        src = np.array([s or "" for s in feats.sources])
        by_source = {name: logs[src == name] for name in [DEMO_ID_SOURCE, *a.sources] if (src == name).any()}
        ood = {k: v for k, v in by_source.items() if k != DEMO_ID_SOURCE}
        per_b[b] = {
            "counts": {k: len(v) for k, v in by_source.items()},
            "separation": layers.layer_separation(by_source[DEMO_ID_SOURCE], ood),
            "logs": by_source,
        }
    chosen = layers.choose_layers(
        per_b[1]["separation"]["separation"], cfg.seed, a.n_separating_layers, a.n_random_layers
    )
    shown = chosen["separating"] + chosen["random"]
    for entry in per_b.values():
        entry["histograms"] = {
            kept[j]: layers.histograms({k: v[:, j] for k, v in entry["logs"].items()}, a.histogram_bins)
            for j in shown
        }
    out["per_group_size"] = per_b
    out["shown"] = {key: [kept[j] for j in idx] for key, idx in chosen.items()}
    out["shown_columns"] = shown
    return out


def fisher_layers(model: DensityModel, shown: list[str], count: int, seed: int) -> list[str]:
    """The shown layers with at least 2 weights, then (seeded) random others, ``count`` in all."""
    params = trainable_parameters(model)
    eligible = [n for n, p in params.items() if p.numel() >= 2]
    first = [n for n in shown if n in eligible][:count]
    rest = [n for n in eligible if n not in first]
    rng = np.random.default_rng(row_seed(seed, "fisher-layers"))
    extra = rng.choice(len(rest), size=min(count - len(first), len(rest)), replace=False) if rest else []
    chosen = set(first) | {rest[i] for i in extra}
    return [n for n in params if n in chosen]  # parameter order


def fisher_analysis(
    cfg: AnalyseConfig, model: DensityModel, data: torch.Tensor, data_ids: list[str], shown: list[str]
) -> dict[str, Any]:
    """FIM slices over model samples or held-out rows (``data``), per :func:`fisher.resolve_source`."""
    a = cfg.analyse
    source, why = fisher.resolve_source(model, a.fisher_source.value)
    if source == "samples":
        x, discarded = fisher.draw_samples(model, a.fisher_samples, cfg.seed)
        ids = [f"sample-{i:06d}" for i in range(len(x))]
    else:
        x, ids, discarded = data[: a.fisher_samples], data_ids[: a.fisher_samples], 0
    names = fisher_layers(model, shown, a.fisher_layers, cfg.seed)
    out = fisher.fisher_slices(
        model, x, ids, names, k=a.fisher_weights, seed=cfg.seed, null_permutations=a.fisher_null_permutations
    )
    return {"source": source, "why": why, "discarded_samples": discarded, **out}


def invariance_analysis(cfg: AnalyseConfig, model: DensityModel, data: torch.Tensor, ids: list[str]) -> dict:
    """Prop. 1 on ``invariance_rows`` held-out rows, float64 loop, for a logit map and a random per-pixel
    affine map (scales log-uniform in [1/4, 1] and shifts in [-10, 10], drawn from the seed)."""
    n = cfg.analyse.invariance_rows
    x, ids = data[:n], ids[:n]
    noise = draw_noise(model.noise_spec(), ids, cfg.seed)
    gen = torch.Generator().manual_seed(row_seed(cfg.seed, "invariance-affine"))
    shape = model.input_shape
    scale = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-np.log(4), 0.0, generator=gen))
    shift = torch.empty(shape, dtype=torch.float64).uniform_(-10, 10, generator=gen)
    maps = {"logit (alpha=0.05)": LogitMap(0.05), "per-pixel affine": AffineMap(scale, shift)}
    out = {}
    for name, transform in maps.items():
        res = invariance_check(model, x, noise, transform)
        out[name] = {
            **{k: v for k, v in res.items() if not isinstance(v, np.ndarray)},
            "log_det_min": float(res["log_det"].min()),
            "log_det_max": float(res["log_det"].max()),
            "log_det": res["log_det"],
            "max_abs_log_prob": float(np.max(np.abs(res["log_prob"]))),
        }
    return out
