"""Train the generative model with Ray Train: `python jobs/train.py [--config FILE] [key=value ...]`.

Settings: conf/train.yaml (model from conf/model/vae.yaml; `model=NAME` picks another) or the YAML given
with --config (conf/train_quality.yaml: the paper-size run), overridable as dotlist arguments, e.g.
`train.epochs=10 train.num_workers=2`. Without RAY_ADDRESS it starts an embedded local Ray; under
`ray job submit` it attaches to the cluster. The training rows are read through Ray Data, block by
block, and split between the workers (no worker loads the whole set). On a multi-node cluster
train.runs_uri (the Ray Train run) and model.checkpoint (the export) should be shared storage,
e.g. s3://bucket/ray_train. Rerunning with the same train.name and train.runs_uri resumes from the
last finished epoch. Prints the exported checkpoint location, its fingerprint and the final training loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))
    # embedded Ray's worker processes inherit the environment, not this sys.path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from gradood.config import CONF_DIR, TrainJobConfig, load_config, to_yaml  # noqa: E402
from gradood.core.cli import help_text, run_job  # noqa: E402

USAGE = "usage: python jobs/train.py [--config FILE] [key=value ...]"


def _split(argv: list[str]) -> tuple[str, list[str]]:
    """The --config YAML (default conf/train.yaml) and the key=value settings."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=str(CONF_DIR / "train.yaml"))
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def _help(argv: list[str]) -> str:
    config, _ = _split([a for a in argv if a not in ("-h", "--help")])
    return help_text(USAGE, load_config(TrainJobConfig, [config]), f"{__doc__}\nDefaults from {config}.")


def main(argv: list[str]) -> int:
    config, overrides = _split(argv)
    cfg = load_config(TrainJobConfig, [config], overrides)
    print(to_yaml(cfg), flush=True)
    from gradood.core.ray_runtime import init_ray
    from gradood.train import train_model

    # embedded Ray gets at least the CPUs the workers ask for, plus one for the Ray Data tasks that read
    # the training rows, else they would never be scheduled
    from gradood.train.data import READ_CPUS

    init_ray(cfg.ray.num_cpus, min_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + READ_CPUS)

    result = train_model(cfg)
    from gradood.core import storage
    from gradood.models.checkpoint import META_FILE
    from gradood.train.trainer import card_lines

    training = storage.read_json(storage.join(result.checkpoint_dir, META_FILE))["training"]
    for h in result.metrics["run"]["history"]:
        heldout = h.get("heldout_loss")
        print(
            f"epoch {h['epoch']}: train {h['train_loss']:.4f}"
            + ("" if heldout is None else f", held-out {heldout:.4f}")
            + f" {training['loss']}, {h['rows_per_s']:.0f} rows/s"
        )
    print("\n".join(card_lines(training.get("card"), result.checkpoint_dir, result.fingerprint)))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:], lambda: _help(sys.argv[1:])))
