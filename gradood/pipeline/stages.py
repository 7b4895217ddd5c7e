"""Pipeline stages as callable classes over dicts of numpy arrays (Ray Data's batch format).

Nothing here imports Ray: the stages run and test in-process; gradood.pipeline.ray_job only wires them
into Ray Data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import gradood
from gradood.core import storage
from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, LoadedRows, Shard, load_rows
from gradood.features import extract_features
from gradood.models.base import DensityModel
from gradood.models.checkpoint import model_from_bytes
from gradood.pipeline.tables import (
    INCOMPLETE_SET_SPLIT,
    SPLIT_COLUMN,
    error_table,
    feature_matrix,
    feature_table,
    object_column,
    table_metadata,
)
from gradood.seeding import draw_noise, row_uniforms
from gradood.stats.layout import COMPLEXITY_COLUMN, png_bits, split_of
from gradood.stats.moments import Moments

#: the stream of the per-row uniform that assigns held-out rows to fit / calibration parts
SPLIT_STREAM = "calibration-split"


@dataclass
class ShardFeatures:
    """Features of one shard: a row per group of ``group_size`` consecutive rows (a row per image for 1)."""

    ids: list[str]
    row_index: np.ndarray
    n_rows: np.ndarray
    member_ids: list[list[str]]
    member_index: list[np.ndarray]
    log_prob: np.ndarray
    complexity_bits: np.ndarray
    sqnorms: np.ndarray
    layer_names: list[str]


def group_id(group_index: int) -> str:
    return f"group-{group_index:09d}"


def compute_features(
    model: DensityModel,
    rows: LoadedRows,
    *,
    group_size: int,
    batch_size: int,
    seed: int,
    method: str,
    device: torch.device | str = "cpu",
) -> ShardFeatures:
    """Per-group squared gradient norms of decoded rows, in passes of at most ``batch_size`` rows.

    Group g holds the rows with global index in [g*B, (g+1)*B); rows rejected at decode time simply
    drop out of their group (its ``n_rows`` says how many remained). ``log_prob`` is the group's mean
    per-row log-likelihood, so it stays on the per-image scale the typicality baseline uses, and
    ``complexity_bits`` the mean PNG size of its members, on the same scale.
    """
    if group_size < 1 or batch_size < group_size:
        raise ValueError(
            f"need 1 <= group_size <= batch_size, got group_size={group_size}, batch_size={batch_size}"
        )
    n = len(rows.ids)
    groups = np.asarray(rows.row_index, np.int64) // group_size
    # boundaries of consecutive runs of equal group index
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64) if n else np.zeros(0, np.int64)
    out_log_prob, out_sqnorms, layer_names = [], [], None
    lo = 0
    while lo < len(starts):
        hi = lo + 1
        while hi < len(starts) and ends[hi] - starts[lo] <= batch_size:
            hi += 1
        r0, r1 = int(starts[lo]), int(ends[hi - 1])
        ids = rows.ids[r0:r1]
        # a fresh tensor, not a view of the decoded block: CPU kernels may round differently on
        # buffers of other alignment, and the same row must give the same bits in any shard layout
        x = torch.tensor(rows.images[r0:r1], dtype=torch.float32, device=device)
        noise = {k: v.to(device) for k, v in draw_noise(model.noise_spec(), ids, seed).items()}
        local_groups = torch.from_numpy(np.searchsorted(starts[lo:hi], np.arange(r0, r1), side="right") - 1)
        res = extract_features(model, x, noise, local_groups.to(device), method=method)
        sizes = ends[lo:hi] - starts[lo:hi]
        out_log_prob.append(np.add.reduceat(res.log_prob, starts[lo:hi] - r0) / sizes)
        out_sqnorms.append(res.sqnorms)
        layer_names = res.layer_names
        lo = hi
    sizes = (ends - starts).astype(np.int64)
    complexity = np.add.reduceat(png_bits(rows.images), starts) / sizes if n else np.zeros(0)
    if layer_names is None:
        from gradood.features import feature_layer_names

        layer_names = feature_layer_names(model)
    return ShardFeatures(
        ids=[rows.ids[s] if group_size == 1 else group_id(int(groups[s])) for s in starts],
        row_index=np.asarray(rows.row_index, np.int64)[starts] if n else np.zeros(0, np.int64),
        n_rows=(ends - starts).astype(np.int32),
        member_ids=[list(rows.ids[s:e]) for s, e in zip(starts, ends, strict=True)],
        member_index=[np.asarray(rows.row_index[s:e], np.int64) for s, e in zip(starts, ends, strict=True)],
        log_prob=np.concatenate(out_log_prob) if out_log_prob else np.zeros(0),
        complexity_bits=complexity,
        sqnorms=np.concatenate(out_sqnorms) if out_sqnorms else np.zeros((0, len(layer_names))),
        layer_names=list(layer_names),
    )


def drop_non_finite(
    feats: ShardFeatures, errors: list[tuple[str, int, str]]
) -> tuple[ShardFeatures, list[tuple[str, int, str]]]:
    """Groups whose log-likelihood or any gradient norm is not finite become error rows (all members)."""
    ok = np.isfinite(feats.log_prob) & np.isfinite(feats.sqnorms).all(axis=1)
    if ok.all():
        return feats, errors
    errors = list(errors)
    for g in np.flatnonzero(~ok):
        for member, index in zip(feats.member_ids[g], feats.member_index[g], strict=True):
            errors.append((member, int(index), "non-finite log-likelihood or gradient norm"))
    keep = np.flatnonzero(ok)
    return (
        ShardFeatures(
            ids=[feats.ids[i] for i in keep],
            row_index=feats.row_index[keep],
            n_rows=feats.n_rows[keep],
            member_ids=[feats.member_ids[i] for i in keep],
            member_index=[feats.member_index[i] for i in keep],
            log_prob=feats.log_prob[keep],
            complexity_bits=feats.complexity_bits[keep],
            sqnorms=feats.sqnorms[keep],
            layer_names=feats.layer_names,
        ),
        errors,
    )


@dataclass(frozen=True)
class ExtractSettings:
    """What a feature-extraction actor needs besides the model and the source (all plain values)."""

    features_uri: str
    errors_uri: str
    group_size: int
    batch_size: int
    seed: int
    method: str
    min_sqnorm: float
    image: dict[str, Any]
    torch_threads: int = 1
    #: fit-set runs: share of rows held out for calibration (a ``split`` column, moments of fit rows only)
    calibration_fraction: float | None = None
    #: fit-set runs: share of all rows in calibration part 2 (None: half the held-out share)
    part_2_fraction: float | None = None
    #: the actor was given a GPU (num_gpus > 0); only then is CUDA touched
    use_gpu: bool = False


def extraction_device(use_gpu: bool) -> torch.device:
    """The device of an extraction actor: the GPU Ray assigned it, or the CPU.

    Ray sets CUDA_VISIBLE_DEVICES to an actor's assigned GPUs, so its GPU is ``cuda:0``. An actor
    without GPUs must not use ``torch.cuda.is_available()``: Ray 2.6x no longer hides a node's GPUs from
    such actors, and it would initialise CUDA on a device another actor owns. TF32 is switched off: its
    ~1e-3 relative error in float32 matmuls and convolutions exceeds the coverage check's tolerance.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("extract.gpus_per_worker > 0, but this worker sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", 0)


