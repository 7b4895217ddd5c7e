"""The result tables of ``docs/results.md``, generated from the measurements so they cannot drift.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in the document and is
rebuilt from the grid's Parquet output (``metrics``, ``nights_summary``, ``calibration``; the copies in
``docs/results/grid/``) and the benchmarks' JSON (``benchmarks/results/``)::

    python -m gradood.evaluation.docs_tables                       # rewrite docs/results.md
    python -m gradood.evaluation.docs_tables --grid runs/evaluate  # first copy a new grid's output in
    python -m gradood.evaluation.docs_tables --check               # exit 1 if the document is stale
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gradood.evaluation.grid import DEFAULT_TEST

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "results.md"
GRID_DIR = ROOT / "docs" / "results" / "grid"
BENCH_DIR = ROOT / "benchmarks" / "results"
GRID_FILES = ("metrics", "nights_summary", "calibration")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)
MODEL_NAMES = {"glow": "Glow", "ddpm": "DDPM", "vae": "VAE", "pixelcnn": "PixelCNN"}
AUROC_COLUMNS = {  # test -> column title, B=1 then B=5
    "combined": "combined (default, adaptive)",
    "combined_fisher": "Fisher, fixed",
    "paper": "paper",
    "typicality": "typicality",
    "fullcov": "fullcov",
    "complexity": "complexity",
}
B5_COLUMNS = {"combined": "B=5 combined", "paper": "B=5 paper", "typicality": "B=5 typicality"}
TEST_TITLES = {
    "combined": "combined (default, adaptive)",
    "combined_fisher": "combined, fixed Fisher",
    "combined_tippett": "combined, Tippett",
    "combined_all": "combined, all seven",
    "bergamin": "Bergamin et al.",
}


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table; the first ``left`` columns are text, the rest right-aligned numbers."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines) + "\n"


def bold_best(values: Sequence[float], digits: int = 3) -> list[str]:
    """Values to ``digits`` decimals, the largest (after rounding, ties included) in bold."""
    shown = [f"{v:.{digits}f}" if np.isfinite(v) else "–" for v in values]
    best = max((float(s) for s in shown if s != "–"), default=None)
    return [f"**{s}**" if s != "–" and float(s) == best else s for s in shown]


def _source_label(source: str, far: bool) -> str:
    return source if far else f"{source} (near)"


def grid_auroc(metrics: pd.DataFrame) -> str:
    """AUROC per family and OOD source; far-OOD sources first, the best B=1 column in bold."""
    auroc = metrics.set_index(["family", "group_size", "source", "test"])["auroc"]
    sources = metrics.drop_duplicates("source").sort_values("far_ood", ascending=False, kind="stable")
    header = ["family", "OOD source", *AUROC_COLUMNS.values(), *B5_COLUMNS.values()]
    rows = []
    for family in metrics["family"].unique():
        for k, (source, far) in enumerate(zip(sources["source"], sources["far_ood"], strict=True)):
            b1 = [auroc.get((family, 1, source, d), np.nan) for d in AUROC_COLUMNS]
            b5 = [auroc.get((family, 5, source, d), np.nan) for d in B5_COLUMNS]
            label = family if k == 0 else ""
            rows.append([label, _source_label(source, far), *bold_best(b1), *(f"{v:.3f}" for v in b5)])
    return markdown(header, rows, left=2)


def grid_far_means(metrics: pd.DataFrame) -> str:
    """Mean B=1 AUROC over the far-OOD sources, every test, the best per family in bold."""
    far = metrics[metrics["far_ood"] & (metrics["group_size"] == 1)]
    means = far.pivot_table(index="family", columns="test", values="auroc", aggfunc="mean", sort=False)
    tests = [DEFAULT_TEST] + [d for d in means.columns if d != DEFAULT_TEST]
    singles = sorted(d for d in tests if d not in TEST_TITLES)
    order = [DEFAULT_TEST, *singles, *(d for d in TEST_TITLES if d in tests[1:])]
    header = ["family", *(TEST_TITLES.get(d, d) for d in order)]
    rows = [[family, *bold_best([means.loc[family, d] for d in order])] for family in means.index]
    return markdown(header, rows)


def _default_bh(nights: pd.DataFrame) -> pd.DataFrame:
    return nights[(nights["test"] == DEFAULT_TEST) & (nights["method"] == "bh")]


def nights_power(nights: pd.DataFrame) -> str:
    """The default test's mean BH power by OOD share, and its TPR at FPR 0.1 % / 1 % at 5 %."""
    default = _default_bh(nights)
    prevalences = sorted(default["prevalence"].unique())
    header = ["family", "OOD source", *(f"{100 * p:g} %" for p in prevalences),
              "TPR@FPR 0.1 % (at 5 %)", "TPR@FPR 1 % (at 5 %)"]  # fmt: skip
    rows = []
    for family, per_family in default.groupby("family", sort=False):
        for k, (source, group) in enumerate(per_family.groupby("source", sort=False)):
            by = group.set_index("prevalence")
            at_5 = by.loc[0.05] if 0.05 in by.index else None
            tpr = [np.nan if at_5 is None else at_5[f"mean_tpr_at_fpr_{f}"] for f in ("0.001", "0.01")]
            powers = [f"{by.loc[p, 'mean_power']:.2f}" for p in prevalences]
            rows.append([family if k == 0 else "", source, *powers, *(f"{v:.2f}" for v in tpr)])
    return markdown(header, rows, left=2)


