"""The feature rows' layout: the log-norm columns every test reads, the log-likelihood column, and the
held-out split. Extraction workers need these and nothing else of the statistics, so this module imports
numpy only (scipy and scikit-learn would add about a second to every worker's start)."""

from __future__ import annotations

import numpy as np

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


def split_of(u: np.ndarray, calibration_fraction: float) -> np.ndarray:
    """0 = fit, 1 = calibration part 1, 2 = part 2, from per-row uniforms ``u`` in [0, 1)."""
    u = np.asarray(u, dtype=np.float64)
    return np.where(u >= calibration_fraction, 0, np.where(u < calibration_fraction / 2, 1, 2))
