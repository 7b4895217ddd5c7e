"""Per-layer Gaussian fits of log gradient norms, the typicality baseline and detection metrics (no torch)."""

from gradood.stats.detector import LogGaussianDetector, TypicalityTest, log_features
from gradood.stats.metrics import aupr_in, aupr_out, auroc, fpr_at_95_tpr, ood_metrics
from gradood.stats.moments import Moments

__all__ = [
    "LogGaussianDetector",
    "Moments",
    "TypicalityTest",
    "aupr_in",
    "aupr_out",
    "auroc",
    "fpr_at_95_tpr",
    "log_features",
    "ood_metrics",
]
