import os

import pytest
import torch

from tests.pipeline_fixtures import s3_environment, stop_shared_ray

torch.set_num_threads(int(os.environ.get("GRADOOD_TEST_THREADS", "1")))
# every Ray the tests start is local to this machine; Ray reads the mode once per process, so a module
# whose multi-node cluster needs it off would leave the next module's Ray unable to start with it on
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def _shared_ray_session():
    yield
    stop_shared_ray()


@pytest.fixture(scope="module")
def local_ray(_shared_ray_session):
    """One embedded Ray for the session (3 CPUs: two extraction workers and the reducer/scorer),
    started by the first module that asks for it, so Ray starts once per run rather than per module."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server (moto) for one test module, and the environment that points
    pyarrow, boto3 and the Ray workers started after it at that server.

    Yields ``SimpleNamespace(endpoint=..., env={...})``; the variables in ``env`` are set for the module
    and restored afterwards. Request it before ``local_ray`` (Ray workers inherit the environment of the
    process that starts Ray). Credentials are fixed dummy values and instance metadata is disabled, so
    nothing looks for real AWS credentials or leaves the machine.
    """
    import logging
    from types import SimpleNamespace

    from moto.server import ThreadedMotoServer  # a test dependency (extra 'test'): fail, never skip

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # a free port
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = s3_environment(endpoint)
    stop_shared_ray()  # Ray workers started from here on inherit the environment below
    requests_log = logging.getLogger("werkzeug")  # one line per request otherwise
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            yield SimpleNamespace(endpoint=endpoint, env=env)
        finally:
            stop_shared_ray()  # its workers point at this server, which stops now
            server.stop()
            requests_log.setLevel(level)
