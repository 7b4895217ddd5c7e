"""A set-level test per run: did tonight's data as a whole shift away from the calibration data?

Per-image flags need strong evidence for each image; a night whose images are each only slightly unusual
flags nothing, yet as a whole it is not the in-distribution data. Under the in-distribution hypothesis
tonight's scores and the held-out calibration scores are exchangeable, so the one-sided Mann-Whitney U
(rank-sum) test of "tonight scores higher" is valid without any assumption on the score's distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu


def drift_test(night_scores: np.ndarray, calibration_scores: np.ndarray) -> dict[str, Any]:
    """One-sided Mann-Whitney U of the night's OOD scores against the calibration scores.

    Returns the p-value, the U statistic and the common-language effect size P(s_night > s_cal) + ½P(=)
    (0.5 = no shift). With no scored rows the test is undefined and the p-value is None.
    """
    night = np.asarray(night_scores, dtype=np.float64)
    night = night[np.isfinite(night)]
    calibration = np.asarray(calibration_scores, dtype=np.float64)
    base = {"test": "mann-whitney-u, one-sided (night scores higher)", "n_night": int(night.size)}
    base["n_calibration"] = int(calibration.size)
    if night.size == 0 or calibration.size == 0:
        return {**base, "statistic": None, "p_value": None, "effect": None}
    result = mannwhitneyu(night, calibration, alternative="greater", method="asymptotic")
    effect = float(result.statistic) / (night.size * calibration.size)
    return {**base, "statistic": float(result.statistic), "p_value": float(result.pvalue), "effect": effect}
