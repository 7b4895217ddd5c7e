"""Statistics over gradient features (no torch): mergeable moments, single OOD tests, conformal p-values,
false-discovery control, the combined detector suite and detection metrics."""

from gradood.stats.conformal import (
    Combination,
    ConformalCalibrator,
    FdrMethod,
    combine_log_p,
    conformal_p_values,
    fdr_flags,
    q_values_from_index,
)
from gradood.stats.detectors import (
    DiagonalGaussian,
    FisherLayers,
    GradNorm,
    NegLogLikelihood,
    OODTest,
    ShrinkageGaussian,
    Typicality,
    log_features,
)
from gradood.stats.metrics import aupr_in, aupr_out, auroc, fpr_at_95_tpr, ood_metrics
from gradood.stats.moments import Moments
from gradood.stats.suite import LOG_PROB_COLUMN, DetectorSuite, TestName, split_of

__all__ = [
    "LOG_PROB_COLUMN",
    "Combination",
    "ConformalCalibrator",
    "DetectorSuite",
    "DiagonalGaussian",
    "FdrMethod",
    "FisherLayers",
    "GradNorm",
    "Moments",
    "NegLogLikelihood",
    "OODTest",
    "ShrinkageGaussian",
    "TestName",
    "Typicality",
    "aupr_in",
    "combine_log_p",
    "aupr_out",
    "auroc",
    "conformal_p_values",
    "fdr_flags",
    "fpr_at_95_tpr",
    "log_features",
    "ood_metrics",
    "q_values_from_index",
    "split_of",
]
