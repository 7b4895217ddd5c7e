"""Which fixed combination of the suite's tests comes closest to the best single test on every source?

Reads the B=1 runs of an evaluation grid (``jobs/evaluate.py``, default ``runs/evaluate``) and, for every
subset of 2-4 of the six tests and every rule (Fisher -2 sum log p, Tippett -min log p, the harmonic mean
of p), computes the combined statistic from the suite's smooth tails over the same feature rows and its
AUROC per OOD source. A source "fails" when the AUROC is below max(paper, typicality) - 0.01, the
project's per-source quality target. The combined statistics here are the ones the job would compute
(calibrating them on part 2 changes p-values, not their order, so not the AUROC).

    .venv/bin/python benchmarks/combination_search.py --out benchmarks/results/combination_search.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from gradood.config import ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, demo_source_of
from gradood.pipeline.publish import published_runs, run_dir
from gradood.pipeline.tables import feature_matrix
from gradood.stats import DetectorSuite, TestName, ood_metrics

RULES = {
    "fisher": lambda log_p: -log_p.sum(axis=0),
    "tippett": lambda log_p: -log_p.min(axis=0),
    "harmonic_mean": lambda log_p: logsumexp(-log_p, axis=0),
}
TOLERANCE = 0.01


def load_run(out: Path) -> tuple[DetectorSuite, dict, ScoreCorpusConfig, str]:
    """The fitted suite, detector record, config and night folder of one grid run's latest night."""
    published = published_runs(str(out))
    if not published:
        raise SystemExit(f"{out}: no published run")
    run_uri = run_dir(str(out), published[-1])
    cfg = load_config(ScoreCorpusConfig, [storage.join(run_uri, "run.yaml")])
    detector = storage.read_json(storage.absolute(cfg.output.detector_uri or str(out / "detector.json")))
    return DetectorSuite.from_dict(detector["suite"]), detector, cfg, run_uri


def suite_tails(suite: DetectorSuite, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every test's smooth log-tail (log p~, the combinations' inputs) of the feature rows ``x``."""
    return {t: suite.calibrator(t).smooth_log_p(suite.test_statistic(t, x)) for t in suite.tests_}


def family_tails(out: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every test's smooth log-tail per feature row of one grid run (its latest published night), and
    each row's source."""
    suite, detector, cfg, run_uri = load_run(out)
    features = storage.read_parquet(storage.join(run_uri, "features")).sort_by("row_index")
    x = feature_matrix(features, detector["layers"], cfg.fit.min_sqnorm)
    return suite_tails(suite, x), np.array([demo_source_of(i) for i in features.column("id").to_pylist()])


def aurocs(statistic: np.ndarray, source: np.ndarray) -> dict[str, float]:
    is_id = source == DEMO_ID_SOURCE
    return {
        str(s): ood_metrics(statistic[is_id], statistic[source == s])["auroc"]
        for s in np.unique(source)
        if s != DEMO_ID_SOURCE
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--grid", default="runs/evaluate", help="output.uri of jobs/evaluate.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = sorted(Path(args.grid, "runs").glob("*_b1"))
    if not runs:
        raise SystemExit(f"no B=1 runs under {args.grid}/runs: run jobs/evaluate.py first")
    families = {run.name.removesuffix("_b1"): family_tails(run) for run in runs}
    targets = {
        family: {
            s: max(a, b) - TOLERANCE
            for (s, a), b in zip(
                aurocs(-tails["paper"], source).items(),
                aurocs(-tails["typicality"], source).values(),
                strict=True,
            )
        }
        for family, (tails, source) in families.items()
    }
    results = []
    tests = [t.value for t in TestName]
    for k in (2, 3, 4):
        for subset in itertools.combinations(tests, k):
            for rule, combine in RULES.items():
                row = {"tests": list(subset), "rule": rule, "fails": {}, "deficit": 0.0, "auroc": {}}
                for family, (tails, source) in families.items():
                    a = aurocs(combine(np.array([tails[t] for t in subset])), source)
                    row["auroc"][family] = a
                    row["fails"][family] = [s for s in a if a[s] < targets[family][s]]
                    row["deficit"] += sum(max(0.0, targets[family][s] - a[s]) for s in a)
                row["n_fails"] = sum(len(v) for v in row["fails"].values())
                results.append(row)
    results.sort(key=lambda r: (r["n_fails"], r["deficit"]))
    Path(args.out).write_text(json.dumps({"targets": targets, "combinations": results}, indent=1) + "\n")
    print(f"{len(results)} combinations; fewest failing (family, source) pairs first:")
    for row in results[:10]:
        print(
            f"  {row['rule']:>13} {'+'.join(row['tests']):<45} fails {row['n_fails']:>2}  "
            f"deficit {row['deficit']:.3f}  "
            + ", ".join(f"{f}: {s}" for f, v in row["fails"].items() for s in v)
        )


if __name__ == "__main__":
    main()
