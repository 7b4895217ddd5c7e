"""Run partitions, atomic publishing and the manifest of inputs seen, for nightly operation.

Layout under ``output.uri``::

    runs/<run id>/          one run: features/, errors/, scores/, summary.json, report.html, run.yaml
    runs/<run id>/_SUCCESS  written last: a run without it is incomplete, whatever files it holds
    runs.json               the top-level view: every published run, newest last (rewritten atomically,
                            under the ``_runs.json.lease`` lease, so concurrent runs lose no entry)
    manifest/run_id=<id>/   the inputs a run scored (uri, size, mtime), read by incremental runs once
                            the run is published; written by the listing tasks, before extraction
                            (``run_id=<id>.parquet``, one file, as earlier versions wrote it, is read too)
    leases/<run id>.json    held while a run of that id is in progress (:mod:`gradood.pipeline.lease`)
    detector.json, fit/     the detector, shared by every run (reused while its settings match)

A run first unpublishes its own id (removes ``_SUCCESS`` and its ``runs.json`` entry), so a reader or
the next run never takes a rerun in progress for a complete one; it publishes only after every output,
the manifest included, is written. Object stores write each object atomically, so the marker order holds
there too.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradood.core import storage
from gradood.pipeline.lease import INDEX_LEASE, Lease, runs_in_progress

SUCCESS = "_SUCCESS"
INDEX = "runs.json"
#: seconds after which a runs.json lease without a heartbeat is a dead writer's
INDEX_LEASE_TIMEOUT_S = 60.0


def default_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def run_dir(out: str, run_id: str) -> str:
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(f"run.id must be a plain name (no '/', not hidden), got {run_id!r}")
    return storage.join(out, "runs", run_id)


def _index(out: str) -> list[dict[str, Any]]:
    uri = storage.join(out, INDEX)
    return storage.read_json(uri)["runs"] if storage.exists(uri) else []


def _write_index(out: str, runs: list[dict[str, Any]]) -> None:
    storage.write_json(storage.join(out, INDEX), {"runs": runs})


def index_lease(out: str) -> Lease:
    """The short lease every update of runs.json holds, so two runs publishing at once both land."""
    return Lease(storage.join(out, INDEX_LEASE), "runs.json", timeout_s=INDEX_LEASE_TIMEOUT_S, wait_s=300)


def unpublish(out: str, run_id: str) -> None:
    """Take a run out of the view before it is rewritten (no-op for a new run id)."""
    marker = storage.join(run_dir(out, run_id), SUCCESS)
    if storage.exists(marker):
        storage.delete_file(marker)
    if not any(r["run_id"] == run_id for r in _index(out)):
        return
    with index_lease(out):
        _write_index(out, [r for r in _index(out) if r["run_id"] != run_id])


def publish(out: str, run_id: str, summary: dict[str, Any]) -> None:
    """Write the run's marker, then list it in the top-level view."""
    entry = {
        "run_id": run_id,
        "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "path": run_dir(out, run_id),
        **{k: summary[k] for k in ("inputs", "scored", "rejected", "skipped", "flagged")},
    }
    storage.write_json(storage.join(run_dir(out, run_id), SUCCESS), entry)
    with index_lease(out):
        _write_index(out, [r for r in _index(out) if r["run_id"] != run_id] + [entry])


def published_runs(out: str) -> list[str]:
    """Ids of the runs in the view whose marker exists (a view entry without its marker is ignored)."""
    return [r["run_id"] for r in _index(out) if storage.exists(storage.join(r["path"], SUCCESS))]


#: a manifest part's columns; the run is the folder name (``run_id=<id>``, hive style)
MANIFEST_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])


def manifest_uri(out: str, run_id: str) -> str:
    """The folder of a run's manifest parts."""
    return storage.join(out, "manifest", f"run_id={run_id}")


def clear_manifest(out: str, run_id: str) -> None:
    """Remove a run's manifest (either layout) before a rerun writes it again."""
    legacy = f"{manifest_uri(out, run_id)}.parquet"
    if storage.exists(legacy):
        storage.delete_file(legacy)
    storage.delete_dir(manifest_uri(out, run_id))


def write_manifest(out: str, run_id: str, inputs: pa.Table) -> None:
    part = storage.join(manifest_uri(out, run_id), "part-0.parquet")
    storage.write_parquet(inputs.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA), part)


def seen_manifests(out: str, except_run: str) -> list[str]:
    """Manifests of every published run but ``except_run`` (a rerun of a night selects as before), and
    of every run in progress, so a night started while another still runs does not score its files
    again (should that run fail, the night after it finds them unscored and picks them up)."""
    found = []
    for run in sorted((set(published_runs(out)) | set(runs_in_progress(out))) - {except_run}):
        for uri in (manifest_uri(out, run), f"{manifest_uri(out, run)}.parquet"):
            if storage.exists(uri):
                found.append(uri)
    return found


KEY = MANIFEST_SCHEMA.names


def read_seen(manifests: list[str], uri_range: tuple[str, str] | None = None) -> pa.Table:
    """(uri, size, mtime_ns) of the manifests' rows, only those with lo <= uri <= hi given a range.

    Manifests are sorted by uri, so the range skips the row groups of other folders unread.
    """
    import pyarrow.dataset as pads

    tables = []
    for uri in manifests:
        fs, path = storage.filesystem(uri)
        # the schema: legacy files carry run_id, listing parts path, and a night that found nothing new
        # leaves a folder without files
        rows = pads.dataset(path, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA)
        where = None
        if uri_range is not None:
            where = (pads.field("uri") >= uri_range[0]) & (pads.field("uri") <= uri_range[1])
        tables.append(rows.to_table(columns=KEY, filter=where))
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def new_or_changed(inputs: pa.Table, seen: pa.Table) -> pa.Table:
    """Inputs whose (uri, size, mtime) no published run has scored, in their order."""
    if seen.num_rows == 0:
        return inputs
    known = seen.select(KEY).group_by(KEY).aggregate([])
    order = inputs.append_column("_order", pa.array(np.arange(inputs.num_rows)))
    joined = order.join(
        known.append_column("_seen", pa.array([True] * known.num_rows)), KEY, join_type="left outer"
    )
    kept = joined.filter(pc.is_null(joined.column("_seen"))).sort_by("_order")
    return kept.drop_columns(["_seen", "_order"]).select(inputs.column_names)
