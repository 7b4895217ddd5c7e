"""Training rows as a Ray Dataset: read lazily from the training source, split across the Ray Train workers.

Data flow: the driver opens ``train.uri`` (any corpus source: a folder of images, Parquet files,
torchvision://) and cuts its row order into shards of about :data:`BLOCK_BYTES` of decoded pixels.
:func:`train_dataset` turns the shard descriptors into a Ray Dataset whose read tasks decode one shard
each (undecodable rows are dropped, as the whole-set loader skipped them) into rows
``{"id", "row_index", "image"}``, ``image`` uint8 ``[C, H, W]`` at the model's size. The trainer gets it as
``datasets={"train": ...}``; every epoch, each worker iterates its share,
``ray.train.get_dataset_shard("train")``, in batches (:func:`epoch_batches`). No process holds the
whole training set: memory is bounded by the blocks in flight, and the object store spills to disk
for the global shuffle. (A torchvision:// source is an in-memory dataset by nature: each read task
loads it to take its shard; folder and Parquet sources read only their shard's files.)

Shuffling: a seeded :meth:`ray.data.Dataset.random_shuffle`, the same permutation (a function of the
seed) every epoch, then a per-epoch local shuffle buffer of :data:`SHUFFLE_BUFFER_BATCHES` batches
seeded by (seed, epoch, rank), so consecutive epochs see different batches. A fresh permutation per
epoch would need Ray Data's per-execution reseeding, which counts executions of the process and cannot
be replayed by a resumed run.

The data-dependent (ActNorm) init reads the first ``train.init_rows`` decodable rows in source order
(:func:`init_batch`), once on the driver; every rank gets the same rows through the object store.

What is deterministic, given the seed and the number of workers (:func:`data_config` preserves order,
which also makes Ray's equal split deterministic: each block goes to the split with the fewest rows,
locality hints are ignored): the shard layout, each shard's rows, the shuffle permutation, which rank
gets which rows, the local shuffle and the per-row noise. So the same config on the same number of
workers trains the same weights (separate runs of the tiny test config gave one fingerprint on one
worker and one on two; the suite tests repeated in-process epochs and that the split repeats across
epochs), and a run resumed after epoch e sees the batches the uninterrupted run would have. What is
not: the weights change with the number of workers (each rank's batch is ``batch_size / W`` rows of its
own share, and DDP averages the ranks' gradients in float32), with the block size and with
``train.size``. The equal split leaves out up to W - 1 rows per epoch so that every rank takes the same
number of optimiser steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from gradood.config import TrainJobConfig
from gradood.data.holdout import HeldOutSplit, HoldoutRule, Side
from gradood.data.images import ImageConverter, ImageDecodeError, decode_image
from gradood.data.sources import CorpusSource, Shard, load_rows, open_source
from gradood.models.base import DensityModel
from gradood.seeding import row_seed
from gradood.train.loop import TrainBatch
from gradood.train.read import concat_rows, decode_training_rows, shard_items

#: decoded bytes per block (one read task): small enough to stream, large enough to amortise a task
BLOCK_BYTES = 4 * 2**20
#: rows per block at most (28x28 grey images: 5349 rows fill 4 MiB)
MAX_BLOCK_ROWS = 8192
#: the per-epoch local shuffle buffer, in batches of one rank
SHUFFLE_BUFFER_BATCHES = 8
#: CPUs a read task asks for (the training workers hold theirs for the whole run)
READ_CPUS = 1.0
_SEED_MAX = 2**32


def block_rows(model: DensityModel) -> int:
    """Rows per read task: :data:`BLOCK_BYTES` of decoded uint8 pixels at the model's input size."""
    return max(1, min(MAX_BLOCK_ROWS, BLOCK_BYTES // math.prod(model.input_shape)))


def train_sources(cfg: TrainJobConfig) -> tuple[CorpusSource, CorpusSource | None]:
    """The rows the model trains on and the rows held out of training (None: none are): with
    ``train.holdout_fraction`` the two sides of the held-out split of ``train.uri``'s first ``train.size``
    rows, else those rows and the source's rows after them, if any."""
    source = open_source(cfg.train.uri, limit=cfg.train.size)
    if cfg.train.holdout_fraction > 0:
        rule = HoldoutRule(cfg.train.holdout_fraction, cfg.seed)
        return HeldOutSplit(source, rule, Side.training), HeldOutSplit(source, rule, Side.held_out)
    after = source.num_rows()
    if after < source.total_rows():
        return source, source.with_range(after)
    return source, None


def model_converter(model: DensityModel, cfg: TrainJobConfig) -> ImageConverter:
    return ImageConverter.for_model(model, cfg.image.resize, cfg.image.interpolation)


def decoded_rows(
    source: CorpusSource, shards: list[Shard], converter: ImageConverter, read_cpus: float = READ_CPUS
) -> ray.data.Dataset:
    """The decodable rows of ``shards`` in source order, one read task of ``read_cpus`` CPUs per shard
    (nothing read yet)."""
    ds = ray.data.from_items(shard_items(shards), override_num_blocks=len(shards))
    return ds.map_batches(
        decode_training_rows,
        fn_kwargs={"source": source, "converter": converter},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(),
        num_cpus=read_cpus,
    )


#: the input sizes a model takes when its size comes from the data (every family builds at each)
PRESET_SIZES = (28, 32, 64)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def preset_size(side: int) -> int:
    """The largest preset size not above ``side`` (the smallest preset for smaller images)."""
    return max([s for s in PRESET_SIZES if s <= side], default=PRESET_SIZES[0])


def shape_from_data(cfg: TrainJobConfig, source: CorpusSource) -> dict[str, int]:
    """``model.params.in_channels`` and ``image_size`` where the config leaves them out, from the first
    decodable training image: 1 channel for a grey image, else 3; its shorter side snapped to
    :data:`PRESET_SIZES` (the converter then resizes every image to it, rectangular ones included)."""
    missing = [key for key in ("in_channels", "image_size") if key not in cfg.model.params]
    if not missing:
        return {}
    for shard in source.shards(64):
        for row in source.read_shard(shard):
            if row.error is not None or row.payload is None:
                continue
            try:
                image = decode_image(row.payload) if isinstance(row.payload, bytes) else row.payload
            except ImageDecodeError:
                continue
            if isinstance(image, Image.Image):
                grey, (width, height) = image.mode in _GREY_MODES, image.size
            else:
                array = np.asarray(image)
                grey, (height, width) = array.ndim == 2 or array.shape[-1] == 1, array.shape[:2]
            found = {"in_channels": 1 if grey else 3, "image_size": preset_size(min(width, height))}
            return {key: found[key] for key in missing}
    raise ValueError(f"no decodable training rows in {source.uri} to take the input shape from")


def leading_rows(source: CorpusSource, converter: ImageConverter, limit: int) -> TrainBatch:
    """The first ``limit`` decodable rows in source order, decoded here (on the driver: a few thousand
    rows at most, read once and shipped to every rank, instead of a Ray Data pipeline per rank): the
    rows of the data-dependent init, and the held-out rows the held-out loss is measured on."""
    loaded, found = [], 0
    for shard in source.shards(max(1, limit)):
        loaded.append(load_rows(source, shard, converter))
        found += len(loaded[-1].ids)
        if found >= limit:
            break
    if not found:
        raise ValueError(f"no decodable training rows in {source.uri}")
    rows = concat_rows(loaded)
    return TrainBatch(
        ids=[str(i) for i in rows["id"][:limit]],
        row_index=torch.from_numpy(rows["row_index"][:limit]),
        images=torch.from_numpy(rows["image"][:limit]),
    )


@dataclass
class TrainingData:
    """What the workers get: the shuffled training rows (lazy: nothing is decoded until a worker
    iterates it), the rows of the data-dependent init, the held-out rows the held-out loss is measured on
    (None: none), and the source's description (with the number of blocks and the shuffle seed)."""

    dataset: ray.data.Dataset
    init: TrainBatch
    held_out: TrainBatch | None
    origin: dict[str, Any]


def train_dataset(
    cfg: TrainJobConfig,
    model: DensityModel,
    rows_per_block: int | None = None,
    sources: tuple[CorpusSource, CorpusSource | None] | None = None,
    read_cpus: float = READ_CPUS,
) -> TrainingData:
    """The training job's data (:class:`TrainingData`), from ``sources`` (:func:`train_sources`, opened
    here when not given).

    Only the source's row count, the init rows and the held-out loss's rows are read here (for a
    torchvision source that loads the dataset on the driver; a folder or Parquet source is only listed).
    """
    source, held_out = sources or train_sources(cfg)
    num_rows = source.num_rows()
    if num_rows == 0:
        raise ValueError(f"no training rows in {cfg.train.uri} (train.size={cfg.train.size})")
    converter = model_converter(model, cfg)
    shards = source.shards(rows_per_block or block_rows(model))
    shuffle_seed = row_seed(cfg.seed, "train", "shuffle") % _SEED_MAX
    ds = decoded_rows(source, shards, converter, read_cpus).random_shuffle(
        seed=shuffle_seed, num_cpus=read_cpus
    )
    ds.context.execution_options.preserve_order = True  # also when iterated outside Ray Train
    origin = {**source.describe(), "blocks": len(shards), "shuffle_seed": shuffle_seed}
    evaluated = None
    if held_out is not None and cfg.train.eval_rows > 0 and held_out.num_rows() > 0:
        evaluated = leading_rows(held_out, converter, cfg.train.eval_rows)
    return TrainingData(ds, leading_rows(source, converter, cfg.train.init_rows), evaluated, origin)


def data_config() -> Any:
    """Ray Train's data config: ``train`` split in equal shares, order preserved, which also makes the
    split deterministic (see the module docstring)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


class ToTrainBatch(NumpyBatchCollateFn):
    """Ray batch -> :class:`TrainBatch` (ids stay strings: the noise is drawn from them)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> TrainBatch:
        return TrainBatch(
            ids=[str(i) for i in batch["id"]],
            row_index=torch.from_numpy(np.array(batch["row_index"], dtype=np.int64)),
            images=torch.from_numpy(np.array(batch["image"], dtype=np.uint8)),
        )


def epoch_batches(
    iterator: Any, batch_size: int, seed: int, epoch: int, rank: int = 0
) -> Iterator[TrainBatch]:
    """One epoch of this rank's share (``iterator``: a ``DataIterator`` such as
    ``ray.train.get_dataset_shard("train")``, or ``Dataset.iterator()`` outside Ray Train)."""
    local_seed = row_seed(seed, f"epoch{epoch}", f"local-shuffle-rank{rank}") % _SEED_MAX
    return iter(
        iterator.iter_torch_batches(
            batch_size=batch_size,
            collate_fn=ToTrainBatch(),
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
            local_shuffle_seed=local_seed,
        )
    )
