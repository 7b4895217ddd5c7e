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
- every single test's tail alone (``paper``, ..., ``complexity``; ``typicality:low`` is "too likely").

``--extra-id`` adds the feature rows of more held-out in-distribution images (another run's features
folder, with the same model and seed) to the pool, so that part 2 can be larger
(``--calibration-rows``). It prints and writes, per (calibration rows, source, share, statistic), mean
BH power and false-discovery proportion at q = 0.05 and the TPR at an FPR of 0.1 %.

    .venv/bin/python jobs/score_corpus.py 'corpus.uri=torchvision://FashionMNIST?split=test' \\
        corpus.size=5000 output.uri=runs/extra_id run.id=extra
    .venv/bin/python benchmarks/low_prevalence.py --run runs/evaluate/runs/vae_b1 \\
        --extra-id runs/extra_id/runs/extra/features --calibration-rows 5000 10000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from combination_search import load_run
from sklearn.linear_model import LogisticRegression

from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, demo_source_of
from gradood.evaluation.nights import draw_night, night_rng, tpr_at_fpr
from gradood.pipeline.tables import feature_matrix
from gradood.stats.adaptive import AdaptiveCombination, AdaptiveNight, CalibrationTails, component_tail
from gradood.stats.conformal import ConformalCalibrator, fdr_flags, q_values_from_index

SOURCES = ("digits", "fashion_mnist_inverted", "uniform_noise", "glyphs", "photo_patches")
FDR = 0.05


def logistic(reference: np.ndarray, union: np.ndarray):
    """Logistic regression of part 1 (0) against the union (1), classes weighed equally."""
    x, y = np.vstack([reference, union]), np.r_[np.zeros(len(reference), int), np.ones(len(union), int)]
    model = LogisticRegression(max_iter=2000).fit(x, y, sample_weight=(0.5 * len(y) / np.bincount(y))[y])
    return model.decision_function


def statistics(suite, part_1: np.ndarray, cal: np.ndarray, night: np.ndarray, seed: int) -> dict:
    """Every candidate statistic, as a function of tails, learned from part 1 and the unordered union."""
    columns = [np.asarray(suite.tail_columns(c)) for c in suite.components]
    ids = [str(i) for i in range(len(cal))]
    calibration = CalibrationTails(suite.tail_order, part_1, cal, ids)
    default = AdaptiveNight(calibration, columns).fit(night, 1.0, seed)
    union = np.vstack([cal, night])
    y = np.r_[np.zeros(len(part_1), int), np.ones(len(union), int)]
    boosted = AdaptiveCombination(random_state=seed).fit(np.vstack([part_1, union]), y)
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
        "logistic_or_complexity": lambda t: (
            -np.minimum(linear_tail.smooth_log_p(linear(t)), complexity_tail.smooth_log_p(t[:, complexity]))
        ),
    }
    out.update({name: (lambda t, k=k: t[:, k]) for k, name in enumerate(suite.tail_order)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a grid run folder (B=1)")
    parser.add_argument("--extra-id", help="features folder of more held-out in-distribution rows")
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
    if args.extra_id:
        extra = storage.read_parquet(args.extra_id)
        pool.append(suite.tails(feature_matrix(extra, detector["layers"], cfg.fit.min_sqnorm)))
    held = np.vstack(pool)
    part_1 = suite.calibration_tails_.part_1
    print(f"held-out pool: {len(held)} in-distribution rows; part 1: {len(part_1)}")

    results = []
    for n_cal in args.calibration_rows:
        for name in SOURCES:
            ood_rows = np.flatnonzero(source == name)
            for share in args.shares:
                per_draw: dict[str, list[tuple[float, float, float]]] = {}
                for draw in range(args.draws):
                    rng = night_rng(cfg.seed, name, share, draw)
                    night_id, cal, ood = draw_night(rng, len(held), n_cal, ood_rows, args.night_rows, share)
                    night = np.vstack([held[night_id], tails[ood]])
                    is_ood = np.r_[np.zeros(len(night_id), bool), np.ones(len(ood), bool)]
                    for rule, stat in statistics(suite, part_1, held[cal], night, cfg.seed).items():
                        score = stat(night)
                        p_index = ConformalCalibrator(stat(held[cal])).p_index(score)
                        flags = fdr_flags(q_values_from_index(p_index, n_cal), FDR)
                        fdp = flags[~is_ood].sum() / flags.sum() if flags.any() else 0.0
                        tpr = tpr_at_fpr(score[~is_ood], score[is_ood], 0.001)
                        per_draw.setdefault(rule, []).append((flags[is_ood].mean(), fdp, tpr))
                for rule, values in per_draw.items():
                    power, fdp, tpr = np.mean(values, axis=0)
                    results.append(
                        {"calibration_rows": n_cal, "source": name, "share": share, "statistic": rule,
                         "power": power, "fdp": fdp, "tpr_at_fpr_0.001": tpr, "draws": args.draws}
                    )  # fmt: skip
                    print(f"{n_cal:6d} {name:24s} {share:6.3f} {rule:16s} power {power:.2f} fdp {fdp:.3f} "
                          f"tpr@0.1% {tpr:.2f}", flush=True)  # fmt: skip
    args.out.write_text(json.dumps({"run": str(args.run), "results": results}, indent=1))


if __name__ == "__main__":
    main()
