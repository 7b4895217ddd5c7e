"""Fit the detector suite: fit-set features -> reducer -> single tests, calibrated; or reuse a saved one.

The held-out rows of ``fit.uri`` go through the same distributed extraction as any corpus. Each row's
part (fit, calibration 1, calibration 2) is a hash of (seed, row id), so it does not depend on the shard
layout. The reducer merges the fit rows' moments as shards finish; the calibration rows (a few thousand
at most) are read back from Parquet by the driver.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray

import gradood
from gradood.config import FitConfig, ScoreCorpusConfig
from gradood.core import storage
from gradood.core.progress import progress
from gradood.data.base import CorpusSource
from gradood.data.holdout import HeldOutSplit, HoldoutRule, Side, held_out_rows
from gradood.data.sources import open_source
from gradood.pipeline.extract import run_extraction
from gradood.pipeline.reducer import FitReducer, moments_from_parquet
from gradood.pipeline.tables import (
    EXTRACTED_COLUMNS,
    INCOMPLETE_SET_SPLIT,
    SPLIT_COLUMN,
    feature_matrix,
    suite_feature_names,
)
from gradood.stats.moments import Moments
from gradood.stats.suite import DetectorSuite

DETECTOR_FORMAT = 4


def fit_settings(cfg: ScoreCorpusConfig) -> dict[str, Any]:
    """Everything a saved detector must match to be reused (JSON types, compared as they are)."""
    return {
        "uri": cfg.fit.uri,
        "start": cfg.fit.start,
        "size": cfg.fit.size,
        "min_sqnorm": cfg.fit.min_sqnorm,
        "min_std": cfg.fit.min_std,
        "calibration_fraction": cfg.fit.calibration_fraction,
        "part_2_fraction": cfg.fit.part_2_fraction,
        "components": [c.value for c in cfg.detect.components],
        "combination": cfg.detect.combination.value,
        "seed": cfg.seed,
        "image": dataclasses.asdict(cfg.image),
    }


def check_detector(detector: dict[str, Any], fingerprint: str, group_size: int, where: str) -> None:
    """Refuse a detector of another format, fitted for another model or another set size."""
    if detector.get("format_version") != DETECTOR_FORMAT:
        raise ValueError(
            f"detector {where} has format_version {detector.get('format_version')!r}, this gradood reads "
            f"format_version {DETECTOR_FORMAT} (equal-tailed two-sided tests, calibration tails of every "
            "side): refit it with fit.refit=true"
        )
    if detector.get("model_fingerprint") != fingerprint:
        raise ValueError(
            f"detector {where} was fitted for model {str(detector.get('model_fingerprint'))[:12]}, "
            f"but the model loaded now has fingerprint {fingerprint[:12]}: refit it (fit.refit=true) "
            "or point output.detector_uri elsewhere"
        )
    if detector.get("group_size") != group_size:
        raise ValueError(
            f"detector {where} was fitted with group_size={detector.get('group_size')}, this run uses "
            f"extract.group_size={group_size}: refit it (fit.refit=true) or use a matching group size"
        )


def training_data(model_meta: dict[str, Any]) -> dict[str, Any] | None:
    """Where the checkpoint's training rows came from (``model.json``: ``training.data``), if recorded."""
    return (model_meta.get("training") or {}).get("data")


def fit_source(fit: FitConfig, model_meta: dict[str, Any], size: int | None = None) -> CorpusSource:
    """The fit set: ``fit.uri`` from ``fit.start`` (``fit.size`` rows, or ``size``) when given, else that
    range of the rows the checkpoint held out of its training source."""
    limit = fit.size if size is None else size
    if fit.uri is None:
        return held_out_rows(training_data(model_meta), fit.start, limit)
    return open_source(fit.uri, start=fit.start, limit=limit)


