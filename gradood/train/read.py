"""The read step of the training Dataset (:mod:`gradood.train.data`), kept free of torch and Ray so that
the Ray Data tasks running it start fast: shard descriptors in, decoded rows out."""

from __future__ import annotations

import pickle

import numpy as np

from gradood.data.base import Shard
from gradood.data.images import ImageConverter
from gradood.data.sources import CorpusSource, LoadedRows, load_rows


def decode_training_rows(
    batch: dict[str, np.ndarray], source: CorpusSource, converter: ImageConverter
) -> dict[str, np.ndarray]:
    """Ray Data UDF: a batch of pickled shard descriptors (:func:`shard_items`) -> their decodable rows,
    ``id`` (str), ``row_index`` (position in the source's row order) and ``image`` (uint8 ``[C, H, W]``);
    undecodable rows drop out."""
    return concat_rows([load_rows(source, pickle.loads(item), converter) for item in batch["shard"]])


def concat_rows(loaded: list[LoadedRows]) -> dict[str, np.ndarray]:
    """The decoded rows of several shards as one batch of ``id``, ``row_index`` and ``image``."""
    return {
        "id": np.asarray([i for rows in loaded for i in rows.ids], dtype=str),
        "row_index": np.concatenate([rows.row_index for rows in loaded]).astype(np.int64),
        "image": np.concatenate([rows.images for rows in loaded]),
    }


def shard_items(shards: list[Shard]) -> list[dict[str, bytes]]:
    """Dataset items for :func:`decode_training_rows`: shard descriptors pickled by us (their locators
    mix types Arrow cannot hold), so Ray Data stores plain bytes instead of guessing."""
    return [{"shard": pickle.dumps(shard)} for shard in shards]
