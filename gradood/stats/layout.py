"""The feature rows' layout: the log-norm columns every test reads, the log-likelihood column, and the
held-out split. Extraction workers need these and nothing else of the statistics, so this module imports
numpy only (scipy and scikit-learn would add about a second to every worker's start)."""

from __future__ import annotations

import numpy as np

from gradood.core.checks import check_split
from gradood.stats.moments import as_matrix, check_finite

#: the last feature column, log p(x); the others are the layers' log-norms
LOG_PROB_COLUMN = "log_prob"


def log_features(sqnorms: np.ndarray, min_sqnorm: float) -> np.ndarray:
    """``log(max(f, min_sqnorm))`` in float64: the columns every gradient test works on.

    The floor turns exact zeros (dead layers) into a finite value; tiny negative values, which ghost
    norms can produce by cancellation, land on it too. NaN or inf means a broken extraction upstream
    and raises ValueError naming the column.
    """
    sqnorms = as_matrix(sqnorms, "squared gradient norms")
    check_finite(sqnorms, "squared gradient norms")
    return np.log(np.maximum(sqnorms, min_sqnorm))


def split_of(u: np.ndarray, calibration_fraction: float, part_2_fraction: float | None = None) -> np.ndarray:
    """0 = fit, 1 = calibration part 1, 2 = part 2, from per-row uniforms ``u`` in [0, 1).

    ``calibration_fraction`` of the rows are held out of the fit; ``part_2_fraction`` of all rows (default:
    half the held-out share) are part 2, the rest of the held-out rows part 1.
    """
    check_split(calibration_fraction, part_2_fraction)
    part_2 = calibration_fraction / 2 if part_2_fraction is None else part_2_fraction
    u = np.asarray(u, dtype=np.float64)
    return np.where(u >= calibration_fraction, 0, np.where(u < calibration_fraction - part_2, 1, 2))