def fit_set_warnings(model_meta: dict[str, Any], source: CorpusSource) -> list[str]:
    """Refuse a fit set that holds rows the model trained on; warn when it is not the model's training
    source (the detector then calls in-distribution what resembles the fit set, not the training data).

    The training rows are those the checkpoint records (``model.json``: ``training.data``, the source's
    uri, its range of rows and the held-out rule applied within it)."""
    if isinstance(source, HeldOutSplit) and source.side is Side.held_out:
        return []  # the checkpoint's own held-out rows
    data = training_data(model_meta)
    if not data or "uri" not in data:
        return [
            f"the checkpoint does not record its training data, so the fit set {source.uri} cannot be "
            "checked against it: make sure the model never trained on these rows"
        ]
    if data["uri"] != source.uri:
        return [
            f"the fit set {source.uri} is not the source the model trained on ({data['uri']}): the "
            "detector learns in-distribution from the fit set, so fit it on held-out rows of the "
            "model's own training source (fit.uri, fit.start, fit.size) unless these are such rows"
        ]
    first = int(data.get("start") or 0)
    trained = (first, first + int(data.get("source_rows", data["num_rows"])))
    fit = (source.start, source.start + source.num_rows())
    lo, hi = max(trained[0], fit[0]), min(trained[1], fit[1])
    if lo < hi and "holdout" in data:
        seen = int((~HoldoutRule.from_dict(data["holdout"]).held_out(source.row_ids(lo, hi))).sum())
        if seen:
            raise ValueError(
                f"fit rows {fit[0]}-{fit[1] - 1} of {source.uri} include {seen} rows that the model "
                f"trained on (rows {trained[0]}-{trained[1] - 1} less those its held-out rule keeps "
                "out, model.json training.data): leave fit.uri unset to fit on the held-out rows"
            )
    elif lo < hi:
        raise ValueError(
            f"fit rows {fit[0]}-{fit[1] - 1} of {source.uri} include rows "
            f"{max(trained[0], fit[0])}-{min(trained[1], fit[1]) - 1} that the model trained on (it trained "
            f"on rows {trained[0]}-{trained[1] - 1}, model.json training.data): calibration rows must be "
            "held out, so choose fit.start and fit.size outside them"
        )
    return []


def _held_out_note(source: CorpusSource) -> str:
    if isinstance(source, HeldOutSplit):
        return f" held out of training ({source.rule.fraction:g} of its rows, by a hash of (seed, row id))"
    return f" from row {source.start}"


def start_reducer(num_features: int) -> ray.actor.ActorHandle:
    # no restarts: a restarted actor would come back empty; the driver recomputes from Parquet instead
    return ray.remote(FitReducer).options(num_cpus=0, max_restarts=0).remote(num_features)


def _reduced_moments(
    reducer: ray.actor.ActorHandle,
    n_shards: int,
    features_uri: str,
    layer_names: list[str],
    min_sqnorm: float,
) -> Moments:
    try:
        merged = ray.get(reducer.result.remote())
        if len(merged["shards"]) != n_shards:
            raise RuntimeError(f"reducer saw {len(merged['shards'])} of {n_shards} shards")
        return Moments.from_dict(merged["moments"])
    except (ray.exceptions.RayActorError, RuntimeError) as err:
        progress(
            f"reducer result unavailable ({type(err).__name__}: {err}); "
            f"recomputing the fit from {features_uri}"
        )
        return moments_from_parquet(features_uri, layer_names, min_sqnorm)
    finally:
        ray.kill(reducer)


