"""The job's adaptive combined test against the fixed Fisher combination it builds on, and against its
classifier alone, on an evaluation grid's B=1 runs, at several shares of OOD rows in the night.

For every family it reads the night's feature rows and the detector (whose calibration tails hold parts 1
and 2), and scores nights of three kinds:

- ``grid``: the grid's own night (1,000 held-out ID rows and 1,000 rows of each of the seven OOD sources);
- ``grid_without``: the grid's night without one source (one night per source left out), which shows how
  much a source's AUROC depends on the other sources sharing its night;
- ``one_source``: the 1,000 ID rows and the 1,000 rows of one source;
- ``k=<n>``: the 1,000 ID rows and ``n`` rows of one source (n = 10, 30, 100, 300), a night that is mostly
  in-distribution, as a screened data lake usually is.

Rules: ``fixed`` (Fisher over paper, fullcov, typicality: ``detect.combination=fisher``), ``classifier``
(the night's classifier alone) and ``adaptive`` (the job's default: Fisher over the two). Each night's
adaptive test is trained on all of its rows, as the job does below ``detect.adaptive_rows``. It reports
AUROC per source, the (family, source) pairs below the project's per-source target
max(paper, typicality) - 0.01, and, on the ID rows, the share of adaptive p-values <= alpha.

    .venv/bin/python benchmarks/adaptive_combination.py --out benchmarks/results/adaptive_combination.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from combination_search import TOLERANCE, aurocs, load_run

from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, demo_source_of
from gradood.pipeline.tables import feature_matrix
from gradood.stats import DetectorSuite
from gradood.stats.adaptive import adaptive_p_values, component_tail

SHARES = (10, 30, 100, 300)
ALPHAS = (0.01, 0.05, 0.1)
RULES = ("fixed", "classifier", "adaptive")


def score_night(
    suite: DetectorSuite, tails: np.ndarray, targets: np.ndarray, source: np.ndarray, seed: int
) -> dict[str, dict]:
    """AUROC per source of every rule, the per-source targets (from ``targets``: the paper and typicality
    scores, one column each), and the ID rows' adaptive p-value rates."""
    columns = [suite.tail_columns(c) for c in suite.components]
    cal = suite.calibration_tails_
    night = suite.adapt_to_night(tails, 1.0, seed)
    classifier, _, _ = adaptive_p_values(cal.part_1, cal.part_2, tails, random_state=seed)
    statistic = night.statistic(tails)
    p_value = night.calibrator_.p_value(statistic)
    paper, typicality = aurocs(targets[:, 0], source), aurocs(targets[:, 1], source)
    is_id = source == DEMO_ID_SOURCE
    return {
        "fixed": aurocs(2.0 * sum(component_tail(tails, np.asarray(c)) for c in columns), source),
        "classifier": aurocs(classifier, source),
        "adaptive": aurocs(statistic, source),
        "target": {s: max(paper[s], typicality[s]) - TOLERANCE for s in paper},
        "id_rate": {str(a): float(np.mean(p_value[is_id] <= a)) for a in ALPHAS},
    }


def family_nights(out: Path, seed: int, shares: list[int]) -> dict[str, list[dict]]:
    suite, detector, cfg, run_uri = load_run(out)
    features = storage.read_parquet(storage.join(run_uri, "features")).sort_by("row_index")
    x = feature_matrix(features, detector["layers"], cfg.fit.min_sqnorm)
    tails = suite.tails(x)
    targets = np.column_stack([suite.test_scores(t, x) for t in ("paper", "typicality")])
    source = np.array([demo_source_of(i) for i in features.column("id").to_pylist()])
    rng = np.random.default_rng(seed)
    id_rows = np.flatnonzero(source == DEMO_ID_SOURCE)
    nights = {"grid": [score_night(suite, tails, targets, source, seed)], "grid_without": []}
    for s in sorted(set(source.tolist()) - {DEMO_ID_SOURCE}):
        rows = np.flatnonzero(source != s)
        night = score_night(suite, tails[rows], targets[rows], source[rows], seed)
        nights["grid_without"].append({**night, "without": s})
    for name in ["one_source", *(f"k={k}" for k in shares)]:
        nights[name] = []
        for s in sorted(set(source.tolist()) - {DEMO_ID_SOURCE}):
            ood = np.flatnonzero(source == s)
            if name != "one_source":
                ood = np.sort(rng.choice(ood, min(len(ood), int(name[2:])), replace=False))
            rows = np.r_[id_rows, ood]
            nights[name].append(score_night(suite, tails[rows], targets[rows], source[rows], seed))
    return nights


def summarise(nights: list[dict]) -> dict[str, object]:
    out: dict[str, object] = {}
    for rule in RULES:
        pairs = [(s, a, n["target"][s]) for n in nights for s, a in n[rule].items()]
        out[rule] = {
            "mean_auroc": float(np.mean([a for _, a, _ in pairs])),
            "misses": [s for s, a, t in pairs if a < t],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--grid", default="runs/evaluate", help="output.uri of jobs/evaluate.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shares", type=int, nargs="+", default=list(SHARES), help="OOD rows per night")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = sorted(Path(args.grid, "runs").glob("*_b1"))
    if not runs:
        raise SystemExit(f"no B=1 runs under {args.grid}/runs: run jobs/evaluate.py first")
    families = {run.name.removesuffix("_b1"): family_nights(run, args.seed, args.shares) for run in runs}
    kinds = list(next(iter(families.values())))
    summary = {
        kind: {family: summarise(nights[kind]) for family, nights in families.items()} for kind in kinds
    }
    rates = [n["id_rate"] for nights in families.values() for n in nights["grid"] + nights["one_source"]]
    id_rate = {a: [min(r[a] for r in rates), max(r[a] for r in rates)] for a in map(str, ALPHAS)}
    Path(args.out).write_text(
        json.dumps({"summary": summary, "id_rate_range": id_rate, "nights": families}, indent=1) + "\n"
    )
    print("night kind      rule       mean AUROC  pairs below target")
    for kind in kinds:
        for rule in RULES:
            per = [summary[kind][f][rule] for f in families]
            mean = np.mean([p["mean_auroc"] for p in per])
            misses = sum(len(p["misses"]) for p in per)
            print(f"{kind:<15} {rule:<10} {mean:10.4f}  {misses:>3}")
    print("grid night without      pairs below target (adaptive default): family source")
    for k, left_out in enumerate(n["without"] for n in next(iter(families.values()))["grid_without"]):
        missed = [
            f"{family} {s}"
            for family, nights in families.items()
            for s in summarise([nights["grid_without"][k]])["adaptive"]["misses"]
        ]
        print(f"  {left_out:<22} {len(missed):>3}  {', '.join(missed)}")
    print(f"adaptive p <= alpha on the ID rows (grid and one-source nights): {id_rate}")


if __name__ == "__main__":
    main()
