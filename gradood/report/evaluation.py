"""The evaluation-grid report: which test separates ID from OOD rows, per model family and group size.

One document model (sections of text, tables and figures) renders to both Markdown and a self-contained
HTML page, so the two always hold the same numbers.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from gradood.report.html import (
    html_list,
    html_page,
    html_table,
    markdown_escape,
    markdown_table,
    png_data_uri,
    save_figure,
)

METRIC_COLUMNS = (
    "family", "group_size", "source", "far_ood", "test", "auroc", "aupr_in", "aupr_out",
    "fpr_at_95_tpr", "n_id", "n_ood", "flag_fdr", "flag_power", "n_flagged",
)  # fmt: skip
CALIBRATION_COLUMNS = ("family", "group_size", "test", "alpha", "rate", "n_id")
SCORE_COLUMNS = ("family", "group_size", "test", "source", "is_ood", "ood_score", "p_value")

# (column, table caption, higher is better)
_PER_SOURCE_METRICS = (
    ("auroc", "AUROC (OOD positive, higher is better)", True),
    ("fpr_at_95_tpr", "FPR@95 (ID positive, lower is better)", False),
    ("aupr_in", "AUPR-In (ID positive, higher is better)", True),
    ("aupr_out", "AUPR-Out (OOD positive, higher is better)", True),
)


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[Any]]
    bold: set[tuple[int, int]]
    caption: str


@dataclass(frozen=True)
class _Figure:
    filename: str
    data_uri: str
    caption: str


@dataclass(frozen=True)
class _Code:
    text: str


@dataclass(frozen=True)
class _Bullets:
    items: list[str]


_Block = str | _Code | _Bullets | _Table | _Figure


def _require(table: pa.Table, columns: Sequence[str], name: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{name} table lacks columns: {', '.join(missing)}")
    if table.num_rows == 0:
        raise ValueError(f"{name} table is empty")
    return table.select(list(columns)).to_pandas()


def _ordered(values: Sequence[Any]) -> list[Any]:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


def _best(values: Sequence[float | None], higher_better: bool) -> set[int]:
    """Indices of every value equal to the best one (ties all count); None/NaN never win."""
    finite = {k: v for k, v in enumerate(values) if v is not None and not math.isnan(v)}
    if not finite:
        return set()
    target = (max if higher_better else min)(finite.values())
    return {k for k, v in finite.items() if v == target}


def _row_table(
    header: list[str], rows: list[tuple[list[Any], list[float | None]]], higher_better: bool, caption: str
) -> _Table:
    """Rows of (label cells, test values); the best test value of each row is bold."""
    bold: set[tuple[int, int]] = set()
    for i, (labels, values) in enumerate(rows):
        bold |= {(i, len(labels) + k) for k in _best(values, higher_better)}
    return _Table(header, [labels + values for labels, values in rows], bold, caption)


class _Grid:
    """The metrics table indexed by (family, group_size, source, test), with the report's orderings."""

    def __init__(self, metrics: pd.DataFrame, default_test: str):
        keys = ["family", "group_size", "source", "test"]
        dup = metrics.duplicated(keys)
        if dup.any():
            raise ValueError(f"metrics has duplicate rows for {metrics.loc[dup, keys].iloc[0].tolist()}")
        tests = _ordered(metrics["test"])
        if default_test not in tests:
            raise ValueError(f"default test {default_test!r} not in metrics tests {tests}")
        self.default = default_test
        self.tests = [default_test] + [d for d in tests if d != default_test]
        self.sources = _ordered(metrics["source"])
        self.far = dict(zip(metrics["source"], metrics["far_ood"].astype(bool), strict=True))
        self.cells = {tuple(r[k] for k in keys): r for r in metrics.to_dict("records")}
        self.groups = [
            (family, int(g))
            for family in _ordered(metrics["family"])
            for g in sorted(set(metrics.loc[metrics["family"] == family, "group_size"]))
        ]
        self.group_sources = {
            (f, g): [s for s in self.sources if any((f, g, s, d) in self.cells for d in self.tests)]
            for f, g in self.groups
        }

    def value(self, group: tuple[str, int], source: str, test: str, column: str) -> Any:
        row = self.cells.get((*group, source, test))
        return None if row is None else row[column]

    def header(self, *labels: str) -> list[str]:
        return [*labels, *(f"{d} (default)" if d == self.default else d for d in self.tests)]

    def marker(self, source: str) -> str:
        return "far" if self.far[source] else "near"


