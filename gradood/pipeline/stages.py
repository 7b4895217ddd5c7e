"""Pipeline stages as callable classes over dicts of numpy arrays (Ray Data's batch format).

Nothing here imports Ray: the stages run and test in-process; gradood.pipeline.ray_job only wires them
into Ray Data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import gradood
from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, LoadedRows, Shard, load_rows
from gradood.features import extract_features
from gradood.models.base import DensityModel
from gradood.models.checkpoint import model_from_bytes
from gradood.pipeline import storage
from gradood.pipeline.tables import error_table, feature_table, sqnorm_matrix
from gradood.seeding import draw_noise
from gradood.stats.detector import LogGaussianDetector, TypicalityTest, log_features
from gradood.stats.moments import Moments


@dataclass
class ShardFeatures:
    """Features of one shard: a row per group of ``group_size`` consecutive rows (a row per image for 1)."""

    ids: list[str]
    row_index: np.ndarray
    n_rows: np.ndarray
    member_ids: list[list[str]]
    member_index: list[np.ndarray]
    log_prob: np.ndarray
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
    per-row log-likelihood, so it stays on the per-image scale the typicality baseline uses.
    """
    if group_size < 1 or batch_size < group_size:
        raise ValueError(
            f"need 1 <= group_size <= batch_size, got group_size={group_size}, batch_size={batch_size}"
        )
    n = len(rows.ids)
    groups = np.asarray(rows.indices, np.int64) // group_size
    # boundaries of consecutive runs of equal group index
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64)
    out_log_prob, out_sqnorms, layer_names = [], [], None
    lo = 0
    while lo < len(starts):
        hi = lo + 1
        while hi < len(starts) and ends[hi] - starts[lo] <= batch_size:
            hi += 1
        r0, r1 = int(starts[lo]), int(ends[hi - 1])
        ids = rows.ids[r0:r1]
        x = torch.from_numpy(rows.images[r0:r1]).to(device=device, dtype=torch.float32)
        noise = {k: v.to(device) for k, v in draw_noise(model.noise_spec(), ids, seed).items()}
        local_groups = torch.from_numpy(np.searchsorted(starts[lo:hi], np.arange(r0, r1), side="right") - 1)
        res = extract_features(model, x, noise, local_groups.to(device), method=method)
        sizes = ends[lo:hi] - starts[lo:hi]
        out_log_prob.append(np.add.reduceat(res.log_prob, starts[lo:hi] - r0) / sizes)
        out_sqnorms.append(res.sqnorms)
        layer_names = res.layer_names
        lo = hi
    if layer_names is None:
        from gradood.features import feature_layer_names

        layer_names = feature_layer_names(model)
    return ShardFeatures(
        ids=[rows.ids[s] if group_size == 1 else group_id(int(groups[s])) for s in starts],
        row_index=np.asarray(rows.indices, np.int64)[starts] if n else np.zeros(0, np.int64),
        n_rows=(ends - starts).astype(np.int32),
        member_ids=[list(rows.ids[s:e]) for s, e in zip(starts, ends, strict=True)],
        member_index=[np.asarray(rows.indices[s:e], np.int64) for s, e in zip(starts, ends, strict=True)],
        log_prob=np.concatenate(out_log_prob) if out_log_prob else np.zeros(0),
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


class ShardFeatureWriter:
    """Ray Data stage: shard descriptors in, one Parquet file of features (and of errors) per shard out.

    Returns one summary row per shard with counts and the sufficient statistics (count, mean, M2) of
    log f_j and of -log p, which the driver streams to the reducer as shards finish. Output files are
    named by shard index, so a retried or rerun shard overwrites itself instead of duplicating rows.
    """

    def __init__(
        self, weights: bytes, model_meta: dict[str, Any], source: CorpusSource, settings: ExtractSettings
    ) -> None:
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, meta = model_from_bytes(weights, model_meta, self.device)
        self.fingerprint = meta["fingerprint"]
        self.source = source
        self.settings = settings
        c, h, w = self.model.input_shape
        self.converter = ImageConverter(self.model.image_mode, (h, w), **settings.image)

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

    def process(self, shard: Shard) -> dict[str, Any]:
        t0 = time.perf_counter()
        s = self.settings
        rows = load_rows(self.source, shard, self.converter)
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
        name = f"part-{shard.index:06d}.parquet"
        table = feature_table(
            feats.ids,
            feats.row_index,
            feats.n_rows,
            feats.log_prob,
            feats.sqnorms,
            feats.layer_names,
            {**self.file_metadata(), "shard": shard.index},
            member_ids=feats.member_ids if s.group_size > 1 else None,
        )
        storage.write_parquet(table, storage.join(s.features_uri, name))
        if errors:
            storage.write_parquet(error_table(errors), storage.join(s.errors_uri, name))
        logf = Moments.from_values(log_features(feats.sqnorms, s.min_sqnorm))
        nll = Moments.from_values(-feats.log_prob[:, None])
        return {
            "shard": shard.index,
            "rows_in": shard.num_rows,
            "rows_scored": int(feats.n_rows.sum()),
            "rows_rejected": len(errors),
            "feature_rows": len(feats.ids),
            "seconds": time.perf_counter() - t0,
            "logf_moments": logf.to_dict(),
            "nll_moments": nll.to_dict(),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.process(shard) for shard in batch["shard"]]
        return {key: np.array([s[key] for s in summaries], dtype=object) for key in summaries[0]}


class Scorer:
    """Ray Data stage: feature rows in, OOD score, typicality baseline and the 3 most deviant layers out."""

    def __init__(self, detector: dict[str, Any], top_k: int = 3) -> None:
        self.detector = LogGaussianDetector.from_dict(detector["log_gaussian"])
        self.typicality = TypicalityTest.from_dict(detector["typicality"])
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sq = sqnorm_matrix(batch, self.detector.all_layer_names_)
        log_prob = np.asarray(batch["log_prob"], np.float64)
        names, z = self.detector.top_layers(sq, k=self.top_k)
        out = {
            "id": np.asarray(batch["id"]),
            "ood_score": self.detector.ood_score(sq),
            "typicality": self.typicality.ood_score(log_prob),
            "log_prob": log_prob,
            "n_rows": np.asarray(batch["n_rows"]),
            "row_index": np.asarray(batch["row_index"]),
            "top_layers": list_column([list(n) for n in names]),
            "top_z": list_column([list(map(float, r)) for r in z]),
        }
        if "member_ids" in batch:
            out["member_ids"] = list_column([[str(m) for m in ms] for ms in batch["member_ids"]])
        return out


def list_column(rows: list[list]) -> np.ndarray:
    """A 1-D object array of Python lists, which Ray Data turns into an Arrow list column (numpy would
    build a 2-D array from equal-length rows, and arrays of arrays end up as pickled objects)."""
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out