def nights_fdp(nights: pd.DataFrame) -> str:
    """Mean false-discovery proportion over the far-OOD sources, per family, test and method."""
    kinds = {("combined", "bh"): "default, BH", ("combined", "storey"): "default, Storey",
             ("combined_fisher", "bh"): "fixed Fisher, BH"}  # fmt: skip
    prevalences = sorted(nights["prevalence"].unique())
    header = ["family", "method", *(f"{100 * p:g} %" for p in prevalences)]
    rows = []
    for family, per_family in nights.groupby("family", sort=False):
        for (test, method), title in kinds.items():
            chosen = per_family[(per_family["test"] == test) & (per_family["method"] == method)]
            if chosen.empty:
                continue
            fdp = chosen.groupby("prevalence")["mean_fdp"].mean()
            rows.append([family, title, *(f"{fdp[p]:.3f}" for p in prevalences)])
    return markdown(header, rows, left=2)


def calibration(table: pd.DataFrame) -> str:
    """Share of held-out ID rows with p <= alpha at B=1: the range over tests x families, and the
    default's range over families."""
    b1 = table[table["group_size"] == 1]
    rows = []
    for alpha, group in b1.groupby("alpha"):
        default = group[group["test"] == DEFAULT_TEST]["rate"]
        rows.append([f"{alpha:g}", f"{group['rate'].min():.3f}–{group['rate'].max():.3f}",
                     f"{default.min():.3f}–{default.max():.3f}", str(int(group["n_id"].max()))])  # fmt: skip
    header = ["α", "every test × family", "default test", "held-out ID rows"]
    return markdown(header, rows)


