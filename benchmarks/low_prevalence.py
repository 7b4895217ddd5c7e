"""Which night statistic has power on a realistic night, where one OOD source is 0.5-5 % of the rows.

On one evaluation-grid B=1 run (``--run``, e.g. ``runs/evaluate/runs/vae_b1``) it draws realistic nights
as the grid does (:func:`gradood.evaluation.nights.draw_night`: 2,000 rows, OOD share pi, calibration part
2 re-drawn from the held-out pool for every night) and scores each with candidate statistics, all
calibrated on that night's part 2:

- ``default``: the job's adaptive test (Fisher over the fixed combination and the night's classifier);
- ``fixed``: Fisher over the components (``detect.combination=fisher``);
- ``classifier``: the night's monotone boosted classifier alone;
- ``logistic``: a logistic regression on the same tails (part 1 against the unordered union of part 2
  and the night), alone: valid for the same reason as the classifier;
- ``logistic_or_complexity``: Tippett over the logistic classifier's tail and ``complexity``'s;
- every single test's tail alone (``paper``, ..., ``complexity``; ``typicality:low`` is "too likely");
- ``classifier_leaf10``: the boosted classifier with leaves of 10 rows (the default's: 40), which can
  isolate a 1 % source's 20 rows;
- ``classifier_crossfit``: the same classifier cross-fitted over 5 folds of the union (a row's fold from
  a hash of its tails, so part 2 and the night are treated alike): every union row is scored by a model
  that did not train on it, so in-sample noise does not inflate part 2's top scores;
- ``selected``: the single tail whose union excess beyond part 1's top 1, 2 or 5 rows is least probable
  for exchangeable rows (:func:`union_excess_log_p`), when that probability is below 0.05 (no correction
  over the tails: a rule, not a test), else the default; the statistic chosen on each night is written
  as ``selected_tails``.

Every one is a function of part 1 and of the unordered union of part 2 and the night only, so its
conformal p-values against part 2 stay valid.

``--extra-id`` adds the feature rows of more held-out in-distribution images (another run's features
folder, with the same model and seed) to the pool, so that part 2 can be larger
(``--calibration-rows``); ``--part-1-extra N`` moves N of them (a seeded draw) into part 1 instead, so
that the classifiers' reference rows hold both FashionMNIST splits, as the pool does. It prints and
writes, per (calibration rows, source, share, statistic), mean BH power and false-discovery proportion
at q = 0.05 and the TPR at an FPR of 0.1 %.

    .venv/bin/python jobs/score_corpus.py 'corpus.uri=torchvision://FashionMNIST?split=test' \\
        corpus.size=5000 output.uri=runs/extra_id run.id=extra
    .venv/bin/python benchmarks/low_prevalence.py --run runs/evaluate/runs/vae_b1 \\
        --extra-id runs/extra_id/runs/extra/features --calibration-rows 5000 10000

The candidates table of ``docs/results.md`` (with ``OMP_NUM_THREADS=1``: two runs side by side on 2
cores take 6 minutes; without it the boosted models' threads oversubscribe the cores and each source
and share took 16 minutes instead of under one)::

    .venv/bin/python benchmarks/low_prevalence.py --run runs/evaluate/runs/vae_b1 --shares 0.01 0.05 \\
        --out benchmarks/results/low_prevalence_selection_grid_pool.json
    .venv/bin/python benchmarks/low_prevalence.py --run runs/evaluate/runs/vae_b1 --shares 0.01 0.05 \\
        --extra-id runs/extra_id/runs/extra/features --part-1-extra 1150 --calibration-rows 8800 \\
        --out benchmarks/results/low_prevalence_selection_mixed.json
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from combination_search import load_run
from scipy.stats import nhypergeom
from sklearn.linear_model import LogisticRegression

from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, demo_source_of
from gradood.evaluation.nights import draw_night, night_rng, tpr_at_fpr
from gradood.pipeline.tables import feature_matrix
from gradood.stats.adaptive import AdaptiveCombination, AdaptiveNight, CalibrationTails, component_tail
from gradood.stats.conformal import ConformalCalibrator, fdr_flags, q_values_from_index

SOURCES = ("digits", "fashion_mnist_inverted", "uniform_noise", "glyphs", "photo_patches")
FDR = 0.05
#: the selected statistic takes a single tail when its union excess has log-probability below this
SELECTION_LOG_P = float(np.log(0.05))
#: part 1's top rows (1st, 2nd, 5th largest) above which the union's rows are counted: only the extreme
#: excess matters at the resolution of a 1 % night
EXCESS_DEPTHS = (1, 2, 5)


def reference_against(reference: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's training set: the reference rows (part 1, y=0) above ``rows`` (y=1)."""
    return np.vstack([reference, rows]), np.r_[np.zeros(len(reference), int), np.ones(len(rows), int)]


