"""A night on a one-CPU Ray finishes (the model worker and decoding share the CPU); a stage that cannot
be scheduled at all fails naming itself after ``run.stall_timeout_s``, and the rerun resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from gradood.config import ExtractConfig
from gradood.pipeline import extract, ray_job
from gradood.pipeline.watchdog import StallError
from tests.pipeline_fixtures import stop_shared_ray
from tests.test_pipeline_job import job_config, job_overrides, workspace  # noqa: F401  (a module fixture)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        (8.0, extract.CpuPlan(workers=2, worker_cpus=1.0, task_cpus=1.0)),
        (2.0, extract.CpuPlan(workers=1, worker_cpus=1.0, task_cpus=1.0)),
        (1.0, extract.CpuPlan(workers=1, worker_cpus=0.5, task_cpus=0.5)),
    ],
)
def test_cpu_plan_leaves_decoding_a_cpu(monkeypatch, cpus, expected):
    monkeypatch.setattr(extract.ray, "cluster_resources", lambda: {"CPU": cpus})
    plan = extract.plan_cpus(ExtractConfig(num_workers=2), shards=10, what="stage")
    assert plan == expected
    assert plan.workers * plan.worker_cpus + plan.task_cpus <= cpus


@pytest.mark.parametrize(
    ("cpus", "workers", "expected"), [(8.0, 2, (1.0, 1.0)), (2.0, 2, (0.5, 1.0)), (1.0, 1, (0.5, 0.5))]
)
def test_training_cpu_plan_leaves_reading_a_share(monkeypatch, cpus, workers, expected):
    from gradood.config import TrainConfig
    from gradood.train import trainer

    monkeypatch.setattr(trainer.ray, "cluster_resources", lambda: {"CPU": cpus})
    plan = trainer.plan_training_cpus(TrainConfig(num_workers=workers))
    assert (plan.worker, plan.read) == expected
    assert workers * plan.worker + plan.read <= cpus


@pytest.fixture(scope="module")
def one_cpu_ray():
    stop_shared_ray()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_one_cpu_night_finishes(one_cpu_ray, workspace, tmp_path):  # noqa: F811
    cfg = job_config(workspace, str(tmp_path / "out"), "ray.num_cpus=1", "run.stall_timeout_s=240")
    summary = ray_job.run_score_corpus(cfg)
    assert summary["inputs"] == 19 and summary["scored"] == 18 and summary["rejected"] == 1


def test_unschedulable_stage_fails_by_name_and_rerun_completes(one_cpu_ray, workspace, tmp_path):  # noqa: F811
    out = str(tmp_path / "out")
    # a GPU the cluster does not have: the model workers never start. Run as the job a user runs, in its
    # own process and embedded Ray: the stalled stage's executor is left behind, and the process exits.
    stuck = job_overrides(
        workspace, out, "ray.num_cpus=1", "extract.gpus_per_worker=1", "run.stall_timeout_s=15"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = str(REPO / "jobs" / "score_corpus.py")
    job = subprocess.run(
        [sys.executable, script, *stuck], capture_output=True, text=True, timeout=240, env=env
    )
    assert job.returncode != 0
    assert f"{StallError.__name__}: fit-set features: no progress for 15 s" in job.stderr
    summary = ray_job.run_score_corpus(job_config(workspace, out, "run.stall_timeout_s=240"))
    assert summary["inputs"] == 19 and summary["scored"] == 18 and summary["rejected"] == 1


def test_unschedulable_scoring_stage_fails_by_name_and_rerun_completes(
    one_cpu_ray,
    workspace,  # noqa: F811
    tmp_path,
):
    """The scoring stage is watched too: a pool whose actor can never start (two CPUs asked of a one-CPU
    cluster) fails naming the stage; the rerun takes over every extracted shard and completes. The
    stalled night runs in its own process, as the job does, whose exit takes its stalled executor along."""
    out = str(tmp_path / "out")
    script = tmp_path / "stalled_scoring.py"
    script.write_text(
        "import sys\n"
        "from gradood.config import ScoreCorpusConfig, load_config\n"
        "from gradood.pipeline import extract, ray_job, score\n"
        "score.plan_cpus = lambda *args: extract.CpuPlan(1, 2.0, 0.5)\n"
        "ray_job.run_score_corpus(load_config(ScoreCorpusConfig, [], sys.argv[1:]))\n"
    )
    stalled = job_overrides(workspace, out, "ray.num_cpus=1", "run.stall_timeout_s=20")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    job = subprocess.run(
        [sys.executable, str(script), *stalled], capture_output=True, text=True, timeout=240, env=env
    )
    assert job.returncode != 0
    assert f"{StallError.__name__}: scoring: no progress for 20 s" in job.stderr
    summary = ray_job.run_score_corpus(job_config(workspace, out, "run.stall_timeout_s=240"))
    assert summary["inputs"] == 19 and summary["scored"] == 18 and summary["resumed_shards"] > 0


def test_training_on_one_cpu_finishes(tmp_path):
    """The training job on a one-CPU Ray: the worker's reservation shrinks so that the Ray Data tasks
    reading and shuffling the rows get the CPU (with a whole CPU held by the worker, it waited forever)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.run(
        [
            sys.executable, str(REPO / "jobs" / "train.py"), "ray.num_cpus=1", "model=glow",
            "model.params.num_steps=1", "model.params.hidden_channels=8", "train.size=64", "train.epochs=1",
            "train.batch_size=16", "train.eval_rows=16", "train.init_rows=16",
            f"model.checkpoint={tmp_path / 'model'}", f"train.runs_uri={tmp_path / 'runs'}",
        ],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    assert "training worker(s) of train.cpus_per_worker=1 and a task reading the rows" in job.stdout
    assert (tmp_path / "model" / "model.json").is_file()