def fit_detector(
    cfg: ScoreCorpusConfig, out: str, weights: bytes, model_meta: dict[str, Any], layer_names: list[str]
) -> dict[str, Any]:
    source = fit_source(cfg.fit, model_meta)
    progress(f"fit set: {source.num_rows()} rows of {source.uri}" + _held_out_note(source))
    warnings = fit_set_warnings(model_meta, source)
    for warning in warnings:
        progress(f"WARNING: {warning}")
    reducer = start_reducer(len(layer_names) + len(EXTRACTED_COLUMNS))
    fit_out = storage.join(out, "fit")

    def send(summary: dict[str, Any]) -> None:
        reducer.add.remote(int(summary["shard"]), summary["moments"])

    totals = run_extraction(
        "fit-set features",
        source,
        fit_out,
        weights,
        model_meta,
        cfg,
        on_shard=send,
        calibration_fraction=cfg.fit.calibration_fraction,
        part_2_fraction=cfg.fit.part_2_fraction,
    )
    features_uri = storage.join(fit_out, "features")
    moments = _reduced_moments(reducer, totals.shards, features_uri, layer_names, cfg.fit.min_sqnorm)
    table = storage.read_parquet(features_uri)
    incomplete = int(pc.sum(pc.equal(table.column(SPLIT_COLUMN), INCOMPLETE_SET_SPLIT)).as_py() or 0)
    calibration = table.filter(pc.greater(table.column(SPLIT_COLUMN), 0))
    x = feature_matrix(calibration, layer_names, cfg.fit.min_sqnorm)
    part = calibration.column(SPLIT_COLUMN).to_numpy()
    if moments.count < 2 or not ((part == 1).any() and (part == 2).any()):
        raise ValueError(
            f"fit set too small: {moments.count} fit rows and {int((part == 1).sum())} + "
            f"{int((part == 2).sum())} calibration rows; raise fit.size or change fit.calibration_fraction"
        )
    suite = DetectorSuite(
        components=tuple(c.value for c in cfg.detect.components),
        combination=cfg.detect.combination.value,
        min_std=cfg.fit.min_std,
        calibration_fraction=cfg.fit.calibration_fraction,
        part_2_fraction=cfg.fit.part_2_fraction,
        random_state=cfg.seed,
    ).fit_parts(
        moments,
        x[part == 1],
        x[part == 2],
        suite_feature_names(layer_names, calibration),
        [str(i) for i, k in zip(calibration.column("id").to_pylist(), part, strict=True) if k == 2],
    )
    paper = suite.tests_["paper"]
    dropped = [n for n, kept in zip(layer_names, np.asarray(paper.kept_, bool), strict=True) if not kept]
    progress(
        f"detector fitted on {moments.count} feature rows, calibrated on {suite.n_calibration_[0]} + "
        f"{suite.n_calibration_[1]} ({totals.rows_scored} images, {totals.rows_rejected} rejected); "
        f"{len(dropped)} of {len(layer_names)} layers dropped for zero variance"
        + (f"; {incomplete} incomplete sets left out of fit and calibration" if incomplete else "")
    )
    return {
        "format_version": DETECTOR_FORMAT,
        "gradood_version": gradood.__version__,
        "model_fingerprint": model_meta["fingerprint"],
        "model": {"name": model_meta["model"], "params": model_meta["params"]},
        "group_size": cfg.extract.group_size,
        "method": cfg.extract.method,
        "fit": {
            **fit_settings(cfg),
            "source": source.describe(),
            "n_rows": totals.rows_scored,
            "n_rejected": totals.rows_rejected,
            "n_feature_rows": table.num_rows,
            "n_fit_rows": int(moments.count),
            "n_calibration_rows": list(suite.n_calibration_),
            "n_incomplete_sets": incomplete,
            "warnings": warnings,
        },
        "layers": layer_names,
        "dropped_layers": dropped,
        "suite": suite.to_dict(),
    }


def load_or_fit_detector(
    cfg: ScoreCorpusConfig, out: str, weights: bytes, model_meta: dict[str, Any], layer_names: list[str]
) -> dict[str, Any]:
    uri = storage.absolute(cfg.output.detector_uri or storage.join(out, "detector.json"))
    if storage.exists(uri) and not cfg.fit.refit:
        detector = storage.read_json(uri)
        check_detector(detector, model_meta["fingerprint"], cfg.extract.group_size, uri)
        if {k: v for k, v in detector["fit"].items() if k in fit_settings(cfg)} != fit_settings(cfg):
            raise ValueError(
                f"detector {uri} was fitted with other fit.* or detect.* settings: rerun with fit.refit=true"
            )
        progress(f"reusing detector {uri} (fitted on {detector['fit']['n_rows']} rows)")
        return detector
    storage.write_json(uri, fit_detector(cfg, out, weights, model_meta, layer_names))
    progress(f"detector written to {uri}")
    # the run that fits uses the detector as later runs will read it (the same key order, so the
    # same columns in the same order, and the same numbers), wherever it is stored
    return storage.read_json(uri)
