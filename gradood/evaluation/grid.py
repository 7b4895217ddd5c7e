"""The evaluation grid: family x group size x OOD source x test -> metrics, flags, calibration, report.

Each (family, group size) is one ordinary score-corpus run (Ray extraction, reducer, calibrated suite,
Ray scoring) over one evaluation corpus of public sources; the run's scores carry every single test and
the default combined test. Test variants that are not the job's (other combinations, Bergamin et al.)
are fitted in-process on the same run's fit-set features, with the same fit / calibration split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gradood.config import CONF_DIR, EvaluateConfig, ScoreCorpusConfig, load_config
from gradood.core import storage
from gradood.data.demo import DEMO_ID_SOURCE, build_image_corpus, demo_source_of, source_info
from gradood.data.sources import load_all, open_source
from gradood.evaluation.nights import NightPool
from gradood.evaluation.own_data import OWN_ID_SOURCE, build_own_corpus, export_as_pngs
from gradood.pipeline.stages import SPLIT_STREAM
from gradood.pipeline.tables import SPLIT_COLUMN, feature_matrix, suite_feature_names
from gradood.seeding import row_uniforms
from gradood.stats import (
    Combination,
    CombinedTest,
    ConformalCalibrator,
    DetectorSuite,
    Moments,
    TestName,
    fdr_flags,
    ood_metrics,
    q_values_from_index,
    split_of,
)

DEFAULT_TEST = "combined"


@dataclass
class Scored:
    """One test's scores (higher = more OOD) and conformal p-value indices k (p = k / (n_cal + 1))."""

    score: np.ndarray
    p_index: np.ndarray
    n_calibration: int

    @property
    def p_value(self) -> np.ndarray:
        return self.p_index / (self.n_calibration + 1)


def build_corpus(cfg: EvaluateConfig, out: str) -> tuple[str, dict[str, bool], str]:
    """The evaluation corpus (a PNG folder per source), each OOD source's far/near flag and the name of
    the in-distribution source: public sources around held-out FashionMNIST, or the user's own images
    (``evaluate.id_uri``, :func:`~gradood.evaluation.own_data.build_own_corpus`)."""
    ev = cfg.evaluate
    if ev.id_uri is not None:
        corpus, far = build_own_corpus(cfg, out)
        return corpus, far, OWN_ID_SOURCE
    corpus = str(Path(out) / "corpus")
    manifest = build_image_corpus(
        corpus, [DEMO_ID_SOURCE, *ev.sources], ev.rows_per_source, seed=cfg.seed, id_rows=ev.id_rows
    )
    far = {name: bool(source_info(name)["far_ood"]) for name in manifest["ood_sources"]}
    for name, uri in ev.ood.items():
        export_as_pngs(uri, Path(corpus) / name, ev.rows_per_source)
        far[name] = True
    return corpus, far, DEMO_ID_SOURCE


def run_configs(cfg: EvaluateConfig, overrides: list[str], corpus: str, out: str) -> list[ScoreCorpusConfig]:
    """One score-corpus config per (family, group size); every config error surfaces before Ray starts."""
    checkpoints = cfg.evaluate.checkpoints
    unknown = sorted(set(checkpoints) - set(cfg.evaluate.families))
    if unknown:
        raise ValueError(f"evaluate.checkpoints names families {unknown} not in evaluate.families")
    configs = []
    for family in cfg.evaluate.families:
        for group_size in cfg.evaluate.group_sizes:
            configs.append(
                load_config(
                    ScoreCorpusConfig,
                    [CONF_DIR / "score_corpus.yaml"],
                    [
                        f"model={family}",
                        *overrides,
                        *([f"model.checkpoint={checkpoints[family]}"] if family in checkpoints else []),
                        f"seed={cfg.seed}",
                        f"extract.group_size={group_size}",
                        f"extract.batch_size={max(64, group_size)}",
                        f"corpus.uri={corpus}",
                        f"output.uri={Path(out) / 'runs' / f'{family}_b{group_size}'}",
                        f"flag.fdr={cfg.evaluate.fdr}",
                    ],
                )
            )
    return configs


