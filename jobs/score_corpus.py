"""Rank an image corpus by OOD score: `python jobs/score_corpus.py [key=value ...]`.

With no arguments it scores the demo corpus on an embedded local Ray; under `ray job submit` (RAY_ADDRESS
set) it attaches to the cluster. Settings: conf/score_corpus.yaml, overridable as dotlist arguments,
e.g. `corpus.uri=s3://lake/2026-11-23/ output.uri=s3://out/2026-11-23/ extract.group_size=5`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout (or a ray job working dir) without installing
    sys.path.insert(0, str(ROOT))

from gradood.config import CONF_DIR, ScoreCorpusConfig, load_config  # noqa: E402
from gradood.core.cli import help_text, run_job  # noqa: E402

YAML = [CONF_DIR / "score_corpus.yaml"]


def main(argv: list[str]) -> int:
    cfg = load_config(ScoreCorpusConfig, YAML, argv)
    from gradood.pipeline.ray_job import run_score_corpus

    run_score_corpus(cfg)
    return 0


if __name__ == "__main__":
    usage = "usage: python jobs/score_corpus.py [key=value ...]"
    defaults = lambda: load_config(ScoreCorpusConfig, YAML)  # noqa: E731
    sys.exit(run_job(main, sys.argv[1:], lambda: help_text(usage, defaults(), __doc__)))
