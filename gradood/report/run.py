"""``report.html`` of one screening run: what a person looks at in the morning.

Counts that reconcile (inputs = scored + rejected; skipped files with their reasons), what was flagged at
the stated false-discovery rate, the night-level drift test, thumbnails of the most OOD images with the
evidence behind each, score and p-value histograms per top-level folder, and the errors by reason.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
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
        ["incomplete sets (not flagged)", summary["incomplete_sets"]],
        ["shards resumed from an earlier attempt", summary["resumed_shards"]],
    ]
    table = html_table(
        ["", "count"], rows, caption=f"Run {summary['run_id']}: detector {summary['detector']}"
    )
    skipped = summary.get("skipped_reasons") or {}
    if skipped:
        table += html_table(["skipped because", "files"], sorted(skipped.items()), caption="Skipped files")
    return table


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


def _histograms(scores: pa.Table, groups: np.ndarray) -> str:
    if scores.num_rows == 0:
        return "<p>No scored rows.</p>"
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    score = scores.column("ood_score").to_numpy()
    p_value = scores.column("p_value").to_numpy(zero_copy_only=False)
    finite = np.isfinite(score)
    bins = np.histogram_bin_edges(score[finite], bins=40) if finite.any() else 10
    for name in sorted(set(groups.tolist())):
        mask = groups == name
        axes[0].hist(score[mask & finite], bins=bins, histtype="step", label=f"{name} ({int(mask.sum())})")
        axes[1].hist(p_value[mask & np.isfinite(p_value)], bins=np.linspace(0, 1, 21), histtype="step")
    axes[0].set(xlabel="ood_score (higher = more OOD)", ylabel="rows", title="scores")
    axes[1].set(xlabel="p-value", ylabel="rows", title="p-values (uniform if in-distribution)")
    axes[0].legend(fontsize="small")
    return f'<img src="{figure_data_uri(fig)}" alt="score and p-value histograms">'


def _errors(errors: pa.Table) -> str:
    if errors.num_rows == 0:
        return "<p>No errors.</p>"
    reasons = Counter(error_reason(m) for m in errors.column("error").to_pylist())
    examples: dict[str, str] = {}
    for row_id, message in zip(
        errors.column("id").to_pylist(), errors.column("error").to_pylist(), strict=True
    ):
        examples.setdefault(error_reason(message), f"{row_id}: {message}")
    rows = [[reason, count, examples[reason]] for reason, count in reasons.most_common()]
    return html_table(
        ["reason", "rows", "example"], rows, caption=f"{errors.num_rows} rejected rows by reason"
    )


def render_run_report(
    summary: Mapping[str, Any],
    scores: pa.Table,
    errors: pa.Table,
    groups: np.ndarray,
    images: Mapping[str, np.ndarray],
    top_k: int,
) -> str:
    """The page as a string; ``groups`` is each score row's top-level folder, ``images`` the thumbnails."""
    top = scores.slice(0, top_k).to_pylist()
    sections = [
        ("Counts", _counts(summary)),
        ("Drift test", _drift(summary["drift"])),
        (f"Top {len(top)} most OOD", _thumbnails(top, images, str(summary["corpus"]))),
        ("Scores and p-values by folder", _histograms(scores, groups)),
        ("Errors", _errors(errors)),
    ]
    intro = (
        f"<p>Corpus <code>{html.escape(str(summary['corpus']))}</code>. Flags: Benjamini-Hochberg over "
        f"this run's conformal p-values at a false-discovery rate of {summary['fdr']:g}: of the flagged "
        "rows at most that share is expected to be in-distribution.</p>"
    )
    return html_page(f"gradood screening report {summary['run_id']}", sections, intro=intro)