def _summary(grid: _Grid) -> _Table:
    rows = []
    for group in grid.groups:
        sources = grid.group_sources[group]
        for label, subset in (("far-OOD", [s for s in sources if grid.far[s]]), ("all OOD", sources)):
            means: list[float | None] = []
            for d in grid.tests:
                vals = [grid.value(group, s, d, "auroc") for s in subset]
                means.append(None if not vals or None in vals else sum(vals) / len(vals))
            rows.append(([group[0], group[1], f"{label} ({len(subset)})"], means))
    caption = "Mean AUROC over OOD sources (\u2013 where a test lacks one of them)"
    return _row_table(grid.header("family", "group size", "sources"), rows, True, caption)


def _calibration_table(frame: pd.DataFrame) -> _Table:
    """Rows (family, group size, test), one column per alpha: the empirical P(p <= alpha) on ID rows."""
    alphas = sorted(set(frame["alpha"]))
    cells = {(r["family"], int(r["group_size"]), r["test"], r["alpha"]): r for r in frame.to_dict("records")}
    rows = []
    for family, group_size, test in dict.fromkeys(
        zip(frame["family"], frame["group_size"], frame["test"], strict=True)
    ):
        found = [cells.get((family, int(group_size), test, a)) for a in alphas]
        n_id = next(r["n_id"] for r in found if r is not None)
        rows.append([family, int(group_size), test, n_id, *(None if r is None else r["rate"] for r in found)])
    header = ["family", "group size", "test", "ID rows", *(f"P(p <= {a:g})" for a in alphas)]
    caption = (
        "Share of held-out in-distribution rows with p-value <= alpha (valid: at most alpha, up to noise)"
    )
    return _Table(header, rows, set(), caption)


def _per_source(grid: _Grid, group: tuple[str, int], fdr_target: float) -> list[_Table]:
    sources = grid.group_sources[group]
    tables = []
    for column, caption, higher_better in _PER_SOURCE_METRICS:
        rows = [([s, grid.marker(s)], [grid.value(group, s, d, column) for d in grid.tests]) for s in sources]
        tables.append(_row_table(grid.header("source", "near/far"), rows, higher_better, caption))
    flag_cols = ["n_id", "n_ood", "n_flagged", "flag_fdr", "flag_power"]
    flags = [
        [s, grid.marker(s), d, *(grid.value(group, s, d, c) for c in flag_cols)]
        for s in sources
        for d in grid.tests
        if (*group, s, d) in grid.cells
    ]
    header = ["source", "near/far", "test", "ID rows", "OOD rows", "flagged", "empirical FDR", "power"]
    tables.append(_Table(header, flags, set(), f"Benjamini-Hochberg flags at FDR target {fdr_target:g}"))
    return tables