def _engine_and(records: list[dict], methods: Sequence[str]) -> dict[tuple[str, str], dict[str, dict]]:
    """(model, config) -> method -> record, in the file's order."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        if record["method"] in methods:
            out.setdefault((record["model"], record["config"]), {})[record["method"]] = record
    return out


def feature_throughput(records: list[dict]) -> str:
    """The engine against vmap and the per-sample loop, relative to one plain forward+backward."""
    header = ["model", "config", "engine (time × plain)", "engine mem × plain", "vmap", "loop",
              "engine vs vmap", "engine vs loop", "engine max rel err"]  # fmt: skip
    rows = []
    for (model, config), by in _engine_and(records, ("engine", "vmap", "loop")).items():
        e = by["engine"]
        rows.append([MODEL_NAMES.get(model, model), config, f"**{e['ratio_vs_plain']:.2f}**",
                     f"{e['peak_mem_ratio_vs_plain']:.2f}", f"{by['vmap']['ratio_vs_plain']:.2f}",
                     f"{by['loop']['ratio_vs_plain']:.2f}", f"{e['speedup_vs_vmap']:.2f}×",
                     f"{e['speedup_vs_loop']:.2f}×",
                     f"{e['max_rel_err']:.1e} ({e['max_rel_err_f64']:.0e})"])  # fmt: skip
    return markdown(header, rows, left=2)


def _external_cell(record: dict) -> str:
    error = record.get("error")
    if error is None:
        return (f"{record['ratio_vs_plain']:.2f} (mem {record['peak_mem_ratio_vs_plain']:.2f}, "
                f"err {record['max_rel_err']:.0e})")  # fmt: skip
    skipped = re.search(r"skips (\d+) parameter tensors", error)
    if skipped:
        return f"skips {skipped.group(1)} tensors"
    if "ActNorm" in error:
        return "fails (ActNorm buffer; custom layers)"
    return "fails: " + error.splitlines()[0][:60]


def feature_external(records: list[dict]) -> str:
    """The engine against Opacus and BackPACK."""
    header = ["model", "config", "engine (× plain)", "Opacus (× plain)", "BackPACK BatchL2Grad (× plain)"]
    rows = [
        [MODEL_NAMES.get(model, model), config, f"{by['engine']['ratio_vs_plain']:.2f}",
         _external_cell(by["opacus"]), _external_cell(by["backpack"])]
        for (model, config), by in _engine_and(records, ("engine", "opacus", "backpack")).items()
    ]  # fmt: skip
    return markdown(header, rows, left=2)


def pipeline_throughput(records: list[dict]) -> str:
    """A local Ray job against the in-process engine on the same images."""
    header = ["model", "rows", "shards", "in-process rows/s", "pipeline rows/s per busy worker-s",
              "ratio", "pipeline rows/s wall-clock"]  # fmt: skip
    rows = [[f"{MODEL_NAMES.get(r['model'], r['model'])} {r['config']}", f"{r['rows']:,}", str(r["shards"]),
             f"{r['in_process_rows_per_s']:.0f}", f"{r['pipeline_rows_per_s_per_worker']:.0f}",
             f"**{r['pipeline_vs_in_process']:.2f}×**", f"{r['pipeline_rows_per_s_wall']:.0f}"]
            for r in records]  # fmt: skip
    return markdown(header, rows)


def _rows_label(n: int) -> str:
    exponent = int(round(np.log10(n)))
    return f"10^{exponent}" if 10**exponent == n else f"{n:,}"


def scale_throughput(result: dict) -> str:
    """The whole job at 10^5 and 10^6 rows and with 1 and 2 workers."""
    models = {"cheap_glow_8x8": "cheap Glow 8×8", "glow_default": "Glow default"}
    header = ["model", "corpus", "rows", "workers", "wall rows/s", "steady rows/s", "driver peak RSS",
              "seconds: list / extract / score / total"]  # fmt: skip
    rows = []
    for r in result["records"]:
        s = r["seconds"]
        corpus = "Parquet" if r["source_kind"] == "parquet" else "folder"
        seconds = " / ".join(f"{s[k]:.1f}" for k in ("list_inputs", "extract", "score", "total"))
        rows.append([models.get(r["model"], r["model"]), corpus, _rows_label(r["rows"]), str(r["workers"]),
                     f"{r['rows_per_s']:,.0f}", f"{r['steady_rows_per_s']:,.0f}",
                     f"{r['driver_peak_rss_bytes'] / 2**20:.0f} MiB", seconds])  # fmt: skip
    return markdown(header, rows, left=2)


def scale_checks(result: dict) -> str:
    """The scale targets, measured against their thresholds."""
    c = result["checks"]
    rows = [
        ["driver peak RSS, 10^6 vs 10^5 rows, Parquet", f"{c['driver_rss_parquet']['ratio_1e6_vs_1e5']:.2f}×",
         f"≤ {c['driver_rss_parquet']['target']:g}×", _met(c["driver_rss_parquet"])],
        ["driver peak RSS, 10^6 vs 10^5 rows, folders", f"{c['driver_rss_folder']['ratio_1e6_vs_1e5']:.2f}×",
         f"≤ {c['driver_rss_folder']['target']:g}×", _met(c["driver_rss_folder"])],
        ["pipeline vs in-process engine, steady wall-clock per worker",
         f"{c['pipeline_vs_engine']['ratio']:.2f}×", f"≥ {c['pipeline_vs_engine']['target']:g}×",
         _met(c["pipeline_vs_engine"])],
        ["pipeline vs in-process engine, per busy worker-second",
         f"{c['pipeline_vs_engine']['busy_ratio']:.2f}×", f"≥ {c['pipeline_vs_engine']['target']:g}×",
         _met(c["pipeline_vs_engine"])],
        ["2 workers vs 1, steady wall-clock", f"{c['two_workers']['speedup']:.2f}×",
         f"≥ {c['two_workers']['target']:g}×", _met(c["two_workers"])],
        ["2 engine processes without Ray vs 1 (same run)",
         f"{c['two_workers']['two_engine_processes_without_ray']:.2f}×", "", ""],
    ]  # fmt: skip
    return markdown(["target", "measured", "threshold", "met"], rows)


#: the low-prevalence benchmark's runs in the candidates table, file -> what part 1 and part 2 are
LOW_PREVALENCE_RUNS = {
    "low_prevalence_selection_grid_pool": "grid pool",
    "low_prevalence_selection_mixed": "both splits",
}
LOW_PREVALENCE_STATISTICS = (
    "default", "complexity", "classifier", "classifier_leaf10", "classifier_crossfit", "selected",
)  # fmt: skip


def low_prevalence_candidates(results: dict[str, dict]) -> str:
    """Mean BH power per night statistic on the VAE's 1 % and 5 % nights, and the statistic the
    ``selected`` rule took on each draw."""
    header = ["pool (part 1 / part 2 rows)", "OOD source", "share", *LOW_PREVALENCE_STATISTICS]
    header.append("selected took")
    rows = []
    for name, label in LOW_PREVALENCE_RUNS.items():
        result = results[name]
        by_night: dict[tuple, dict] = {}
        for r in result["results"]:
            by_night.setdefault((r["calibration_rows"], r["source"], r["share"]), {})[r["statistic"]] = r
        for (n_cal, source, share), stats in by_night.items():
            took = ", ".join(f"{k} {v}" for k, v in sorted(stats["selected"]["selected_tails"].items()))
            rows.append([f"{label} ({result['part_1_rows']:,} / {n_cal:,})", source, f"{100 * share:g} %",
                         *(f"{stats[s]['power']:.2f}" for s in LOW_PREVALENCE_STATISTICS), took])  # fmt: skip
    return markdown(header, rows, left=2)


def _met(check: dict) -> str:
    return "yes" if check["met"] else "**no**"


def _json(name: str) -> Callable[[Path, Path], object]:
    return lambda grid, bench: json.loads((bench / f"{name}.json").read_text())


def _low_prevalence(grid: Path, bench: Path) -> dict[str, dict]:
    return {name: _json(name)(grid, bench) for name in LOW_PREVALENCE_RUNS}


def _parquet(name: str) -> Callable[[Path, Path], object]:
    return lambda grid, bench: pd.read_parquet(grid / f"{name}.parquet")


TABLES: dict[str, tuple[Callable[[Path, Path], object], Callable]] = {
    "grid-auroc": (_parquet("metrics"), grid_auroc),
    "grid-far-means": (_parquet("metrics"), grid_far_means),
    "nights-power": (_parquet("nights_summary"), nights_power),
    "nights-fdp": (_parquet("nights_summary"), nights_fdp),
    "calibration": (_parquet("calibration"), calibration),
    "feature-throughput": (_json("feature_throughput_cpu"), feature_throughput),
    "feature-external": (_json("feature_throughput_external_cpu"), feature_external),
    "pipeline-throughput": (_json("pipeline_throughput_cpu"), pipeline_throughput),
    "scale-throughput": (_json("scale_throughput_cpu"), scale_throughput),
    "scale-checks": (_json("scale_throughput_cpu"), scale_checks),
    "low-prevalence-candidates": (_low_prevalence, low_prevalence_candidates),
}


def fill(text: str, grid: Path = GRID_DIR, bench: Path = BENCH_DIR) -> str:
    """``text`` with every marked table rebuilt; an unknown marker or a table without one is an error."""
    found = {m.group("name") for m in MARKER.finditer(text)}
    if unknown := found - TABLES.keys():
        raise ValueError(f"unknown table markers: {sorted(unknown)}; known: {sorted(TABLES)}")
    if missing := TABLES.keys() - found:
        raise ValueError(f"tables without a marker in the document: {sorted(missing)}")

    def rebuild(m: re.Match) -> str:
        load, render = TABLES[m.group("name")]
        return m.group(1) + render(load(grid, bench)) + m.group(4)

    return MARKER.sub(rebuild, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, help="a grid output folder (jobs/evaluate.py) to copy in first")
    parser.add_argument("--check", action="store_true", help="exit 1 if the document is not up to date")
    parser.add_argument("--document", type=Path, default=DOCUMENT)
    args = parser.parse_args(argv)
    if args.grid is not None:
        GRID_DIR.mkdir(parents=True, exist_ok=True)
        for name in GRID_FILES:
            shutil.copyfile(args.grid / f"{name}.parquet", GRID_DIR / f"{name}.parquet")
    text = args.document.read_text()
    updated = fill(text)
    if args.check:
        if updated != text:
            print(f"{args.document} is stale: run python -m gradood.evaluation.docs_tables", file=sys.stderr)
            return 1
        return 0
    args.document.write_text(updated)
    print(f"{args.document}: {len(TABLES)} tables rebuilt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
