"""A multi-node cluster's faults, on one machine: ``ray.cluster_utils.Cluster`` with a head that runs no
task and three one-CPU worker nodes with small object stores. A worker node is removed (its raylet and
every process on it killed at once, as a spot preemption or a scale-down does) during extraction, while
it holds the reducer, and during scoring; a node joins mid-night. Every night must score each input
exactly once, with an undisturbed night's scores (to the killed-driver resume test's rounding); where
Ray cannot recover, the night must fail unpublished and the rerun of the same run id complete."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.pipeline import fit, ray_job
from gradood.pipeline.reducer import FitReducer
from tests.pipeline_fixtures import stop_shared_ray, tiny_glow_checkpoint, write_png_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKER_NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
INPUTS = 200


@pytest.fixture(scope="module")
def cluster():
    stop_shared_ray()
    head = {"num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(3):
        c.add_node(**WORKER_NODE)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    return {
        "checkpoint": tiny_glow_checkpoint(root / "ckpt"),
        "corpus": write_png_folder(root / "lake", n_id=150, n_ood=50, corrupt=False),
    }


def night_overrides(ws: dict[str, Path], out: Path) -> list[str]:
    """Small shards, so that a stage is still running when a node goes."""
    return [
        f"model.checkpoint={ws['checkpoint']}",
        f"corpus.uri={ws['corpus']}",
        f"output.uri={out}",
        "fit.uri=torchvision://FashionMNIST?split=test",
        "fit.size=200",
        "extract.batch_size=4",
        "extract.shard_size=4",
        "extract.num_workers=2",
        "train.if_missing=false",
        "run.id=night",
        "run.stall_timeout_s=180",
    ]


def night_config(ws: dict[str, Path], out: Path) -> ScoreCorpusConfig:
    return load_config(ScoreCorpusConfig, [], night_overrides(ws, out))


@pytest.fixture(scope="module")
def undisturbed(cluster, workspace, tmp_path_factory):
    summary = ray_job.run_score_corpus(night_config(workspace, tmp_path_factory.mktemp("undisturbed")))
    return scores_by_id(summary)


def scores_by_id(summary: dict[str, Any]) -> dict[str, float]:
    rows = storage.read_parquet(storage.join(summary["output"], "scores")).to_pylist()
    scores = {r["id"]: r["ood_score"] for r in rows}
    assert len(scores) == len(rows), "an input was scored twice"
    return scores


class NightInThread:
    """The job on a thread of this process (the cluster's driver), so the test can act meanwhile."""

    def __init__(self, cfg: ScoreCorpusConfig):
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self._thread.start()

    def _run(self, cfg: ScoreCorpusConfig) -> None:
        try:
            self.summary = ray_job.run_score_corpus(cfg)
        except BaseException as error:  # reported by result()
            self.error = error

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout_s: float = 400) -> dict[str, Any]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the night did not end within {timeout_s} s"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def wait_for(condition: Callable[[], Any], night: NightInThread, what: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert night.running(), f"the night ended before {what}"
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout_s} s")


def shards_in(directory: Path) -> int:
    return len(list(directory.glob("part-*.parquet")))


def node_of_actor(cluster: Cluster, class_fragment: str) -> Any:
    """The worker node holding a live actor whose class name contains ``class_fragment`` (None if none).
    The state API needs the dashboard, which this cluster does not start; the GCS's table does not."""
    from ray._private import state

    for actor in state.actors().values():
        if actor["State"] == "ALIVE" and class_fragment in actor["ActorClassName"]:
            node_id = actor["Address"]["NodeID"]
            return next((n for n in cluster.worker_nodes if n.node_id == node_id), None)
    return None


def finish_or_resume(night: NightInThread, cfg: ScoreCorpusConfig, out: Path) -> tuple[dict[str, Any], bool]:
    """The night's summary, or, where it failed, proof that it was not published and the rerun's summary."""
    try:
        return night.result(), False
    except Exception:
        run_dir = out / "runs" / "night"
        assert not (run_dir / "_SUCCESS").exists(), "a failed night was published"
        return ray_job.run_score_corpus(cfg), True


def assert_same_night(summary: dict[str, Any], undisturbed: dict[str, float]) -> None:
    assert summary["inputs"] == INPUTS and summary["scored"] == INPUTS and summary["rejected"] == 0
    scores = scores_by_id(summary)
    assert scores.keys() == undisturbed.keys()
    for row_id, score in scores.items():
        assert score == pytest.approx(undisturbed[row_id], rel=1e-5), row_id


