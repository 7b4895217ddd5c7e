"""Object-store faults on a night: a loopback proxy in front of the local S3 server (moto) throttles
requests (503 SlowDown) or refuses writes, for the driver and the Ray workers alike (both reach S3
through ``AWS_ENDPOINT_URL_S3``, set to the proxy before Ray starts).

- Throttling: one in six distinct requests fails four times before it passes. pyarrow's default
  (3 attempts) would fail the night; gradood's S3 filesystems retry with the AWS SDK's backoff
  (``GRADOOD_S3_MAX_ATTEMPTS``: 6 here, so that a write refused for good gives up sooner than with the
  default 10), so the night finishes with the scores of an undisturbed one.
- A write that keeps failing (every PUT of the night's scores): the night fails, nothing is published
  (no ``_SUCCESS``, no ``runs.json`` entry), and the rerun of the same run id completes with the scores
  of an undisturbed night, each input once.
"""

from __future__ import annotations

import http.client
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import boto3
import numpy as np
import pytest

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.pipeline import ray_job
from tests.pipeline_fixtures import s3_environment, stop_shared_ray, tiny_glow_checkpoint, write_png_folder

pytestmark = pytest.mark.slow

BUCKET = "faults"
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream`` except the ones it fails: each distinct (method, path)
    that ``throttled`` picks answers 503 SlowDown on its first ``attempts_failed`` tries, and a
    PUT or POST whose path contains ``refuse`` (when set) always does."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream
        self.throttled = False
        self.attempts_failed = 4
        self.refuse: str | None = None
        self.tries: Counter[str] = Counter()
        self.injected = 0
        self.lock = threading.Lock()

    def should_fail(self, method: str, path: str) -> bool:
        key = f"{method} {path}"
        with self.lock:
            self.tries[key] += 1
            refused = self.refuse is not None and method in ("PUT", "POST") and self.refuse in path
            throttled = self.throttled and zlib.crc32(key.encode()) % 6 == 0
            fail = refused or (throttled and self.tries[key] <= self.attempts_failed)
            self.injected += fail
            return fail


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        if self.server.should_fail(self.command, self.path):
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():  # HEAD keeps the object's Content-Length
            if key.lower() not in ("transfer-encoding", "connection", "date", "server") and (
                self.command == "HEAD" or key.lower() != "content-length"
            ):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture(scope="module")
def faulty_s3(tmp_path_factory):
    """moto behind the proxy; the environment points pyarrow, boto3 and Ray's workers at the proxy."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultyProxy(server.get_host_and_port())
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    env = {**s3_environment(endpoint), "GRADOOD_S3_MAX_ATTEMPTS": "6"}
    stop_shared_ray()  # the Ray started after this fixture inherits the environment
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        client = boto3.client(
            "s3", endpoint_url=f"http://{server.get_host_and_port()[0]}:{server.get_host_and_port()[1]}"
        )
        client.create_bucket(Bucket=BUCKET)
        corpus = write_png_folder(tmp_path_factory.mktemp("corpus"), n_id=10, n_ood=5)
        for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
            client.put_object(Bucket=BUCKET, Key=f"corpus/{path.relative_to(corpus)}", Body=path.read_bytes())
        checkpoint = tiny_glow_checkpoint(tmp_path_factory.mktemp("ckpt"))
        try:
            yield SimpleNamespace(proxy=proxy, checkpoint=checkpoint, corpus=f"s3://{BUCKET}/corpus")
        finally:
            stop_shared_ray()
            proxy.shutdown()
            server.stop()


def night(store, out: str) -> dict:
    overrides = [
        f"model.checkpoint={store.checkpoint}",
        f"corpus.uri={store.corpus}",
        "fit.uri=torchvision://FashionMNIST?split=train",
        "fit.start=50000",
        "fit.size=40",
        f"output.uri={out}",
        "run.id=night",
        "extract.method=loop",  # features equal across processes to the last bit
        "extract.batch_size=8",
        "extract.shard_size=8",
        "extract.num_workers=1",
        "train.if_missing=false",
        "run.report_top_k=4",
    ]
    return ray_job.run_score_corpus(load_config(ScoreCorpusConfig, [], overrides))


def scores_by_id(out: str) -> dict[str, tuple[float, float]]:
    table = storage.read_parquet(storage.join(out, "runs", "night", "scores")).to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids))  # every input once
    return {r["id"]: (r["ood_score"], r["p_value"]) for r in table}


def assert_same_scores(got: dict, expected: dict) -> None:
    """The same inputs, with the same score and p-value (the features equal to the last bit)."""
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[i] for i in sorted(got)], [expected[i] for i in sorted(got)], rtol=1e-12)


@pytest.fixture(scope="module")
def undisturbed(faulty_s3, local_ray):
    out = f"s3://{BUCKET}/undisturbed"
    summary = night(faulty_s3, out)
    assert (summary["scored"], summary["rejected"]) == (15, 1)
    return scores_by_id(out)


def test_a_throttling_store_is_retried_and_the_night_equals_an_undisturbed_one(faulty_s3, undisturbed):
    proxy = faulty_s3.proxy
    proxy.throttled, before = True, proxy.injected
    try:
        out = f"s3://{BUCKET}/throttled"
        summary = night(faulty_s3, out)
    finally:
        proxy.throttled = False
    assert proxy.injected - before > 20  # the night met the faults, on the driver's and the workers' requests
    assert (summary["scored"], summary["rejected"]) == (15, 1)
    assert storage.exists(storage.join(out, "runs", "night", "_SUCCESS"))
    assert_same_scores(scores_by_id(out), undisturbed)


def test_a_write_that_keeps_failing_fails_the_night_unpublished_and_the_rerun_completes(
    faulty_s3, undisturbed
):
    proxy = faulty_s3.proxy
    out = f"s3://{BUCKET}/refused"
    proxy.refuse = "/refused/runs/night/scores/"
    try:
        with pytest.raises(Exception, match="SlowDown|503|reduce your request rate"):
            night(faulty_s3, out)
    finally:
        proxy.refuse = None
    assert not storage.exists(storage.join(out, "runs", "night", "_SUCCESS"))
    runs = (
        storage.read_json(storage.join(out, "runs.json"))
        if storage.exists(storage.join(out, "runs.json"))
        else {}
    )
    assert "night" not in str(runs)
    summary = night(faulty_s3, out)  # the same run id, the store healthy again
    assert (summary["scored"], summary["rejected"]) == (15, 1)
    assert storage.exists(storage.join(out, "runs", "night", "_SUCCESS"))
    assert_same_scores(scores_by_id(out), undisturbed)