def logistic(reference: np.ndarray, union: np.ndarray):
    """Logistic regression of part 1 (0) against the union (1), classes weighed equally."""
    x, y = reference_against(reference, union)
    model = LogisticRegression(max_iter=2000).fit(x, y, sample_weight=(0.5 * len(y) / np.bincount(y))[y])
    return model.decision_function


def union_excess_log_p(reference: np.ndarray, union: np.ndarray) -> float:
    """log P(at least as many union rows above the reference's j-th largest as observed), the smallest
    over ``EXCESS_DEPTHS`` times their number (Bonferroni): for exchangeable rows the count is
    negative-hypergeometric."""
    top = np.sort(reference)[::-1]
    log_p = [
        nhypergeom.logsf(int((union > top[j - 1]).sum()) - 1, len(top) + len(union), len(union), j)
        for j in EXCESS_DEPTHS
    ]
    return float(min(log_p) + np.log(len(EXCESS_DEPTHS)))


def crossfit(part_1: np.ndarray, union: np.ndarray, seed: int, folds: int = 5, leaf: int = 10):
    """The boosted classifier cross-fitted over the union: a row is scored by the model that did not
    train on its fold (a hash of its tails)."""

    def fold_of(tails: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(tails, np.float64)
        return np.array([zlib.crc32(row.tobytes()) % folds for row in rows], int)

    union_fold = fold_of(union)
    models = []
    for k in range(folds):
        model = AdaptiveCombination(min_samples_leaf=leaf, random_state=seed)
        models.append(model.fit(*reference_against(part_1, union[union_fold != k])))

    def statistic(tails: np.ndarray) -> np.ndarray:
        fold, out = fold_of(tails), np.empty(len(tails))
        for k, model in enumerate(models):
            out[fold == k] = model.decision_function(tails[fold == k])
        return out

    return statistic


def statistics(suite, part_1: np.ndarray, cal: np.ndarray, night: np.ndarray, seed: int) -> tuple[dict, str]:
    """Every candidate statistic, as a function of tails, learned from part 1 and the unordered union,
    and the name of the one ``selected`` takes on this night."""
    columns = [np.asarray(suite.tail_columns(c)) for c in suite.components]
    ids = [str(i) for i in range(len(cal))]
    calibration = CalibrationTails(suite.tail_order, part_1, cal, ids)
    default = AdaptiveNight(calibration, columns).fit(night, 1.0, seed)
    union = np.vstack([cal, night])
    x, y = reference_against(part_1, union)
    boosted = AdaptiveCombination(random_state=seed).fit(x, y)
    small_leaves = AdaptiveCombination(min_samples_leaf=10, random_state=seed).fit(x, y)
    linear = logistic(part_1, union)
    # Tippett over the logistic classifier and complexity, each tail from rows it did not train on: the
    # classifier's from the union's ranks (part 1 trained it as class 0), complexity's from part 1
    linear_tail = ConformalCalibrator(linear(union))
    complexity = suite.tail_order.index("complexity")
    complexity_tail = ConformalCalibrator(part_1[:, complexity])
    out = {
        "default": default.statistic,
        "fixed": lambda t: 2.0 * sum(component_tail(t, c) for c in columns),
        "classifier": boosted.decision_function,
        "logistic": linear,
        "classifier_leaf10": small_leaves.decision_function,
        "classifier_crossfit": crossfit(part_1, union, seed),
        "logistic_or_complexity": lambda t: (
            -np.minimum(linear_tail.smooth_log_p(linear(t)), complexity_tail.smooth_log_p(t[:, complexity]))
        ),
    }
    out.update({name: (lambda t, k=k: t[:, k]) for k, name in enumerate(suite.tail_order)})
    excess = np.array([union_excess_log_p(part_1[:, k], union[:, k]) for k in range(len(suite.tail_order))])
    best = int(np.argmin(excess))
    chosen = suite.tail_order[best] if excess[best] <= SELECTION_LOG_P else "default"
    return out, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a grid run folder (B=1)")
    parser.add_argument("--extra-id", help="features folder of more held-out in-distribution rows")
    parser.add_argument("--part-1-extra", type=int, default=0, help="extra rows moved into part 1")
    parser.add_argument("--calibration-rows", type=int, nargs="+", default=[5000])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.005, 0.01, 0.05])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--night-rows", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("low_prevalence.json"))
    args = parser.parse_args()

    suite, detector, cfg, run_uri = load_run(args.run)
    features = storage.read_parquet(storage.join(run_uri, "features")).sort_by("row_index")
    tails = suite.tails(feature_matrix(features, detector["layers"], cfg.fit.min_sqnorm))
    source = np.array([demo_source_of(i) for i in features.column("id").to_pylist()])
    pool = [suite.calibration_tails_.part_2, tails[source == DEMO_ID_SOURCE]]
    part_1 = suite.calibration_tails_.part_1
    if args.extra_id:
        extra = storage.read_parquet(args.extra_id)
        extra = suite.tails(feature_matrix(extra, detector["layers"], cfg.fit.min_sqnorm))
        extra = extra[np.random.default_rng(cfg.seed).permutation(len(extra))]
        part_1 = np.vstack([part_1, extra[: args.part_1_extra]])
        pool.append(extra[args.part_1_extra :])
    held = np.vstack(pool)
    print(f"held-out pool: {len(held)} in-distribution rows; part 1: {len(part_1)}", flush=True)

    results = []
    for n_cal in args.calibration_rows:
        for name in SOURCES:
            ood_rows = np.flatnonzero(source == name)
            for share in args.shares:
                per_draw: dict[str, list[tuple[float, float, float]]] = {}
                chosen = Counter()
                for draw in range(args.draws):
                    rng = night_rng(cfg.seed, name, share, draw)
                    night_id, cal, ood = draw_night(rng, len(held), n_cal, ood_rows, args.night_rows, share)
                    night, cal_tails = np.vstack([held[night_id], tails[ood]]), held[cal]
                    is_ood = np.r_[np.zeros(len(night_id), bool), np.ones(len(ood), bool)]
                    candidates, choice = statistics(suite, part_1, cal_tails, night, cfg.seed)
                    chosen[choice] += 1
                    this_night = {}
                    for rule, stat in candidates.items():
                        score = stat(night)
                        p_index = ConformalCalibrator(stat(cal_tails)).p_index(score)
                        flags = fdr_flags(q_values_from_index(p_index, n_cal), FDR)
                        fdp = flags[~is_ood].sum() / flags.sum() if flags.any() else 0.0
                        tpr = tpr_at_fpr(score[~is_ood], score[is_ood], 0.001)
                        this_night[rule] = (flags[is_ood].mean(), fdp, tpr)
                    this_night["selected"] = this_night[choice]
                    for rule, values in this_night.items():
                        per_draw.setdefault(rule, []).append(values)
                for rule, values in per_draw.items():
                    power, fdp, tpr = np.mean(values, axis=0)
                    results.append(
                        {"calibration_rows": n_cal, "source": name, "share": share, "statistic": rule,
                         "power": power, "fdp": fdp, "tpr_at_fpr_0.001": tpr, "draws": args.draws,
                         **({"selected_tails": dict(chosen)} if rule == "selected" else {})}
                    )  # fmt: skip
                    print(f"{n_cal:6d} {name:24s} {share:6.3f} {rule:16s} power {power:.2f} fdp {fdp:.3f} "
                          f"tpr@0.1% {tpr:.2f}", flush=True)  # fmt: skip
    args.out.write_text(
        json.dumps({"run": str(args.run), "part_1_rows": len(part_1), "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
