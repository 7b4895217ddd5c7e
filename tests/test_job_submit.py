"""`ray job submit -- python jobs/score_corpus.py` against a local head started with `ray start --head`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.pipeline_fixtures import stop_shared_ray, tiny_glow_checkpoint, write_png_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes_under(marker: str) -> None:
    """Stop only this head's processes (`ray stop` would also kill any other Ray on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and marker in _cmdline(p) and int(p.name) != os.getpid()
        ]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if pids:
            time.sleep(2)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def ray_head():
    """A real head node; token auth off on both sides (Ray 2.5x enables it for new local clusters)."""
    stop_shared_ray()  # the suite's embedded Ray is not needed here, and its workers would compete
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray = shutil.which("ray", path=env["PATH"])
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="gradood-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=3",
            "--include-dashboard=true",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield env, ray, f"http://127.0.0.1:{dash}"
    finally:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job(ray_head, tmp_path):
    env, ray, address = ray_head
    ckpt = tiny_glow_checkpoint(tmp_path / "ckpt")
    corpus = write_png_folder(tmp_path / "corpus", n_id=6, n_ood=3)
    out = tmp_path / "out"
    cmd = [
        ray,
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        "--",
        "python",
        "jobs/score_corpus.py",
        f"model.checkpoint={ckpt}",
        f"corpus.uri={corpus}",
        f"output.uri={out}",
        "fit.uri=torchvision://FashionMNIST?split=train",  # the tiny checkpoint records no held-out rows
        "fit.start=50000",
        "fit.size=24",
        "extract.shard_size=8",
        "extract.batch_size=8",
        "extract.num_workers=1",
        "train.if_missing=false",
        "run.id=2026-11-23",
    ]
    deadline = time.monotonic() + 300
    while True:  # the head's job agent registers a few seconds after `ray start` returns
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        if "No available agent to submit job" not in log or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, log[-4000:]
    assert "scored 9 + rejected 1 = 10 inputs" in log
    summary = json.loads((out / "runs" / "2026-11-23" / "summary.json").read_text())
    assert (out / "runs" / "2026-11-23" / "_SUCCESS").is_file()
    assert summary["scored"] == 9 and summary["rejected"] == 1