def _roc_figure(grid: _Grid, group: tuple[str, int], scores: pd.DataFrame) -> Figure:
    """One subplot per OOD source, one curve per test (ID rows + that source's rows, OOD positive)."""
    sources = grid.group_sources[group]
    ncols = min(3, len(sources))
    nrows = math.ceil(len(sources) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, source in zip(axes, sources, strict=False):
        for k, d in enumerate(grid.tests):
            rows = scores[(scores["test"] == d) & (~scores["is_ood"] | (scores["source"] == source))]
            y = rows["is_ood"].to_numpy(bool)
            if y.all() or not y.any():  # a curve needs both ID and OOD rows
                continue
            fpr, tpr, _ = roc_curve(y, rows["ood_score"].to_numpy(float))
            width = 2.6 if d == grid.default else 1.2
            ax.plot(fpr, tpr, color=f"C{k}", lw=width, label=f"{d} (AUROC {auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), title=f"{source} ({grid.marker(source)})")
        ax.set(xlabel="false positive rate (ID rows flagged)", ylabel="true positive rate (OOD rows flagged)")
        ax.legend(loc="lower right", fontsize="small")
    for ax in axes[len(sources) :]:
        ax.set_visible(False)
    fig.suptitle(f"ROC curves: {group[0]}, group size {group[1]}")
    return fig


def _figure_name(group: tuple[str, int], used: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", group[0]).strip("-.") or "family"
    name, k = f"roc_{slug}_g{group[1]}.png", 2
    while name in used:
        name, k = f"roc_{slug}_g{group[1]}_{k}.png", k + 1
    used.add(name)
    return name


def _intro(command: str, grid: _Grid, id_sources: list[str], fdr_target: float) -> list[_Block]:
    return [
        "Produced by:",
        _Code(command),
        _Bullets(
            [
                f"Scores: higher = more OOD. ID rows: {', '.join(id_sources)}; every other source is OOD.",
                "AUROC: OOD rows positive; P(s_OOD > s_ID) + 1/2 P(s_OOD = s_ID). 0.5 is chance.",
                "FPR@95: ID rows positive; the threshold is set on ID rows alone to accept 95% of them; "
                "the value is the share of OOD rows also accepted (lower is better).",
                "AUPR-In: average precision with ID rows positive (ranked by -score). "
                "AUPR-Out: average precision with OOD rows positive (ranked by score).",
                f"Flags: Benjamini-Hochberg on the p-values at FDR target {fdr_target:g}, on each OOD source "
                "mixed with the ID rows. Empirical FDR = share of flagged rows that are ID (\u2013 when "
                "nothing was flagged); power = share of OOD rows flagged.",
                f"Default test: {grid.default} (first test column, marked '(default)'). "
                "Bold: the best test in each row (all tied values). near/far: near- or far-OOD source.",
            ]
        ),
    ]


def _html_block(block: _Block) -> str:
    if isinstance(block, _Table):
        return html_table(block.header, block.rows, bold=block.bold, caption=block.caption)
    if isinstance(block, _Figure):
        caption = html.escape(block.caption)
        return (
            f'<figure><img src="{block.data_uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
        )
    if isinstance(block, _Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, _Bullets):
        return html_list(block.items)
    return f"<p>{html.escape(block)}</p>"


def _markdown_block(block: _Block) -> str:
    if isinstance(block, _Table):
        table = markdown_table(block.header, block.rows, block.bold)
        return f"**{markdown_escape(block.caption)}**\n\n{table}"
    if isinstance(block, _Figure):
        return f"{markdown_escape(block.caption)}: [{block.filename}]({block.filename})"
    if isinstance(block, _Code):
        fence = "```"
        while fence in block.text:
            fence += "`"
        return f"{fence}\n{block.text}\n{fence}"
    if isinstance(block, _Bullets):
        return "\n".join(f"- {markdown_escape(item)}" for item in block.items)
    return markdown_escape(block)


def write_evaluation_report(
    metrics: pa.Table,
    scores: pa.Table,
    out_dir: str,
    *,
    title: str,
    command: str,
    default_test: str,
    fdr_target: float,
    notes: Sequence[str] = (),
    calibration: pa.Table | None = None,
) -> dict[str, str | list[str]]:
    """Write report.md, report.html (figures inline) and one ROC PNG per (family, group_size) to out_dir.

    ``calibration`` (family, group_size, test, alpha, rate, n_id): the share of held-out ID rows with
    p <= alpha per test, shown as one table after the summary.

    Returns {"markdown": path, "html": path, "figures": [paths]}.
    """
    grid = _Grid(_require(metrics, METRIC_COLUMNS, "metrics"), default_test)
    score_df = _require(scores, SCORE_COLUMNS, "scores")
    score_df["is_ood"] = score_df["is_ood"].astype(bool)
    by_group = {(f, int(g)): sub for (f, g), sub in score_df.groupby(["family", "group_size"], sort=False)}
    id_sources = _ordered(score_df.loc[~score_df["is_ood"], "source"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, list[_Block]]] = [("Summary", [_summary(grid)])]
    if calibration is not None:
        sections.append(
            ("Calibration", [_calibration_table(_require(calibration, CALIBRATION_COLUMNS, "calibration"))])
        )
    figures: list[str] = []
    used: set[str] = set()
    for group in grid.groups:
        fig = _roc_figure(grid, group, by_group.get(group, score_df.iloc[:0]))
        name = _figure_name(group, used)
        uri = png_data_uri(save_figure(fig, out / name))
        figures.append(str(out / name))
        heading = f"{group[0]}, group size {group[1]}"
        caption = f"ROC curves for {heading} (legend AUROC from the scores table)"
        sections.append((heading, [*_per_source(grid, group, fdr_target), _Figure(name, uri, caption)]))
    if notes:
        sections.append(("Notes", [_Bullets(list(notes))]))
    intro = _intro(command, grid, id_sources, fdr_target)

    md = [f"# {markdown_escape(title)}", *map(_markdown_block, intro)]
    for heading, blocks in sections:
        md += [f"## {markdown_escape(heading)}", *map(_markdown_block, blocks)]
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n\n".join(md) + "\n", encoding="utf-8")
    page = html_page(
        title,
        [(heading, "\n".join(map(_html_block, blocks))) for heading, blocks in sections],
        intro="\n".join(map(_html_block, intro)),
    )
    html_path.write_text(page, encoding="utf-8")
    return {"markdown": str(md_path), "html": str(html_path), "figures": figures}
