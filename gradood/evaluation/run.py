"""``jobs/evaluate.py``: run the grid, write metrics / scores / calibration Parquet and the report."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gradood.config import EvaluateConfig
from gradood.core import storage
from gradood.core.progress import progress
from gradood.core.ray_runtime import init_ray
from gradood.evaluation.grid import (
    DEFAULT_TEST,
    build_corpus,
    grid_rows,
    run_configs,
    run_test_scores,
)
from gradood.evaluation.nights import NightPool, night_metrics, summarise_nights
from gradood.pipeline.ray_job import run_score_corpus
from gradood.stats.conformal import Combination


def run_evaluation(cfg: EvaluateConfig, overrides: list[str], command: str) -> dict[str, Any]:
    out = storage.absolute(cfg.output.uri)
    Path(out).mkdir(parents=True, exist_ok=True)
    corpus, far, id_source = build_corpus(cfg, out)
    configs = run_configs(cfg, overrides, corpus, out)
    init_ray(configs[0].ray.num_cpus, configs[0].extract.num_workers * configs[0].extract.cpus_per_worker + 1)
    metrics, scores, validity, nights, seconds = [], [], [], [], {}
    for run_cfg in configs:
        family, group_size = run_cfg.model.name, run_cfg.extract.group_size
        t0 = time.perf_counter()
        progress(f"evaluate: {family}, group size {group_size}")
        run_summary = run_score_corpus(run_cfg)
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the Ray workers are idle while the driver scores
        rows, found, pool = run_test_scores(run_cfg, run_summary["output"], cfg.evaluate.bergamin)
        m, s, v = grid_rows(
            family, group_size, rows, found, far, cfg.evaluate.fdr, list(cfg.evaluate.alphas), id_source
        )
        if group_size == 1:
            progress(f"evaluate: {family}, realistic nights")
            nights += [{"family": family, **row} for row in realistic_nights(cfg, rows, far, pool, id_source)]
        metrics += m
        scores += s
        validity += v
        seconds[f"{family}_b{group_size}"] = time.perf_counter() - t0
    tables = {
        "nights": pa.Table.from_pandas(pd.DataFrame(nights), preserve_index=False),
        "metrics": pa.Table.from_pandas(pd.DataFrame(metrics), preserve_index=False),
        "scores": pa.Table.from_pandas(pd.concat(scores, ignore_index=True), preserve_index=False),
        "calibration": pa.Table.from_pandas(pd.DataFrame(validity), preserve_index=False),
    }
    for name, table in tables.items():
        storage.write_parquet(table, storage.join(out, f"{name}.parquet"))
    from gradood.report.evaluation import write_evaluation_report

    frame = tables["metrics"].to_pandas()
    ranking = family_ranking(frame)
    night_summary = summarise_nights(tables["nights"].to_pandas()) if nights else pd.DataFrame()
    if nights:
        storage.write_parquet(
            pa.Table.from_pandas(night_summary, preserve_index=False),
            storage.join(out, "nights_summary.parquet"),
        )
        storage.write_text(storage.join(out, "nights.md"), nights_markdown(night_summary, cfg.evaluate.fdr))
    notes = [
        f"Recommended family: {next(iter(ranking))} (mean B=1 AUROC of the default test over all OOD "
        "sources: " + ", ".join(f"{f} {v:.3f}" for f, v in ranking.items()) + ")",
        *source_notes(cfg, far),
        "Calibration: share of held-out in-distribution rows with p <= alpha, per test (table "
        "'calibration.parquet'; a valid p-value keeps it at or below alpha up to sampling error).",
    ]
    paths = write_evaluation_report(
        tables["metrics"],
        tables["scores"],
        out,
        title="gradood evaluation grid"
        if cfg.evaluate.id_uri is None
        else f"gradood evaluation: {cfg.evaluate.id_uri}",
        command=command,
        default_test=DEFAULT_TEST,
        fdr_target=cfg.evaluate.fdr,
        notes=notes,
        calibration=tables["calibration"],
    )
    summary = {"output": out, "seconds": seconds, "family_ranking": ranking, **paths}
    storage.write_json(storage.join(out, "summary.json"), summary)
    progress(f"evaluation report: {paths['html']} (markdown {paths['markdown']})")
    progress(notes[0])
    print_headline(frame)
    if nights:
        progress("realistic nights, default test, BH:\n" + nights_markdown(night_summary, cfg.evaluate.fdr))
    return summary


def realistic_nights(
    cfg: EvaluateConfig, rows: pd.DataFrame, far: dict[str, bool], pool: NightPool, id_source: str
) -> list[dict]:
    """Metric rows of the realistic nights of one B=1 run (every far-OOD source, every prevalence); an
    adaptive suite only, since a fixed one has no night to learn. A night has ``evaluate.night_rows``
    rows, or as many as the corpus has in-distribution rows when that is fewer."""
    if Combination(pool.suite.combination) is not Combination.adaptive:
        return []
    present = set(rows["source"])
    ev = cfg.evaluate
    far_sources = [name for name, is_far in far.items() if is_far and name in present]
    size = min(ev.night_rows, int((rows["source"] == id_source).sum()))
    return list(night_metrics(pool, far_sources, id_source, size, ev.night_draws, ev.fdr))


def nights_markdown(summary: pd.DataFrame, fdr: float) -> str:
    """Per family, far-OOD source and OOD share: the default test's BH power and FDP (mean ± std over
    draws), TPR at FPR 0.1 % / 1 %, and Storey's power and FDP."""
    default = summary[summary["test"] == DEFAULT_TEST]
    lines = [
        "| family | source | OOD share | BH power | BH FDP | Storey power | Storey FDP "
        "| TPR@FPR 0.1 % | TPR@FPR 1 % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (family, source, prevalence), group in default.groupby(
        ["family", "source", "prevalence"], sort=False
    ):
        by = {row["method"]: row for _, row in group.iterrows()}
        bh, storey = by["bh"], by["storey"]
        lines.append(
            f"| {family} | {source} | {100 * prevalence:g} % "
            f"| {bh['mean_power']:.2f} ± {bh['std_power']:.2f} "
            f"| {bh['mean_fdp']:.3f} | {storey['mean_power']:.2f} | {storey['mean_fdp']:.3f} "
            f"| {bh['mean_tpr_at_fpr_0.001']:.2f} | {bh['mean_tpr_at_fpr_0.01']:.2f} |"
        )
    return "\n".join(lines) + f"\n\n(q = {fdr:g}; {int(default['draws'].max())} draws per row)\n"


