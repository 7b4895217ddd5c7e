"""Every OOD test over one feature matrix, calibrated, and a combined test that is itself a valid p-value.

Columns of the feature matrix: log f_j for each layer, then log p(x) (named ``log_prob``), then, where
the features carry it, the input's compressed size in bits (``complexity_bits``, which the
``complexity`` test needs). The held-out in-distribution rows are split three ways:

- fit rows: every test's parameters (from merged :class:`Moments`, as the reducer streams them);
- calibration part 1: each test's conformal p-value, and the smooth tails the combination uses;
- calibration part 2: the combined statistic's own conformal p-value.

The combined statistic T(x) (Fisher: -2 sum_k log p_k; Tippett: -min_k log p_k over the component
tests' smooth tails) is a fixed function once the fit rows and part 1 are used, so its conformal p-value
against part 2 is valid whatever the dependence between the component tests. That dependence is why
Fisher's chi-square reference distribution cannot be used directly here.

The adaptive combination is fitted per night (:meth:`DetectorSuite.adapt_to_night`) from every test's tails of
both calibration parts, which the suite keeps (``calibration_tails_``), and of the night's rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

from gradood.core.choices import TestName
from gradood.stats.adaptive import AdaptiveNight, CalibrationTails
from gradood.stats.conformal import Combination, CombinedTest, ConformalCalibrator, EqualTailedCalibrator
from gradood.stats.layout import COMPLEXITY_COLUMN, check_split, column_groups, split_of
from gradood.stats.moments import Moments
from gradood.stats.ood_tests import (
    FORMAT_VERSION,
    ComplexityCorrected,
    DiagonalGaussian,
    FisherLayers,
    GradNorm,
    NegLogLikelihood,
    OODTest,
    ShrinkageGaussian,
    Typicality,
    check_format,
    ood_test_from_dict,
)

#: which columns each test reads (:func:`gradood.stats.layout.column_groups`)
_COLUMNS = {
    TestName.paper: "log_norms",
    TestName.fullcov: "all",
    TestName.fisher_layers: "log_norms",
    TestName.gradnorm: "log_norms",
    TestName.typicality: "log_prob",
    TestName.nll: "log_prob",
    TestName.complexity: "complexity",
}

_TEST_CLASSES: dict[TestName, type[OODTest]] = {
    TestName.paper: DiagonalGaussian,
    TestName.fullcov: ShrinkageGaussian,
    TestName.fisher_layers: FisherLayers,
    TestName.gradnorm: GradNorm,
    TestName.typicality: Typicality,
    TestName.nll: NegLogLikelihood,
    TestName.complexity: ComplexityCorrected,
}


def tail_names(test: TestName | str) -> list[str]:
    """The one-sided tails a test contributes: its name, or ``<name>:high`` and ``<name>:low`` for a
    two-sided test (for typicality: less likely than typical, more likely than typical)."""
    name = TestName(test)
    return [f"{name.value}:high", f"{name.value}:low"] if _TEST_CLASSES[name].two_sided else [name.value]


#: the tests that drop layers whose log-norm std is below min_std
_WITH_MIN_STD = {TestName.paper, TestName.fullcov, TestName.fisher_layers}


def _make_test(name: TestName, min_std: float) -> OODTest:
    cls = _TEST_CLASSES[name]
    return cls(min_std=min_std) if name in _WITH_MIN_STD else cls()


class DetectorSuite(BaseEstimator):
    """All single tests plus their combination; ``ood_score`` and ``p_value`` are the fixed combination's
    (an adaptive suite's is fitted per night: :meth:`night`, then ``score_all(X, night)``).

    ``fit(X)`` splits the rows itself (a seeded permutation); the pipeline instead assigns rows by a hash
    of (seed, row id) and calls :meth:`fit_parts`, so a rerun or another shard layout splits the same way.
    """

    def __init__(
        self,
        components: tuple[str, ...] = ("paper", "fullcov", "typicality"),
        combination: str = "fisher",
        min_std: float = 1e-12,
        calibration_fraction: float = 0.4,
        part_2_fraction: float | None = None,
        random_state: int = 0,
    ):
        self.components = components
        self.combination = combination
        self.min_std = min_std
        self.calibration_fraction = calibration_fraction
        self.part_2_fraction = part_2_fraction
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: None = None) -> DetectorSuite:  # noqa: N803
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=6, ensure_min_features=2)
        u = np.random.default_rng(self.random_state).permutation(len(X)) / len(X)
        part = split_of(u, self.calibration_fraction, self.part_2_fraction)
        if not all((part == k).sum() >= 2 for k in (0, 1, 2)):
            raise ValueError(
                f"need at least 2 rows in each of the fit and calibration parts, got {len(X)} rows"
            )
        names = getattr(self, "feature_names_in_", None)
        ids = [str(i) for i in np.flatnonzero(part == 2)]
        return self._fit_parts(Moments.from_values(X[part == 0]), X[part == 1], X[part == 2], names, ids)

    def fit_parts(
        self,
        moments: Moments,
        calibration_1: np.ndarray,
        calibration_2: np.ndarray,
        feature_names: list[str],
        calibration_2_ids: list[str] | None = None,
    ) -> DetectorSuite:
        """Fit from merged moments of the fit rows and the two calibration parts' feature rows (part 2's
        row ids pick its rows that train an adaptive night; positions when not given)."""
        column_groups(list(feature_names), moments.num_features)  # the layout, checked
        self.n_features_in_ = moments.num_features
        self.feature_names_in_ = np.asarray(feature_names, dtype=object)
        ids = calibration_2_ids or [str(i) for i in range(len(calibration_2))]
        return self._fit_parts(moments, calibration_1, calibration_2, self.feature_names_in_, ids)

    def _fit_parts(
        self,
        moments: Moments,
        cal_1: np.ndarray,
        cal_2: np.ndarray,
        names: np.ndarray | None,
        cal_2_ids: list[str],
    ) -> DetectorSuite:
        components = [TestName(c) for c in self.components]
        if not components:
            raise ValueError("the combination needs at least one component test")
        Combination(self.combination)
        check_split(self.calibration_fraction, self.part_2_fraction)
        if min(len(cal_1), len(cal_2)) < 1:
            raise ValueError("both calibration parts need at least one row")
        if len(cal_2_ids) != len(cal_2):
            raise ValueError(f"{len(cal_2_ids)} ids for {len(cal_2)} rows of calibration part 2")
        groups = column_groups(None if names is None else list(names), moments.num_features)
        missing = [c for c in components if not len(groups[_COLUMNS[c]])]
        if missing:
            raise ValueError(f"component test(s) {missing} need the {COMPLEXITY_COLUMN} feature column")
        self.tests_ = {}
        for name in TestName:
            cols = groups[_COLUMNS[name]]
            if not len(cols):  # complexity, without its column
                continue
            test = _make_test(name, self.min_std)
            self.tests_[name.value] = test.fit_moments(
                moments.select(cols), None if names is None else [str(n) for n in names[cols]]
            )
        cal_1, cal_2 = np.asarray(cal_1, np.float64), np.asarray(cal_2, np.float64)
        self.calibrators_ = {
            name: (EqualTailedCalibrator if test.two_sided else ConformalCalibrator)(
                self._statistic(name, cal_1)
            )
            for name, test in self.tests_.items()
        }
        self.combined_calibrator_ = self._combined_test().calibrate(self._components_of(cal_2)).calibrator
        self.calibration_tails_ = CalibrationTails(
            self.tail_order, self.tails(cal_1), self.tails(cal_2), [str(i) for i in cal_2_ids]
        )
        self.n_fit_, self.n_calibration_ = moments.count, (len(cal_1), len(cal_2))
        return self

    def _column_groups(self) -> dict[str, np.ndarray]:
        names = getattr(self, "feature_names_in_", None)
        return column_groups(None if names is None else list(names), self.n_features_in_)

    @property
    def tail_order(self) -> list[str]:
        """The columns of :meth:`tails` (and of the saved calibration tails): every one-sided tail of
        every fitted test, so the adaptive classifier sees "too likely" apart from "too unlikely"."""
        return [tail for name in self._fitted_tests() for tail in tail_names(name)]

    def _fitted_tests(self) -> list[str]:
        """The fitted single tests in :class:`TestName` order (a loaded suite's dict is in file order)."""
        return [t.value for t in TestName if t.value in self.tests_]

    def tail_columns(self, test: TestName | str) -> list[int]:
        """The columns of :attr:`tail_order` that hold ``test``'s tails."""
        order = self.tail_order
        return [order.index(tail) for tail in tail_names(test)]

    # -- scoring ------------------------------------------------------------------------------
    def _statistic(self, name: str, X: np.ndarray) -> np.ndarray:  # noqa: N803
        # X was validated by the suite already; the single tests see plain column slices of it
        return self.tests_[name].statistic_of(X[:, self._column_groups()[_COLUMNS[TestName(name)]]])

    def _score_of(self, name: str, statistic: np.ndarray) -> np.ndarray:
        if self.tests_[name].two_sided:  # ordered like its equal-tailed p-value
            return -self.calibrators_[name].smooth_log_p(statistic)
        return statistic

    def test_statistic(self, name: str, X: Any) -> np.ndarray:  # noqa: N803
        """What test ``name``'s calibration ranks: its score, or a two-sided test's signed statistic."""
        return self._statistic(name, self._checked(X))

    def test_scores(self, name: str, X: Any) -> np.ndarray:  # noqa: N803
        """Test ``name``'s score of every row (higher = more OOD): its statistic, or for a two-sided
        test -log of its smooth equal-tailed p-value, so that the score ranks like the p-value."""
        return self._score_of(name, self._statistic(name, self._checked(X)))

    def tails(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """-log p~ of every one-sided tail (columns in :attr:`tail_order`) for validated rows ``X``."""
        return self._tails({t: self._statistic(t, X) for t in self.tests_}, len(X))

    def _tails(self, statistics: dict[str, np.ndarray], n: int) -> np.ndarray:
        columns = [self.calibrators_[t].side_smooth_log_p(statistics[t]) for t in self._fitted_tests()]
        return -np.hstack(columns).reshape(n, len(self.tail_order))

    def _combined_test(self) -> CombinedTest:
        # an adaptive suite's fixed combined test is Fisher's: the adaptive one is fitted per night
        fixed = Combination(self.combination)
        fixed = Combination.fisher if fixed is Combination.adaptive else fixed
        calibrators = [self.calibrators_[c] for c in self.components]
        return CombinedTest(calibrators, fixed, getattr(self, "combined_calibrator_", None))

    def _components_of(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return np.column_stack([self._statistic(c, X) for c in self.components])

    def _combine(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
        """Fixed combined statistic and, per row, the index of the component with the smallest tail p."""
        return self._combined_test().statistic(self._components_of(X))

    def adapt_to_night(self, night_tails: np.ndarray, rate: float, seed: int) -> AdaptiveNight:
        """The adaptive combined test of one night, trained on ``night_tails`` (the tails of the night's
        rows that :func:`gradood.stats.adaptive.training_mask` picked at ``rate``)."""
        check_is_fitted(self)
        columns = [self.tail_columns(c) for c in self.components]
        return AdaptiveNight(self.calibration_tails_, columns).fit(night_tails, rate, seed)

    def _checked(self, X: Any) -> np.ndarray:  # noqa: N803
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False, ensure_min_samples=0)

    def ood_score(self, X: Any) -> np.ndarray:  # noqa: N803
        """The combined statistic T(x); higher = more OOD."""
        return self._combine(self._checked(X))[0]

    def score_samples(self, X: Any) -> np.ndarray:  # noqa: N803
        return -self.ood_score(X)

    def p_value(self, X: Any) -> np.ndarray:  # noqa: N803
        """Conformal p-value of the fixed combined statistic against calibration part 2."""
        return self.combined_calibrator_.p_value(self.ood_score(X))

    def score_all(
        self,
        X: Any,  # noqa: N803
        night: AdaptiveNight | None = None,
        combined: bool = True,
    ) -> dict[str, Any]:
        """Every test's score and p-value, the combination's, and the test that drove each row.

        An adaptive suite's combination is the ``night``'s (:meth:`night`), and the driver the test (of all)
        with the smallest tail p; a fixed one's driver is the component with the smallest tail p. With
        ``combined=False`` only the single tests are scored (no night needed, no ``combined``/``driver``).
        """
        X = self._checked(X)
        adaptive = Combination(self.combination) is Combination.adaptive
        if combined and adaptive and night is None:
            raise ValueError(
                "an adaptive combination needs the night's test: DetectorSuite.adapt_to_night(...)"
            )
        if night is not None and not adaptive:
            raise ValueError(f"a night's adaptive test was given to a {self.combination} combination")
        out: dict[str, Any] = {}
        statistics = {name: self._statistic(name, X) for name in self.tests_}
        for name, stat in statistics.items():
            out[name] = {
                "score": self._score_of(name, stat),
                "p_index": self.calibrators_[name].p_index(stat),
            }
        if not combined:
            return out
        if night is None:
            stat, driver = self._combine(X)
            out["combined"] = {"score": stat, "p_index": self.combined_calibrator_.p_index(stat)}
            out["driver"] = np.asarray(self.components, dtype=object)[driver]
            return out
        tails = self._tails(statistics, len(X))
        stat = night.statistic(tails)
        out["combined"] = {"score": stat, "p_index": night.calibrator_.p_index(stat)}
        out["driver"] = np.asarray(self.tail_order, dtype=object)[np.argmax(tails, axis=1)]
        return out

    def calibration_size(self, test: str) -> int:
        """n of the calibration behind ``test``'s p-values (``combined`` or a single test's name)."""
        return self.calibrator(test).n

    def calibrator(self, test: str) -> ConformalCalibrator:
        """The conformal calibration behind ``test``'s p-values (``combined`` or a single test's name)."""
        check_is_fitted(self)
        return self.combined_calibrator_ if test == "combined" else self.calibrators_[test]

    def top_layers(self, X: Any, k: int = 3) -> tuple[list[list[str]], np.ndarray]:  # noqa: N803
        """Per row, the ``k`` kept layers of the paper's test with the largest |z| and their signed z."""
        X = self._checked(X)
        paper = self.tests_[TestName.paper.value]
        z = paper.zscores_of(X[:, self._column_groups()["log_norms"]])
        k = min(k, z.shape[1])
        all_names = getattr(paper, "feature_names_in_", None)
        if all_names is None:
            all_names = np.array([f"x{j}" for j in range(paper.n_features_in_)], dtype=object)
        names = np.asarray(all_names)[np.asarray(paper.kept_, bool)]
        order = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :k]
        return [[str(names[j]) for j in row] for row in order], np.take_along_axis(z, order, axis=1)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        check_is_fitted(self)
        params = self.get_params()
        params["components"] = list(params["components"])
        return {
            "kind": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "params": params,
            "feature_names_in": [str(n) for n in self.feature_names_in_],
            "n_fit": self.n_fit_,
            "n_calibration": list(self.n_calibration_),
            "tests": {name: t.to_dict() for name, t in self.tests_.items()},
            "calibration": {name: c.to_dict() for name, c in self.calibrators_.items()},
            "combined_calibration": self.combined_calibrator_.to_dict(),
            "calibration_tails": self.calibration_tails_.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorSuite:
        check_format(d, cls.__name__)
        params = dict(d["params"])
        params["components"] = tuple(params["components"])
        suite = cls(**params)
        suite.feature_names_in_ = np.asarray(d["feature_names_in"], dtype=object)
        suite.n_features_in_ = len(suite.feature_names_in_)
        suite.n_fit_, suite.n_calibration_ = int(d["n_fit"]), tuple(d["n_calibration"])
        suite.tests_ = {name: ood_test_from_dict(t) for name, t in d["tests"].items()}
        suite.calibrators_ = {name: ConformalCalibrator.from_dict(c) for name, c in d["calibration"].items()}
        suite.combined_calibrator_ = ConformalCalibrator.from_dict(d["combined_calibration"])
        suite.calibration_tails_ = CalibrationTails.from_dict(d["calibration_tails"])
        if suite.calibration_tails_.tests != suite.tail_order:
            found = suite.calibration_tails_.tests
            raise ValueError(f"calibration tails of tests {found}, expected {suite.tail_order}")
        return suite
