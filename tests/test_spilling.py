"""Memory pressure: the scoring stage, the one that holds a whole night in the object store (it is
materialised and sorted by Ray Data), over feature blocks several times the object store's size, so
Ray spills them to disk. The night must come out whole and ranked (every row once, each with the score
its features give), Ray must have spilled, the driver's memory must stay flat and every Ray worker's
peak memory under a bound (docs/reliability.md)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.pipeline import ray_job
from gradood.pipeline.score import score_run
from tests.pipeline_fixtures import stop_shared_ray, tiny_glow_checkpoint, write_png_folder

pytestmark = pytest.mark.slow

OBJECT_STORE = 80 * 2**20
#: the night's feature blocks, as a multiple of the object store
PRESSURE = 4
#: the largest peak resident memory of any Ray worker process, and the driver's growth, allowed
WORKER_PEAK_BOUND = 2 * 2**30
DRIVER_GROWTH_BOUND = 256 * 2**20
#: ids as long as a lake's object keys are, so that fewer rows fill the store
ID_PREFIX = "s3://lake/incoming/" + "/".join(f"camera-{k:04d}" for k in range(40))


@pytest.fixture(scope="module")
def small_store_ray(tmp_path_factory):
    stop_shared_ray()
    spill_dir = tmp_path_factory.mktemp("spill")
    spilling = {"type": "filesystem", "params": {"directory_path": str(spill_dir)}}
    ray.init(
        address="local",
        num_cpus=3,
        object_store_memory=OBJECT_STORE,
        include_dashboard=False,
        _system_config={"object_spilling_config": json.dumps(spilling)},
    )
    yield
    ray.shutdown()


def resident_bytes(pid: int | str, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, from /proc; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def ray_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


class PeakSampler:
    """The driver's resident memory sampled on a thread, and each Ray worker's peak as /proc records it."""

    def __init__(self):
        self.base = resident_bytes("self", "VmRSS")
        self.driver_peak = self.base
        self.worker_peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.driver_peak = max(self.driver_peak, resident_bytes("self", "VmRSS"))
            for pid in ray_worker_pids():
                self.worker_peaks[pid] = max(self.worker_peaks.get(pid, 0), resident_bytes(pid, "VmHWM"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def spilled_bytes() -> int:
    from ray._private.internal_api import memory_summary

    match = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return int(match.group(1)) * 2**20 if match else 0


def test_a_night_several_times_the_object_store_is_spilled_and_scored_whole(small_store_ray, tmp_path):
    corpus = write_png_folder(tmp_path / "lake", n_id=30, n_ood=10, corrupt=False)
    cfg = load_config(
        ScoreCorpusConfig,
        [],
        [
            f"model.checkpoint={tiny_glow_checkpoint(tmp_path / 'ckpt')}",
            f"corpus.uri={corpus}",
            f"output.uri={tmp_path / 'small'}",
            "fit.uri=torchvision://FashionMNIST?split=test",
            "fit.size=40",
            "extract.batch_size=8",
            "extract.shard_size=8",
            "train.if_missing=false",
            "run.id=night",
            # a fixed combination: every copy of a row must then get exactly that row's score
            "detect.combination=fisher",
        ],
    )
    small = ray_job.run_score_corpus(cfg)
    detector = storage.read_json(str(tmp_path / "small" / "detector.json"))
    features = storage.read_parquet(storage.join(small["output"], "features"))
    small_scores = storage.read_parquet(storage.join(small["output"], "scores")).to_pylist()
    expected = {r["id"]: (r["ood_score"], r["p_value"]) for r in small_scores}

    # the big night: copies of the small night's feature rows under new ids, in files of a shard's size
    n = features.num_rows
    bytes_per_copy = _copy(features, 0).nbytes
    per_file = max(1, 512 // n)
    files = int(np.ceil(PRESSURE * OBJECT_STORE / bytes_per_copy / per_file))
    copies = files * per_file
    big = tmp_path / "big"
    for f in range(files):
        table = pa.concat_tables([_copy(features, f * per_file + k) for k in range(per_file)])
        storage.write_parquet(table, str(big / "features" / f"part-{f:06d}.parquet"))

    sampler = PeakSampler()
    scores = score_run(str(big / "features"), str(big / "scores"), detector, cfg, {}, "s3://lake/incoming")
    sampler.stop()

    assert spilled_bytes() > 0, "nothing was spilled: the night did not exceed the object store"
    rows = scores.feature_rows
    assert rows == copies * n
    table = storage.read_parquet(str(big / "scores")).select(["id", "rank", "ood_score", "p_value"])
    assert table.num_rows == rows
    ranks = np.sort(table.column("rank").to_numpy())
    assert np.array_equal(ranks, np.arange(1, rows + 1)), "ranks are not a permutation of 1..rows"
    order = np.argsort(table.column("rank").to_numpy())
    ranked_scores = table.column("ood_score").to_numpy()[order]
    assert np.all(np.diff(ranked_scores) <= 0), "rank 1 is not the highest score"
    originals = pc.replace_substring_regex(table.column("id"), r"^.*/copy-\d+/", "").to_pylist()
    got = np.column_stack([table.column("ood_score").to_numpy(), table.column("p_value").to_numpy()])
    want = np.array([expected[i] for i in originals])
    np.testing.assert_allclose(got, want, rtol=1e-12)

    driver_growth = sampler.driver_peak - sampler.base
    worker_peak = max(sampler.worker_peaks.values())
    print(
        f"feature blocks {copies * bytes_per_copy / 2**20:.0f} MiB, object store {OBJECT_STORE / 2**20:.0f} "
        f"MiB, spilled {spilled_bytes() / 2**20:.0f} MiB; driver growth {driver_growth / 2**20:.0f} MiB; "
        f"largest worker peak {worker_peak / 2**20:.0f} MiB over {len(sampler.worker_peaks)} workers"
    )
    assert driver_growth < DRIVER_GROWTH_BOUND
    assert worker_peak < WORKER_PEAK_BOUND


def _copy(features: pa.Table, k: int) -> pa.Table:
    """Copy ``k`` of the feature rows: ids under ``copy-k/`` and row indices after the earlier copies'."""
    n = features.num_rows
    ids = pa.array([f"{ID_PREFIX}/copy-{k:05d}/{i}" for i in features.column("id").to_pylist()])
    row_index = pa.array(np.arange(k * n, (k + 1) * n, dtype=np.int64))
    table = features.set_column(features.schema.get_field_index("id"), "id", ids)
    return table.set_column(table.schema.get_field_index("row_index"), "row_index", row_index)
