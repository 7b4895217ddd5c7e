"""Ray start-up shared by every job: attach to a cluster or start an embedded one."""

from __future__ import annotations

import math
import os


def init_ray(num_cpus: int | None, min_cpus: float) -> None:
    """Attach to the cluster named by RAY_ADDRESS (as under `ray job submit`), else start an embedded
    Ray with ``num_cpus`` CPUs (default: this machine's, and at least ``min_cpus``)."""
    import ray  # here, so that importing the foundation does not start loading Ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # address="local": a Ray of its own even where a `ray start` cluster runs on this machine, which a
        # bare ray.init() would attach to (and then refuse num_cpus)
        cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(min_cpus))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
