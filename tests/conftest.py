import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GRADOOD_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def local_ray():
    """An embedded Ray for one test module (3 CPUs: two extraction workers and the reducer/scorer)."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()
