"""Parquet layouts of gradood's outputs: plain columns plus a JSON ``gradood`` schema-metadata entry, so
pandas, pyarrow or duckdb read them without gradood.

features/  id, row_index, n_rows, [member_ids], [split], log_prob, complexity_bits, one float64 column
           ``sqnorm:<parameter name>`` per layer (squared gradient norm), metadata: layers, model
           fingerprint, group_size, seed, ...; ``split`` (fit-set features only): 0 fit, 1 and 2 calibration
errors/    id, row_index, error
scores/    id, rank, ood_score, p_value, q_value, flagged, driver, log_prob, n_rows, top_layers, top_z,
           ``score:<test>`` and ``p_value:<test>`` for every single test, [member_ids]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from gradood.stats.layout import COMPLEXITY_COLUMN, LOG_PROB_COLUMN, log_features

SQNORM_PREFIX = "sqnorm:"
METADATA_KEY = b"gradood"
SPLIT_COLUMN = "split"
#: the split of a fit-set feature row that is a set with fewer than group_size members (it lost some to
#: decode errors, or is the last, short one): kept in the features, out of the fit and both calibration
#: parts, whose rows must all be full sets to be exchangeable with the night's (which alone get p-values)
INCOMPLETE_SET_SPLIT = -1


def sqnorm_column(layer: str) -> str:
    return SQNORM_PREFIX + layer


def feature_table(
    ids: Sequence[str],
    row_index: np.ndarray,
    n_rows: np.ndarray,
    log_prob: np.ndarray,
    sqnorms: np.ndarray,
    layer_names: Sequence[str],
    metadata: dict[str, Any],
    member_ids: Sequence[Sequence[str]] | None = None,
    split: np.ndarray | None = None,
    complexity_bits: np.ndarray | None = None,
) -> pa.Table:
    if sqnorms.shape != (len(ids), len(layer_names)):
        raise ValueError(f"sqnorms has shape {sqnorms.shape}, expected ({len(ids)}, {len(layer_names)})")
    columns: dict[str, pa.Array] = {
        "id": pa.array(list(ids), pa.string()),
        "row_index": pa.array(np.asarray(row_index, np.int64)),
        "n_rows": pa.array(np.asarray(n_rows, np.int32)),
    }
    if member_ids is not None:
        columns["member_ids"] = pa.array([list(m) for m in member_ids], pa.list_(pa.string()))
    if split is not None:
        columns[SPLIT_COLUMN] = pa.array(np.asarray(split, np.int8))
    columns["log_prob"] = pa.array(np.asarray(log_prob, np.float64))
    if complexity_bits is not None:
        columns[COMPLEXITY_COLUMN] = pa.array(np.asarray(complexity_bits, np.float64))
    for j, layer in enumerate(layer_names):
        columns[sqnorm_column(layer)] = pa.array(np.ascontiguousarray(sqnorms[:, j], np.float64))
    table = pa.table(columns)
    meta = {**metadata, "layers": list(layer_names)}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def table_metadata(table_or_schema: pa.Table | pa.Schema) -> dict[str, Any]:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a gradood feature table: no 'gradood' schema metadata")
    return json.loads(raw)


def sqnorm_matrix(columns: dict[str, np.ndarray] | pa.Table, layer_names: Sequence[str]) -> np.ndarray:
    """[N, L] float64 squared norms from a table or a dict-of-arrays batch, in ``layer_names`` order."""
    if isinstance(columns, pa.Table):
        cols = [columns.column(sqnorm_column(n)).to_numpy() for n in layer_names]
    else:
        cols = [np.asarray(columns[sqnorm_column(n)]) for n in layer_names]
    return np.stack(cols, axis=1).astype(np.float64) if cols else np.zeros((0, 0))


def feature_matrix(
    columns: dict[str, np.ndarray] | pa.Table, layer_names: Sequence[str], min_sqnorm: float
) -> np.ndarray:
    """The detector suite's input: log f_j per layer (floored at min_sqnorm), then log p, then the
    complexity bits where the features have them (columns :func:`suite_feature_names`)."""
    extra = suite_feature_names([], columns)
    values = [columns[c] if isinstance(columns, dict) else columns.column(c).to_numpy() for c in extra]
    logs = log_features(sqnorm_matrix(columns, layer_names), min_sqnorm)
    return np.column_stack([logs, *(np.asarray(v, np.float64) for v in values)])


#: the feature columns extraction writes after the layers' squared norms
EXTRACTED_COLUMNS = (LOG_PROB_COLUMN, COMPLEXITY_COLUMN)


def suite_feature_names(
    layer_names: Sequence[str], columns: dict[str, np.ndarray] | pa.Table | None = None
) -> list[str]:
    """The names of :func:`feature_matrix`'s columns over ``columns``: the layers, ``log_prob``, and
    ``complexity_bits`` where the table has it (extraction writes it; None: a table without it)."""
    names = [] if columns is None else columns.keys() if isinstance(columns, dict) else columns.column_names
    return [*layer_names, LOG_PROB_COLUMN, *([COMPLEXITY_COLUMN] if COMPLEXITY_COLUMN in names else [])]


def error_table(errors: Sequence[tuple[str, int, str]]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([e[0] for e in errors], pa.string()),
            "row_index": pa.array([int(e[1]) for e in errors], pa.int64()),
            "error": pa.array([e[2] for e in errors], pa.string()),
        }
    )


def object_column(values: list) -> np.ndarray:
    """A 1-D object array of arbitrary Python values (Ray Data stores such a column pickled)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
