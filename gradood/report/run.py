"""``report.html`` of one screening run: what a person looks at in the morning.

Counts that reconcile (inputs = scored + rejected; skipped files with their reasons), what was flagged at
the stated false-discovery rate, the night-level drift test, thumbnails of the most OOD images with the
evidence behind each, score and p-value histograms per top-level folder, and the errors by reason.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from gradood.report.html import figure_data_uri, format_cell, html_page, html_table, image_data_uri

_THUMB_CSS = (
    "display:inline-block;vertical-align:top;width:11em;margin:.3em;padding:.3em;border:1px solid #ccc;"
    "font-size:.8em;word-break:break-all"
)


def error_reason(message: str) -> str:
    """The kind of an error message: its text before the first ':' (the rest names files, offsets)."""
    return message.split(":", 1)[0].strip() or message


def _counts(summary: Mapping[str, Any]) -> str:
    rows = [
        ["inputs", summary["inputs"]],
        ["scored", summary["scored"]],
        ["rejected (errors table)", summary["rejected"]],
        ["skipped (not inputs)", summary["skipped"]],
        [
            "feature rows" + (f" (sets of {summary['group_size']})" if summary["group_size"] > 1 else ""),
            summary["feature_rows"],
        ],
        [f"flagged at FDR {summary['fdr']:g} ({summary['fdr_method']})", summary["flagged"]],
        [
            "prevalence floor: the smallest share of OOD rows a night can be flagged at",
            _floor(summary.get("prevalence_floor")),
        ],
        ["incomplete sets (not flagged)", summary["incomplete_sets"]],
        ["shards resumed from an earlier attempt", summary["resumed_shards"]],
    ]
    table = html_table(["", "count"], rows, caption=f"Run {summary['run_id']}: test {summary['test']}")
    skipped = summary.get("skipped_reasons") or {}
    if skipped:
        table += html_table(["skipped because", "files"], sorted(skipped.items()), caption="Skipped files")
    by_driver = summary.get("flagged_by_driver") or {}
    if by_driver:
        table += html_table(
            ["test", "flagged rows"],
            list(by_driver.items()),
            caption="Flagged rows by the test that drove them (its p-value is the row's smallest)",
        )
    return table


def _floor(floor: Mapping[str, Any] | None) -> str:
    if not floor:
        return "unknown (a summary written before the floor was recorded)"
    return (
        f"{100 * floor['share']:.2f} % (smallest p-value {floor['min_p_value']:.2g} from "
        f"{floor['n_calibration']} calibration rows; fewer OOD rows than this are never flagged)"
    )


def _drift(drift: Mapping[str, Any]) -> str:
    if drift["p_value"] is None:
        return "<p>No scored rows: the drift test is undefined.</p>"
    verdict = "shifted" if drift["p_value"] <= 0.01 else "not detectably shifted"
    return (
        f"<p>{html.escape(drift['test'])} of tonight's {drift['n_night']} scores against the "
        f"{drift['n_calibration']} held-out calibration scores: p = {drift['p_value']:.3g}; "
        f"P(tonight &gt; calibration) = {drift['effect']:.3f} (0.5 = no shift). At the 1 % level tonight's "
        f"data as a whole is <b>{verdict}</b>.</p>"
    )


def _thumbnails(top: Sequence[Mapping[str, Any]], images: Mapping[str, np.ndarray], root: str) -> str:
    cards = []
    prefix = root.rstrip("/") + "/"
    for row in top:
        image = images.get(row["id"])
        picture = (
            f'<img src="{image_data_uri(image)}" style="width:100%;image-rendering:pixelated" alt="">'
            if image is not None
            else "<i>no preview</i>"
        )
        name = str(row["id"]).removeprefix(prefix)
        layers = ", ".join(
            f"{html.escape(n)} (z={z:+.1f})" for n, z in zip(row["top_layers"], row["top_z"], strict=True)
        )
        cards.append(
            f'<div style="{_THUMB_CSS}">{picture}<br><b>#{row["rank"]}</b> {html.escape(name)}<br>'
            f"score {format_cell(row['ood_score'])}, p {format_cell(row['p_value'], 4)}, "
            f"q {format_cell(row['q_value'], 4)}{' <b>flagged</b>' if row['flagged'] else ''}<br>"
            f"driver: {html.escape(str(row['driver']))}<br>layers: {layers}</div>"
        )
    return "\n".join(cards) or "<p>No scored rows.</p>"


def _histograms(histograms: Mapping[str, Any], score_edges: np.ndarray | None) -> str:
    if not histograms or score_edges is None:
        return "<p>No scored rows.</p>"
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    for name, hist in histograms.items():
        axes[0].stairs(hist.score_counts, score_edges, label=f"{name} ({hist.rows})")
        axes[1].stairs(hist.p_counts, np.linspace(0, 1, len(hist.p_counts) + 1))
    axes[0].set(xlabel="ood_score (higher = more OOD)", ylabel="rows", title="scores")
    axes[1].set(xlabel="p-value", ylabel="rows", title="p-values (uniform if in-distribution)")
    axes[0].legend(fontsize="small")
    return f'<img src="{figure_data_uri(fig)}" alt="score and p-value histograms">'


@dataclass(frozen=True)
class ErrorReasons:
    """Rejected rows per reason (see :func:`error_reason`) and one full message of each."""

    counts: dict[str, int]
    examples: dict[str, str]


def _errors(errors: ErrorReasons) -> str:
    total = sum(errors.counts.values())
    if total == 0:
        return "<p>No errors.</p>"
    rows = [
        [reason, count, errors.examples[reason]] for reason, count in Counter(errors.counts).most_common()
    ]
    return html_table(["reason", "rows", "example"], rows, caption=f"{total} rejected rows by reason")


def render_run_report(
    summary: Mapping[str, Any],
    top: Sequence[Mapping[str, Any]],
    histograms: Mapping[str, Any],
    score_edges: np.ndarray | None,
    errors: ErrorReasons,
    images: Mapping[str, np.ndarray],
) -> str:
    """The page as a string: ``top`` are the first score rows in rank order, ``histograms`` the score and
    p-value counts per top-level folder (on ``score_edges``), ``images`` the thumbnails by row id."""
    sections = [
        ("Counts", _counts(summary)),
        ("Drift test", _drift(summary["drift"])),
        (f"Top {len(top)} most OOD", _thumbnails(top, images, str(summary["corpus"]))),
        ("Scores and p-values by folder", _histograms(histograms, score_edges)),
        ("Errors", _errors(errors)),
    ]
    intro = (
        f"<p>Corpus <code>{html.escape(str(summary['corpus']))}</code>. Flags: Benjamini-Hochberg over "
        f"this run's conformal p-values at a false-discovery rate of {summary['fdr']:g}: of the flagged "
        "rows at most that share is expected to be in-distribution.</p>"
    )
    warnings = summary.get("warnings") or []
    if warnings:
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
        intro += f'<div style="border:2px solid #c00;padding:.5em"><b>Warning</b><ul>{items}</ul></div>'
    return html_page(f"gradood screening report {summary['run_id']}", sections, intro=intro)