def replace_node(cluster: Cluster, victim: Any) -> None:
    """Kill a worker node at once, and let a new one join, as an autoscaler replaces a preempted node
    (a node lost for good is the last test's)."""
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(**WORKER_NODE)


def test_losing_a_node_during_extraction_and_one_joining(cluster, workspace, undisturbed, tmp_path):
    cfg = night_config(workspace, tmp_path)
    features = tmp_path / "runs" / "night" / "features"
    night = NightInThread(cfg)
    wait_for(lambda: shards_in(features) >= 5, night, "corpus shards")
    victim = wait_for(lambda: node_of_actor(cluster, "ShardFeatureWriter"), night, "a model worker")
    replace_node(cluster, victim)
    done_at_loss = shards_in(features)
    summary, resumed = finish_or_resume(night, cfg, tmp_path)
    assert done_at_loss < INPUTS // 4, "the node went after extraction had finished"
    assert not resumed, "losing a worker node during extraction should not fail the night"
    assert_same_night(summary, undisturbed)


def test_losing_the_reducers_node_during_the_fit(
    cluster, workspace, undisturbed, tmp_path, monkeypatch, capsys
):
    victim = min(cluster.worker_nodes, key=lambda node: node.node_id)

    def reducer_on_victim(num_features: int):  # where Ray could have put it: on a worker node
        strategy = NodeAffinitySchedulingStrategy(node_id=victim.node_id, soft=False)
        options = {"num_cpus": 0, "max_restarts": 0, "scheduling_strategy": strategy}
        return ray.remote(FitReducer).options(**options).remote(num_features)

    monkeypatch.setattr(fit, "start_reducer", reducer_on_victim)
    cfg = night_config(workspace, tmp_path)
    night = NightInThread(cfg)
    wait_for(lambda: shards_in(tmp_path / "fit" / "features") >= 5, night, "fit-set shards")
    assert node_of_actor(cluster, "FitReducer") is victim
    replace_node(cluster, victim)
    summary, resumed = finish_or_resume(night, cfg, tmp_path)
    assert not resumed, "losing the reducer's node should not fail the night"
    assert "reducer result unavailable" in capsys.readouterr().out
    assert_same_night(summary, undisturbed)


def test_losing_a_node_during_scoring(cluster, workspace, undisturbed, tmp_path):
    cfg = night_config(workspace, tmp_path)
    night = NightInThread(cfg)
    victim = wait_for(lambda: node_of_actor(cluster, "Scorer"), night, "a scoring worker", timeout_s=400)
    replace_node(cluster, victim)
    summary, _ = finish_or_resume(night, cfg, tmp_path)
    assert_same_night(summary, undisturbed)


def test_a_lost_node_not_replaced_fails_by_name_or_finishes_and_the_rerun_completes(
    cluster, workspace, undisturbed, tmp_path
):
    """A node lost for good leaves fewer CPUs than the stage was planned for. The night either finishes
    or stalls and fails naming the stage after run.stall_timeout_s; then it is unpublished and the rerun,
    planned for the smaller cluster, resumes from the finished shards. The night runs as the job does,
    in its own process attached to the cluster, whose exit takes a stalled executor along."""
    out = tmp_path / "out"
    features = out / "runs" / "night" / "features"
    cfg = night_config(workspace, out)
    overrides = night_overrides(workspace, out)
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "score_corpus.py"), *overrides, "run.stall_timeout_s=30"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while shards_in(features) < 5:
        assert job.poll() is None and time.monotonic() < deadline, "no corpus shards before the loss"
        time.sleep(0.02)
    victim = None
    while victim is None and job.poll() is None:
        victim = node_of_actor(cluster, "ShardFeatureWriter")
    assert victim is not None, "the night ended before the loss"
    cluster.remove_node(victim, allow_graceful=False)
    _, stderr = job.communicate(timeout=400)
    try:
        if job.returncode != 0:
            assert "StallError: corpus features: no progress for 30 s" in stderr, stderr[-3000:]
            assert not (out / "runs" / "night" / "_SUCCESS").exists(), "a failed night was published"
            summary = ray_job.run_score_corpus(cfg)
            assert summary["resumed_shards"] >= 5
        else:
            summary = storage.read_json(str(out / "runs" / "night" / "summary.json"))
        assert_same_night(summary, undisturbed)
    finally:
        cluster.add_node(**WORKER_NODE)
        cluster.wait_for_nodes()
