"""``jobs/analyse.py`` on Ray: features of the fit set and of a corpus of public sources at every group
size through the pipeline's extraction (:func:`gradood.pipeline.extract.run_extraction`), then the
analyses (:mod:`.results`) and the report (:mod:`.report`) on the driver."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradood.analysis.config import AnalyseConfig, to_plain
from gradood.analysis.results import (
    FeatureSet,
    fisher_analysis,
    invariance_analysis,
    layer_analyses,
    read_features,
)
from gradood.config import ScoreCorpusConfig, to_yaml
from gradood.core import storage
from gradood.core.progress import progress
from gradood.core.ray_runtime import init_ray
from gradood.data.demo import DEMO_ID_SOURCE, build_image_corpus
from gradood.data.images import ImageConverter
from gradood.data.sources import load_all, open_source
from gradood.features import feature_layer_names
from gradood.models.checkpoint import WEIGHTS_FILE, checkpoint_exists, model_from_bytes, read_checkpoint_meta
from gradood.pipeline.extract import run_extraction
from gradood.pipeline.fit import fit_source


def rows_multiple(rows: int, group_sizes: list[int]) -> int:
    """``rows`` rounded down to a multiple of every group size, so groups never span two sources."""
    step = math.lcm(*group_sizes)
    if rows < step:
        raise ValueError(f"{rows} rows per source are fewer than lcm(group sizes) = {step}")
    return rows - rows % step


def build_corpus(cfg: AnalyseConfig, out: str) -> tuple[str, dict[str, int]]:
    """``OUT/corpus/id/fashion_mnist`` (held-out test rows from id_start) and ``OUT/corpus/ood/<source>``
    (FashionMNIST-derived sources use the rows after the ID block, so no image appears twice)."""
    a = cfg.analyse
    n_id, n_ood = rows_multiple(a.id_rows, a.group_sizes), rows_multiple(a.rows_per_source, a.group_sizes)
    root = Path(out) / "corpus"
    ids = build_image_corpus(root / "id", [DEMO_ID_SOURCE], n_id, seed=cfg.seed, id_start=a.id_start)
    ood = build_image_corpus(root / "ood", a.sources, n_ood, seed=cfg.seed, id_start=a.id_start + n_id)
    return str(root), {**ids["counts"], **ood["counts"]}


def extraction_config(cfg: AnalyseConfig, group_size: int) -> ScoreCorpusConfig:
    return ScoreCorpusConfig(
        seed=cfg.seed,
        model=cfg.model,
        image=cfg.image,
        fit=cfg.fit,
        extract=dataclasses.replace(cfg.extract, group_size=group_size),
        ray=cfg.ray,
    )


def load_model(cfg: AnalyseConfig) -> tuple[Any, bytes, dict[str, Any], str]:
    ckpt = storage.absolute(cfg.model.checkpoint)
    if not checkpoint_exists(ckpt):
        raise FileNotFoundError(
            f"no checkpoint at model.checkpoint={cfg.model.checkpoint}: train one first "
            f"(python jobs/train.py model={cfg.model.name})"
        )
    weights = (Path(ckpt) / WEIGHTS_FILE).read_bytes()
    model, meta = model_from_bytes(weights, read_checkpoint_meta(ckpt))
    return model, weights, meta, ckpt


def held_out_rows(
    cfg: AnalyseConfig, model: Any, meta: dict[str, Any], n: int
) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` fit-set rows decoded in-process (FIM over data, the invariance check)."""
    source = fit_source(cfg.fit, meta, n)
    converter = ImageConverter.for_model(model, **dataclasses.asdict(cfg.image))
    rows = load_all(source, converter)
    return torch.from_numpy(np.asarray(rows.images, np.float32)), list(rows.ids)


def run_analysis(cfg: AnalyseConfig, command: str = "python jobs/analyse.py") -> dict[str, Any]:
    """Everything under ``output.uri``: report.html, report.md, analysis.json, PNGs, run.yaml, features."""
    from gradood.analysis.report import write_report

    t_start = time.perf_counter()
    out = storage.absolute(cfg.output.uri)
    Path(out).mkdir(parents=True, exist_ok=True)
    storage.write_text(storage.join(out, "run.yaml"), to_yaml(cfg))
    model, weights, meta, ckpt = load_model(cfg)
    layer_names = feature_layer_names(model)
    progress(
        f"analyse: model {meta['model']} {meta['fingerprint'][:12]} from {ckpt}: {len(layer_names)} layers"
    )
    ex = cfg.extract
    init_ray(cfg.ray.num_cpus, ex.num_workers * ex.cpus_per_worker + 1)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    corpus_uri, counts = build_corpus(cfg, out)
    extractions = {"fit": (fit_source(cfg.fit, meta), 1)} | {
        f"corpus_b{b}": (open_source(corpus_uri), b) for b in cfg.analyse.group_sizes
    }
    rejected: dict[str, int] = {}
    for name, (source, b) in extractions.items():
        totals = run_extraction(
            f"{name} features", source, storage.join(out, name), weights, meta, extraction_config(cfg, b)
        )
        rejected[name] = totals.rows_rejected
    seconds["extract"] = time.perf_counter() - t0

    torch.set_num_threads(os.cpu_count() or 1)  # the Ray workers are idle now
    t0 = time.perf_counter()
    fit = read_features(storage.join(out, "fit", "features"), layer_names, by_folder=False)
    corpus: dict[int, FeatureSet] = {}
    for b in cfg.analyse.group_sizes:
        feats = read_features(storage.join(out, f"corpus_b{b}", "features"), layer_names, by_folder=True)
        corpus[b] = feats.select(np.array([s is not None for s in feats.sources]))
    layer_results = layer_analyses(cfg, layer_names, fit, corpus)
    seconds["layer_statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_data = max(cfg.analyse.fisher_samples, cfg.analyse.invariance_rows)
    data, data_ids = held_out_rows(cfg, model, meta, n_data)
    shown = layer_results["shown"]["separating"] + layer_results["shown"]["random"]
    fisher_results = fisher_analysis(cfg, model, data, data_ids, shown)
    seconds["fisher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    invariance_results = invariance_analysis(cfg, model, data, data_ids)
    seconds["invariance"] = time.perf_counter() - t0

    results = {
        "model": {"name": meta["model"], "fingerprint": meta["fingerprint"], "checkpoint": ckpt},
        "config": to_plain(cfg),
        "corpus": {"uri": corpus_uri, "counts": counts, "rejected": rejected},
        "layers": layer_results,
        "fisher": fisher_results,
        "invariance": invariance_results,
        "seconds": seconds,
    }
    t0 = time.perf_counter()
    paths = write_report(results, out, command)
    seconds["report"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    numbers = storage.read_json(paths["json"])
    storage.write_json(paths["json"], {**numbers, "seconds": seconds})  # now with the total
    progress(f"analyse: report {paths['html']} ({seconds['total']:.0f} s)")
    for line in paths["headline"]:
        progress(line)
    return {"output": out, "seconds": seconds, **paths}