def source_notes(cfg: EvaluateConfig, far: dict[str, bool]) -> list[str]:
    """What the in-distribution and OOD rows are, when they are the user's own."""
    ev = cfg.evaluate
    if ev.id_uri is None:
        return []
    notes = [f"In-distribution rows: {ev.id_rows} at most of {ev.id_uri}."]
    if ev.ood:
        return notes + ["OOD sources: " + ", ".join(f"{name} ({uri})" for name, uri in ev.ood.items()) + "."]
    return notes + [
        "OOD sources: SYNTHETIC, derived from the in-distribution images ("
        + ", ".join(f"{name}: {'far' if is_far else 'near'}" for name, is_far in far.items())
        + "), as no OOD examples were given (evaluate.ood); examples of the images you expect give "
        "numbers closer to your nights."
    ]


def family_ranking(metrics: pd.DataFrame) -> dict[str, float]:
    b1 = metrics[(metrics["group_size"] == 1) & (metrics["test"] == DEFAULT_TEST)]
    means = b1.groupby("family", sort=False)["auroc"].mean().sort_values(ascending=False)
    return {str(k): float(v) for k, v in means.items()}


def print_headline(metrics: pd.DataFrame) -> None:
    """Per family and group size: mean AUROC over far-OOD sources of each test."""
    far = metrics[metrics["far_ood"]]
    table = far.pivot_table(index=["family", "group_size"], columns="test", values="auroc", aggfunc=np.mean)
    progress("mean AUROC over far-OOD sources:\n" + table.to_string(float_format=lambda v: f"{v:.3f}"))