def _suite_variant(
    fit_x: np.ndarray, part: np.ndarray, names: list[str], cfg: ScoreCorpusConfig, **params: Any
) -> DetectorSuite:
    return DetectorSuite(
        min_std=cfg.fit.min_std,
        calibration_fraction=cfg.fit.calibration_fraction,
        part_2_fraction=cfg.fit.part_2_fraction,
        **params,
    ).fit_parts(Moments.from_values(fit_x[part == 0]), fit_x[part == 1], fit_x[part == 2], names)


def run_test_scores(
    run_cfg: ScoreCorpusConfig, run_uri: str, bergamin: bool
) -> tuple[pd.DataFrame, dict[str, Scored], NightPool]:
    """The run's feature rows (id, source), every test's scores over them, and the rows as a pool
    to draw realistic nights from."""
    out = run_cfg.output.uri
    detector = storage.read_json(storage.join(out, "detector.json"))
    layers, floor = detector["layers"], run_cfg.fit.min_sqnorm
    scores = storage.read_parquet(storage.join(run_uri, "scores")).sort_by("row_index")
    features = storage.read_parquet(storage.join(run_uri, "features")).sort_by("row_index")
    if scores.column("id").to_pylist() != features.column("id").to_pylist():
        raise RuntimeError(f"{out}: scores and features list different rows")
    fit_table = storage.read_parquet(storage.join(out, "fit", "features"))
    fit_x, x = feature_matrix(fit_table, layers, floor), feature_matrix(features, layers, floor)
    part = fit_table.column(SPLIT_COLUMN).to_numpy()
    suite = DetectorSuite.from_dict(detector["suite"])
    found: dict[str, Scored] = {
        DEFAULT_TEST: Scored(
            scores.column("ood_score").to_numpy(),
            np.rint(scores.column("p_value").to_numpy() * (suite.calibration_size("combined") + 1)).astype(
                int
            ),
            suite.calibration_size("combined"),
        )
    }
    for name in map(TestName, suite.tests_):
        n = suite.calibration_size(name.value)
        p = scores.column(f"p_value:{name.value}").to_numpy()
        found[name.value] = Scored(
            scores.column(f"score:{name.value}").to_numpy(), np.rint(p * (n + 1)).astype(int), n
        )
    names = suite_feature_names(layers, fit_table)
    components = tuple(c.value for c in run_cfg.detect.components)
    variants = {
        "combined_fisher": {"components": components, "combination": "fisher"},
        "combined_tippett": {"components": components, "combination": "tippett"},
        "combined_all": {"components": tuple(suite.tests_), "combination": "fisher"},
    }
    for label, params in variants.items():
        variant = _suite_variant(fit_x, part, names, run_cfg, **params)
        result = variant.score_all(pd.DataFrame(x, columns=names, copy=False))["combined"]
        found[label] = Scored(result["score"], result["p_index"], variant.calibration_size("combined"))
    if bergamin:
        found["bergamin"] = bergamin_scores(run_cfg, detector, fit_table, features, suite)
    if "member_ids" in features.column_names:
        members = features.column("member_ids").to_pylist()
    else:
        members = [[i] for i in features.column("id").to_pylist()]
    sources = [{demo_source_of(m) for m in group} for group in members]
    rows = pd.DataFrame(
        {
            "id": features.column("id").to_pylist(),
            "source": [next(iter(s)) if len(s) == 1 else "mixed" for s in sources],
        }
    )
    pool = NightPool(
        rows["source"].to_numpy(),
        rows["id"].tolist(),
        suite.tails(x),
        suite,
        run_cfg.seed,
        run_cfg.detect.adaptive_rows,
    )
    return rows, found, pool