def shard_file(index: int) -> str:
    return f"part-{index:06d}.parquet"


def shard_summary(
    shard: Shard, table: pa.Table, rejected: int, settings: ExtractSettings, seconds: float
) -> dict[str, Any]:
    """Counts of one finished shard and, for fit-set runs, the moments of its fit rows."""
    moments = None
    if settings.calibration_fraction is not None:
        x = feature_matrix(table, table_metadata(table)["layers"], settings.min_sqnorm)
        moments = Moments.from_values(x[table.column(SPLIT_COLUMN).to_numpy() == 0]).to_dict()
    return {
        "shard": shard.number,
        "rows_in": shard.num_rows,
        "rows_scored": int(pc.sum(table.column("n_rows")).as_py() or 0),
        "rows_rejected": rejected,
        "feature_rows": table.num_rows,
        "seconds": seconds,
        "moments": moments,
    }


def completed_shard(
    shard: Shard, settings: ExtractSettings, expected: dict[str, Any]
) -> dict[str, Any] | None:
    """The summary of a shard an earlier attempt finished with the same settings, else None.

    ``expected`` is the metadata the shard's feature file must carry (model fingerprint, seed, group
    size, method, source, image conversion); its row range and the counts must match as well.
    """
    name = shard_file(shard.number)
    features_file = storage.join(settings.features_uri, name)
    if not storage.exists(features_file):
        return None
    table = storage.read_parquet(features_file)
    meta = table_metadata(table)
    if meta.get("rows") != [shard.first_row, shard.num_rows] or meta.get("shard") != shard.number:
        return None
    if any(meta.get(k) != v for k, v in expected.items()) or COMPLEXITY_COLUMN not in table.column_names:
        return None
    if settings.calibration_fraction is not None:
        if SPLIT_COLUMN not in table.column_names:
            return None
        short = table.column("n_rows").to_numpy() < settings.group_size
        if (table.column(SPLIT_COLUMN).to_numpy()[short] != INCOMPLETE_SET_SPLIT).any():
            return None  # written before incomplete sets were kept out of the fit
    errors_file = storage.join(settings.errors_uri, name)
    rejected = storage.read_parquet(errors_file).num_rows if storage.exists(errors_file) else 0
    summary = shard_summary(shard, table, rejected, settings, 0.0)
    return summary if summary["rows_scored"] + rejected == shard.num_rows else None


