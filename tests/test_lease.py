"""Leases: a second run of the same id refuses naming the holder, a dead holder's lease is taken over,
and runs publishing at once all land in runs.json; on local disk and on the local S3 server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.pipeline.lease import Lease, LeaseHeld, runs_in_progress
from gradood.pipeline.publish import (
    INDEX,
    manifest_uri,
    publish,
    run_dir,
    seen_manifests,
    unpublish,
    write_manifest,
)
from gradood.pipeline.ray_job import run_score_corpus

COUNTS = {"inputs": 1, "scored": 1, "rejected": 0, "skipped": 0, "flagged": 0}


def _leases(root: str) -> None:
    uri = storage.join(root, "runs", "night", "_LEASE")
    with Lease(uri, "run night", timeout_s=30, settle_s=0.05) as first:
        holder = storage.read_json(uri)
        assert holder["token"] == first.token and holder["timeout_s"] == 30
        with pytest.raises(LeaseHeld, match=r"run night is held by .*@.* pid \d+ \(last heartbeat \d+ s ago"):
            Lease(uri, "run night", timeout_s=30, settle_s=0.05).acquire()
        first.check()
    assert not storage.exists(uri)  # released
    # a holder that died (no heartbeat for longer than the timeout) is taken over
    storage.write_json(uri, {"owner": "cron", "host": "gone", "pid": 1, "token": "old", "heartbeat": 0.0})
    with Lease(uri, "run night", timeout_s=30, settle_s=0.05) as taker:
        assert storage.read_json(uri)["token"] == taker.token


@pytest.mark.parametrize("where", ["local", "file_uri"])
def test_a_second_holder_refuses_and_a_dead_one_is_taken_over(tmp_path, where):
    _leases(str(tmp_path) if where == "local" else f"file://{tmp_path}")


def test_on_s3(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket="leases")
    _leases("s3://leases/out")


def test_the_heartbeat_keeps_a_lease_alive_and_a_taken_over_holder_knows(tmp_path):
    uri = str(tmp_path / "_LEASE")
    with Lease(uri, "run a", timeout_s=0.4, settle_s=0.01) as lease:
        time.sleep(1.0)  # longer than the timeout: only the heartbeat keeps it
        with pytest.raises(LeaseHeld, match="run a is held by"):
            Lease(uri, "run a", timeout_s=0.4, settle_s=0.01).acquire()
        storage.write_json(uri, {**storage.read_json(uri), "token": "someone else"})
        time.sleep(0.3)  # the next heartbeat sees the other token
        with pytest.raises(LeaseHeld, match="was taken over"):
            lease.check()
    assert storage.read_json(uri)["token"] == "someone else"  # release leaves the new holder's lease


def test_two_processes_racing_for_a_free_lease_on_local_disk_get_it_once(tmp_path):
    uri = str(tmp_path / "_LEASE")
    won, lost = [], []

    def take() -> None:
        lease = Lease(uri, "run r", timeout_s=30, settle_s=0.2)
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            lost.append(lease)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5
    won[0].release()


def test_runs_publishing_at_once_all_land_in_runs_json(tmp_path):
    out = str(tmp_path)
    ids = [f"2026-12-{day:02d}" for day in range(1, 13)]
    for run_id in ids:
        storage.makedirs(run_dir(out, run_id))

    def night(run_id: str) -> None:
        unpublish(out, run_id)
        publish(out, run_id, COUNTS)

    threads = [threading.Thread(target=night, args=(run_id,)) for run_id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["run_id"] for r in storage.read_json(storage.join(out, INDEX))["runs"]) == ids


def test_the_job_refuses_a_run_id_another_run_holds(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(ScoreCorpusConfig, [], [f"output.uri={out}", "run.id=2026-12-06"])
    uri = str(out / "leases" / "2026-12-06.json")
    with Lease(uri, "run 2026-12-06", timeout_s=600):
        with pytest.raises(LeaseHeld, match="run 2026-12-06 is held by"):
            run_score_corpus(cfg)  # refused before anything is written or Ray starts
    assert not (out / "runs" / "2026-12-06" / "run.yaml").exists()


def test_a_night_started_while_another_runs_skips_that_runs_inputs(tmp_path):
    out = str(tmp_path)
    files = pa.table({"uri": ["/lake/a.png"], "size": [1], "mtime_ns": [1]})
    for run_id in ("tonight", "crashed", "published"):
        write_manifest(out, run_id, files)
    storage.makedirs(run_dir(out, "published"))
    publish(out, "published", COUNTS)
    dead = {"owner": "cron", "host": "h", "pid": 1, "token": "t", "heartbeat": 0.0, "timeout_s": 600}
    storage.write_json(storage.join(out, "leases", "crashed.json"), dead)
    with Lease.for_run(out, "tonight", 600):
        assert runs_in_progress(out) == ["tonight"]
        assert seen_manifests(out, "tomorrow") == [manifest_uri(out, r) for r in ("published", "tonight")]
        assert seen_manifests(out, "tonight") == [manifest_uri(out, "published")]  # its own rerun
    assert runs_in_progress(out) == [] and seen_manifests(out, "tomorrow") == [manifest_uri(out, "published")]


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    uri = str(tmp_path / "leases" / "night.json")
    record = {"owner": "me", "host": socket.gethostname(), "pid": int(gone.stdout), "token": "killed"}
    storage.write_json(uri, {**record, "heartbeat": time.time(), "timeout_s": 600})
    assert runs_in_progress(str(tmp_path)) == []
    with Lease(uri, "run night", timeout_s=600, settle_s=0.01) as lease:
        assert storage.read_json(uri)["token"] == lease.token
    alive = {**record, "pid": os.getppid(), "heartbeat": time.time(), "timeout_s": 600}  # pytest's parent
    storage.write_json(uri, alive)
    assert runs_in_progress(str(tmp_path)) == ["night"]
    with pytest.raises(LeaseHeld):
        Lease(uri, "run night", timeout_s=600, settle_s=0.01).acquire()
