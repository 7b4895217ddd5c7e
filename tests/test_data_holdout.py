"""The held-out split: which rows a model never trains on, the same wherever it is computed, and the fit
set the scoring job takes from a checkpoint's record of it."""

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradood.config import FitConfig
from gradood.data.holdout import HeldOutSplit, HoldoutRule, Side, held_out_rows
from gradood.data.sources import open_source
from gradood.pipeline.fit import fit_set_warnings, fit_source

FMNIST_TEST = "torchvision://FashionMNIST?split=test"


def reference_held_out(row_id: str, fraction: float, seed: int) -> bool:
    """The rule written out: a uniform from sha256(seed, "holdout", id) below the fraction."""
    digest = hashlib.sha256(f"{seed}\x00holdout\x00{row_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)) / 2.0**63 < fraction


def all_rows(source, shard_size: int) -> list[tuple[str, int]]:
    return [
        (row.id, row.row_index) for shard in source.shards(shard_size) for row in source.read_shard(shard)
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(40):
        Image.fromarray(np.full((6, 5), 5 * i, np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    for part in range(3):
        cells = []
        for i in range(15):
            buffer = io.BytesIO()
            Image.fromarray(np.full((4, 4), 10 * part + i, np.uint8)).save(buffer, format="PNG")
            cells.append(buffer.getvalue())
        pq.write_table(pa.table({"image": cells}), root / f"part-{part}.parquet", row_group_size=4)
    return root


@pytest.mark.parametrize("kind", ["torchvision", "folder", "parquet"])
def test_the_two_sides_partition_the_source_by_the_rule(kind, folder, parquet_folder):
    uri = {"torchvision": FMNIST_TEST, "folder": str(folder), "parquet": str(parquet_folder)}[kind]
    source = open_source(uri, limit=300 if kind == "torchvision" else None)
    rule = HoldoutRule(0.25, seed=7)
    everything = all_rows(source, 1000)
    held = HeldOutSplit(source, rule, Side.held_out)
    training = HeldOutSplit(source, rule, Side.training)
    expected = [row_id for row_id, _ in everything if reference_held_out(row_id, 0.25, 7)]
    assert 0 < len(expected) < len(everything)
    for shard_size in (1, 3, 64):  # any shard layout reads the same rows, numbered 0..n-1 in order
        rows = all_rows(held, shard_size)
        assert [row_id for row_id, _ in rows] == expected
        assert [index for _, index in rows] == list(range(len(expected)))
    kept = [row_id for row_id, _ in all_rows(training, 5)]
    assert kept == [row_id for row_id, _ in everything if row_id not in set(expected)]
    assert held.row_ids(0, held.num_rows()) == expected
    assert held.describe()["holdout"] == {"fraction": 0.25, "seed": 7, "stream": "holdout",
                                          "side": "held_out", "start": 0, "limit": None}  # fmt: skip
    assert held.describe()["num_rows"] == len(expected)
    assert held.describe()["source_rows"] == len(everything)


def test_a_folder_side_reads_only_its_own_files(folder):
    source = open_source(str(folder))
    held = HeldOutSplit(source, HoldoutRule(0.25, seed=7), Side.held_out)
    shard = held.shards(100)[0]
    _, reads = shard.locator
    read_files = [path for _, _, locator in reads for path in locator]
    assert [source._id_of(p) for p in read_files] == held.row_ids(0, held.num_rows())


def test_start_and_limit_select_a_range_of_one_side():
    source = open_source(FMNIST_TEST, limit=400)
    rule = HoldoutRule(0.5, seed=1)
    whole = HeldOutSplit(source, rule, Side.held_out).row_ids(0, 400)
    part = HeldOutSplit(source, rule, Side.held_out, start=10, limit=20)
    assert [row_id for row_id, _ in all_rows(part, 7)] == whole[10:30]


def test_the_rule_checks_its_fraction_and_round_trips():
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="held-out fraction"):
            HoldoutRule(bad, 0)
    rule = HoldoutRule(0.1, 3)
    assert HoldoutRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="unknown held-out rule"):
        HoldoutRule.from_dict({**rule.to_dict(), "stream": "other"})


def _record(source, **extra) -> dict:
    """model.json's training.data as the training job writes it for ``source``."""
    return {**source.describe(), "rows": source.num_rows(), **extra}


def test_the_fit_set_defaults_to_the_checkpoints_held_out_rows(folder):
    rule = HoldoutRule(0.3, seed=2)
    training = HeldOutSplit(open_source(str(folder)), rule, Side.training)
    meta = {"training": {"data": _record(training)}}
    source = fit_source(FitConfig(uri=None, start=0, size=None), meta)
    assert isinstance(source, HeldOutSplit) and source.side is Side.held_out
    expected = HeldOutSplit(open_source(str(folder)), rule, Side.held_out).row_ids(0, 40)
    assert [row_id for row_id, _ in all_rows(source, 4)] == expected
    assert not set(expected) & set(training.row_ids(0, training.num_rows()))
    assert fit_set_warnings(meta, source) == []
    # fit.start / fit.size pick a range of the held-out rows
    picked = fit_source(FitConfig(uri=None, start=1, size=2), meta)
    assert [row_id for row_id, _ in all_rows(picked, 4)] == expected[1:3]


def test_a_model_trained_on_leading_rows_holds_out_the_rest():
    trained = open_source(FMNIST_TEST, limit=9000)
    source = held_out_rows(_record(trained), start=100, limit=50)
    assert (source.uri, source.start, source.num_rows()) == (FMNIST_TEST, 9100, 50)
    with pytest.raises(ValueError, match="trained on every row of .* holding none out"):
        held_out_rows(_record(open_source(FMNIST_TEST)))
    with pytest.raises(ValueError, match="fit.start=1000 is past the 1000 rows held out"):
        held_out_rows(_record(trained), start=1000)
    with pytest.raises(ValueError, match="does not record its training data"):
        held_out_rows(None)


def test_an_explicit_fit_set_with_training_rows_is_refused(folder):
    rule = HoldoutRule(0.3, seed=2)
    training = HeldOutSplit(open_source(str(folder)), rule, Side.training)
    meta = {"training": {"data": _record(training)}}
    whole = open_source(str(folder))
    with pytest.raises(ValueError, match=f"include {training.num_rows()} rows that the model trained on"):
        fit_set_warnings(meta, whole)
    # a range holding only held-out rows is accepted
    held = [i for i, row_id in enumerate(whole.row_ids(0, 40)) if reference_held_out(row_id, 0.3, 2)]
    assert fit_set_warnings(meta, open_source(str(folder), start=held[0], limit=1)) == []