class ShardFeatureWriter:
    """Ray Data stage: decoded shards in, one Parquet file of features (and of errors) per shard out.

    Returns one summary row per shard with counts and, for fit-set runs, the sufficient statistics
    (count, mean, co-moments) of [log f_j, log p] over the shard's fit rows, which the driver streams to
    the reducer as shards finish. Output files are named by shard index, so a retried or rerun shard
    overwrites itself instead of duplicating rows.
    """

    def __init__(
        self, weights: bytes, model_meta: dict[str, Any], source: CorpusSource, settings: ExtractSettings
    ) -> None:
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.device = extraction_device(settings.use_gpu)
        self.model, meta = model_from_bytes(weights, model_meta, self.device)
        self.fingerprint = meta["fingerprint"]
        self.source = source
        self.settings = settings
        self.converter = ImageConverter.for_model(self.model, **settings.image)

    def file_metadata(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_fingerprint": self.fingerprint,
            "group_size": s.group_size,
            "seed": s.seed,
            "method": s.method,
            "source": self.source.uri,
            "image": self.converter.describe(),
            "gradood_version": gradood.__version__,
        }

    def process(self, shard: Shard, rows: LoadedRows, decode_seconds: float = 0.0) -> dict[str, Any]:
        started_at, t0 = time.time(), time.perf_counter()
        s = self.settings
        feats = compute_features(
            self.model,
            rows,
            group_size=s.group_size,
            batch_size=s.batch_size,
            seed=s.seed,
            method=s.method,
            device=self.device,
        )
        feats, errors = drop_non_finite(feats, rows.errors)
        split = None
        if s.calibration_fraction is not None:
            split = split_of(
                row_uniforms(s.seed, feats.ids, SPLIT_STREAM), s.calibration_fraction, s.part_2_fraction
            )
            split[feats.n_rows < s.group_size] = INCOMPLETE_SET_SPLIT
        table = feature_table(
            feats.ids,
            feats.row_index,
            feats.n_rows,
            feats.log_prob,
            feats.sqnorms,
            feats.layer_names,
            {**self.file_metadata(), "shard": shard.number, "rows": [shard.first_row, shard.num_rows]},
            member_ids=feats.member_ids if s.group_size > 1 else None,
            split=split,
            complexity_bits=feats.complexity_bits,
        )
        name = shard_file(shard.number)
        errors_file = storage.join(s.errors_uri, name)
        # errors first, features last: a feature file marks its shard complete (resume relies on it)
        if errors:
            storage.write_parquet(error_table(errors), errors_file)
        elif storage.exists(errors_file):  # left by an interrupted attempt of this shard
            storage.delete_file(errors_file)
        storage.write_parquet(table, storage.join(s.features_uri, name))
        summary = shard_summary(shard, table, len(errors), s, time.perf_counter() - t0)
        return {
            **summary,
            "decode_seconds": decode_seconds,
            "started_at": started_at,
            "ended_at": time.time(),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [
            self.process(shard, rows, seconds)
            for shard, rows, seconds in zip(
                batch["shard"], batch["rows"], batch["decode_seconds"], strict=True
            )
        ]
        return {key: np.array([s[key] for s in summaries], dtype=object) for key in summaries[0]}


def decode_shards(
    batch: dict[str, np.ndarray], source: CorpusSource, converter: ImageConverter
) -> dict[str, np.ndarray]:
    """Ray Data stage before the model: shard descriptors in, decoded shards out.

    It runs as CPU tasks, so the next shards are read and decoded while the model workers compute; a
    shard stays one row, so its groups still reach one worker, and its per-row errors travel with it.
    """
    rows, seconds = [], []
    for shard in batch["shard"]:
        t0 = time.perf_counter()
        rows.append(load_rows(source, shard, converter))
        seconds.append(time.perf_counter() - t0)
    return {"shard": batch["shard"], "rows": object_column(rows), "decode_seconds": np.array(seconds)}
