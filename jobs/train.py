"""Train the generative model with Ray Train: `python jobs/train.py [key=value ...]`.

Settings: conf/train.yaml (model from conf/model/glow.yaml; `model=NAME` picks another), overridable as
dotlist arguments, e.g. `train.epochs=10 train.num_workers=2`. Without RAY_ADDRESS it starts an
embedded local Ray; under `ray job submit` it attaches to the cluster. Rerunning with the same
train.name and train.storage_path resumes from the last finished epoch. Prints the exported checkpoint
directory, its fingerprint and the final bits/dim.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))
    # embedded Ray's worker processes inherit the environment, not this sys.path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from gradood.config import CONF_DIR, TrainJobConfig, load_config, to_yaml  # noqa: E402


def init_ray(cfg: TrainJobConfig) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    wanted = cfg.train.num_workers * cfg.train.cpus_per_worker  # else the workers would never be scheduled
    ray.init(num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 1, wanted), include_dashboard=False)


def main(argv: list[str]) -> int:
    cfg = load_config(TrainJobConfig, [CONF_DIR / "train.yaml"], argv)
    print(to_yaml(cfg), flush=True)
    init_ray(cfg)
    from gradood.train import train_model

    result = train_model(cfg)
    print(f"checkpoint: {result.checkpoint_dir}")
    print(f"fingerprint: {result.fingerprint}")
    print(f"epochs: {result.metrics['epoch']}, final train bits/dim: {result.metrics['train_bpd']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
