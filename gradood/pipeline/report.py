"""Gather what ``report.html`` shows from a finished run: thumbnails of the top rows, folders, errors.

Everything here is bounded by the report's size, not the run's: the top rows and per-folder histograms
come from the scoring pass, and the errors are counted by reason one file at a time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from gradood.core import storage
from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, load_row
from gradood.pipeline.score import RunScores
from gradood.report.run import ErrorReasons, error_reason, render_run_report


def thumbnails(
    source: CorpusSource, top: list[dict[str, Any]], converter: ImageConverter, k: int
) -> dict[str, np.ndarray]:
    """{score row id: H x W (x 3) uint8} for the top ``k`` rows (a set shows its first member)."""
    out = {}
    for row in top[:k]:
        index = int(row["row_index"])
        loaded = load_row(source, index, converter)
        if len(loaded.ids):
            image = loaded.images[0]
            out[row["id"]] = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    return out


def error_reasons(errors_uri: str) -> ErrorReasons:
    """Rejected rows counted by reason, with the first example of each, reading one file at a time."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for uri in storage.list_files(errors_uri):
        errors = storage.read_parquet(uri, columns=["id", "error"])
        for row_id, message in zip(
            errors.column("id").to_pylist(), errors.column("error").to_pylist(), strict=True
        ):
            reason = error_reason(message)
            counts[reason] += 1
            examples.setdefault(reason, f"{row_id}: {message}")
    return ErrorReasons(dict(counts), examples)


def write_run_report(
    run_uri: str,
    summary: dict[str, Any],
    scores: RunScores,
    source: CorpusSource,
    converter: ImageConverter,
    top_k: int,
) -> str:
    page = render_run_report(
        summary,
        scores.top[:top_k],
        scores.histograms,
        scores.score_edges,
        error_reasons(storage.join(run_uri, "errors")),
        thumbnails(source, scores.top, converter, top_k),
    )
    uri = storage.join(run_uri, "report.html")
    storage.write_text(uri, page)
    return uri
