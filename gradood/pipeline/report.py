"""Gather what ``report.html`` shows from a finished run: thumbnails of the top rows, folders, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, Shard, load_rows
from gradood.pipeline import storage
from gradood.report.run import render_run_report


def top_level_group(row_id: str, corpus_uri: str) -> str:
    """The first folder of a row's path below the corpus root ('.' for files at the root)."""
    root = corpus_uri.rstrip("/") + "/"
    path = row_id.split("#", 1)[0]
    if path.startswith(root):
        parts = path[len(root) :].split("/")
        return parts[0] if len(parts) > 1 else "."
    return path.rsplit(":", 1)[0] if "://" not in path and ":" in path else "."


def _first_members(scores: pa.Table) -> list[str]:
    if "member_ids" in scores.column_names:
        return [m[0] if m else "" for m in scores.column("member_ids").to_pylist()]
    return scores.column("id").to_pylist()


def thumbnails(
    source: CorpusSource, scores: pa.Table, converter: ImageConverter, k: int
) -> dict[str, np.ndarray]:
    """{score row id: H x W (x 3) uint8} for the top ``k`` rows (a set shows its first member)."""
    out = {}
    for row in scores.slice(0, k).select(["id", "row_index"]).to_pylist():
        index = int(row["row_index"])
        shard = Shard(-1, index, 1, source._locate(index, index + 1))
        loaded = load_rows(source, shard, converter)
        if len(loaded.ids):
            image = loaded.images[0]
            out[row["id"]] = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    return out


def write_run_report(
    run_uri: str,
    summary: dict[str, Any],
    scores: pa.Table,
    source: CorpusSource,
    converter: ImageConverter,
    top_k: int,
) -> str:
    errors_uri = storage.join(run_uri, "errors")
    errors = (
        storage.read_parquet(errors_uri)
        if storage.list_files(errors_uri)
        else pa.table({"id": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    )
    groups = np.array([top_level_group(i, source.uri) for i in _first_members(scores)], dtype=object)
    page = render_run_report(
        summary, scores, errors, groups, thumbnails(source, scores, converter, top_k), top_k
    )
    uri = storage.join(run_uri, "report.html")
    storage.write_text(uri, page)
    return uri
