"""The read step of the training Dataset (:mod:`gradood.train.data`), kept free of torch and Ray so that
the Ray Data tasks running it start fast: shard descriptors in, decoded rows out."""

from __future__ import annotations

import pickle

import numpy as np

from gradood.data.base import Shard
from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, load_rows


def decode_shards(
    batch: dict[str, np.ndarray], source: CorpusSource, converter: ImageConverter
) -> dict[str, np.ndarray]:
    """Ray Data UDF: a batch of pickled shard descriptors (:func:`shard_items`) -> their decodable rows,
    ``id`` (str), ``index`` (position in the source's row order) and ``image`` (uint8 ``[C, H, W]``);
    undecodable rows drop out."""
    ids: list[str] = []
    index, images = [], []
    for item in batch["shard"]:
        shard: Shard = pickle.loads(item)
        loaded = load_rows(source, shard, converter)
        ids.extend(loaded.ids)
        index.append(loaded.indices)
        images.append(loaded.images)
    return {
        "id": np.asarray(ids, dtype=str),
        "index": np.concatenate(index).astype(np.int64),
        "image": np.concatenate(images),
    }


def shard_items(shards: list[Shard]) -> list[dict[str, bytes]]:
    """Dataset items for :func:`decode_shards`: shard descriptors pickled by us (their locators mix types
    Arrow cannot hold), so Ray Data stores plain bytes instead of guessing."""
    return [{"shard": pickle.dumps(shard)} for shard in shards]
