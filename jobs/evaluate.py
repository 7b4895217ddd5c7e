"""The evaluation grid: `python jobs/evaluate.py [evaluate.families=[glow] ...] [score-corpus key=value ...]`.

Every model family x group size x OOD source x detector on public offline sources: AUROC, AUPR-In/Out,
FPR@95, the flags' empirical FDR and power, the p-values' calibration; Markdown + Parquet + HTML under
output.uri (default runs/evaluate). On your own data: evaluate.id_uri (in-distribution images set aside),
evaluate.ood={name: uri} (examples of what should be flagged; without them synthetic OOD sets are
derived from your images) and evaluate.checkpoints={family: checkpoint}. Keys of EvaluateConfig (seed,
output.uri, evaluate.*) are the grid's; every other key=value applies to each score-corpus run (e.g.
extract.num_workers=2, fit.size=5000).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradood.config import CONF_DIR, EvaluateConfig, ScoreCorpusConfig, load_config  # noqa: E402
from gradood.core.cli import help_text, run_job  # noqa: E402

OWN_KEYS = ("seed=", "output.", "evaluate.")


def main(argv: list[str]) -> int:
    own = [a for a in argv if a.startswith(OWN_KEYS)]
    cfg = load_config(EvaluateConfig, [], own)
    runs = [a for a in argv if a not in own]
    load_config(ScoreCorpusConfig, [CONF_DIR / "score_corpus.yaml"], runs)  # a bad key fails before any work
    from gradood.evaluation.run import run_evaluation

    run_evaluation(cfg, runs, "python jobs/evaluate.py " + shlex.join(argv))
    return 0


if __name__ == "__main__":
    usage = "usage: python jobs/evaluate.py [evaluate.KEY=value ...] [score-corpus key=value ...]"
    note = f"{__doc__}\nThe score-corpus keys: python jobs/score_corpus.py --help"
    sys.exit(run_job(main, sys.argv[1:], lambda: help_text(usage, load_config(EvaluateConfig), note)))
