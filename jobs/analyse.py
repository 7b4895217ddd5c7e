"""The paper's analyses of per-layer gradient norms for one model: `python jobs/analyse.py [key=value ...]`.

Layer histograms per source at B in analyse.group_sizes (paper Fig. 4), Fisher-information slices (Fig. 5),
correlation decay between layers (Fig. 6), normality of log f_j and the scaled chi-square fit, and the
representation invariance of Prop. 1, for the project's default model (or model=NAME,
model.checkpoint=DIR). Features are extracted on Ray through the pipeline; report.html, report.md,
analysis.json and the PNGs go to output.uri (default runs/analyse). Keys: gradood.analysis.config.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradood.analysis.config import load_analyse_config  # noqa: E402
from gradood.core.cli import help_text, run_job  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = load_analyse_config(argv)
    from gradood.analysis.run import run_analysis

    run_analysis(cfg, "python jobs/analyse.py " + shlex.join(argv))
    return 0


if __name__ == "__main__":
    usage = "usage: python jobs/analyse.py [model=NAME] [key=value ...]"
    sys.exit(run_job(main, sys.argv[1:], lambda: help_text(usage, load_analyse_config(), __doc__)))