def bergamin_scores(
    run_cfg: ScoreCorpusConfig,
    detector: dict[str, Any],
    fit_table: pa.Table,
    features: pa.Table,
    suite: DetectorSuite,
) -> Scored:
    """Bergamin et al.: log score statistic and typicality, Fisher-combined, calibrated on the same parts."""
    from gradood.evaluation.bergamin import fit_fisher, load_rows, log_score_statistic
    from gradood.models.checkpoint import load_checkpoint
    from gradood.pipeline.fit import fit_source

    model, meta = load_checkpoint(storage.absolute(run_cfg.model.checkpoint))
    model.prepare_for_scoring()
    b, seed = run_cfg.extract.group_size, run_cfg.seed
    fit_rows = load_rows(fit_source(run_cfg.fit, meta), model)
    fit_ids = fit_table.column("id").to_pylist()
    part = split_of(
        row_uniforms(seed, fit_ids, SPLIT_STREAM),
        run_cfg.fit.calibration_fraction,
        run_cfg.fit.part_2_fraction,
    )
    fisher = fit_fisher(model, fit_rows, {i for i, k in zip(fit_ids, part, strict=True) if k == 0}, b, seed)
    fit_stat = log_score_statistic(model, fit_rows, fisher, b, seed)
    corpus_rows = load_all(open_source(run_cfg.corpus.uri), _converter(model))
    corpus_stat = log_score_statistic(model, corpus_rows, fisher, b, seed)
    typicality = suite.tests_["typicality"]

    def components(table: pa.Table, stat: dict[str, float]) -> np.ndarray:
        lp = table.column("log_prob").to_numpy()[:, None]
        return np.column_stack(
            [[stat[i] for i in table.column("id").to_pylist()], typicality.ood_score_of(lp)]
        )

    fit_components = components(fit_table, fit_stat)
    calibrators = [ConformalCalibrator(fit_components[part == 1, k]) for k in range(2)]
    combined = CombinedTest(calibrators, Combination.fisher).calibrate(fit_components[part == 2])
    stat = combined.statistic(components(features, corpus_stat))[0]
    return Scored(stat, combined.p_index(stat), combined.calibrator.n)


def _converter(model: Any) -> Any:
    from gradood.data.images import ImageConverter

    return ImageConverter.for_model(model)


def grid_rows(
    family: str,
    group_size: int,
    rows: pd.DataFrame,
    found: dict[str, Scored],
    far: dict[str, bool],
    fdr: float,
    alphas: list[float],
    id_source: str = DEMO_ID_SOURCE,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Metric rows (per source and test), score rows (for ROC curves) and calibration rows."""
    source = rows["source"].to_numpy()
    is_id = source == id_source
    metrics, score_rows, validity = [], [], []
    for name, s in found.items():
        for alpha in alphas:
            validity.append(
                {"family": family, "group_size": group_size, "test": name, "alpha": alpha,
                 "rate": float(np.mean(s.p_value[is_id] <= alpha)), "n_id": int(is_id.sum())}
            )  # fmt: skip
        keep = source != "mixed"
        score_rows.append(
            pd.DataFrame(
                {
                    "family": family,
                    "group_size": group_size,
                    "test": name,
                    "source": source[keep],
                    "is_ood": ~is_id[keep],
                    "ood_score": s.score[keep],
                    "p_value": s.p_value[keep],
                }
            )  # fmt: skip
        )
        for ood in far:
            is_ood = source == ood
            if not is_ood.any():
                continue
            m = ood_metrics(s.score[is_id], s.score[is_ood])
            mix = is_id | is_ood
            flagged = fdr_flags(q_values_from_index(s.p_index[mix], s.n_calibration), fdr)
            n_false = int(flagged[~is_ood[mix]].sum())
            metrics.append(
                {"family": family, "group_size": group_size, "source": ood, "far_ood": far[ood],
                 "test": name, "auroc": m["auroc"], "aupr_in": m["aupr_in"], "aupr_out": m["aupr_out"],
                 "fpr_at_95_tpr": m["fpr_at_95_tpr"], "n_id": m["n_id"], "n_ood": m["n_ood"],
                 "flag_fdr": n_false / flagged.sum() if flagged.any() else float("nan"),
                 "flag_power": float(flagged[is_ood[mix]].mean()), "n_flagged": int(flagged.sum())}
            )  # fmt: skip
    return metrics, score_rows, validity
