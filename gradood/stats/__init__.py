"""Statistics over gradient features (no torch): mergeable moments, single OOD tests, conformal p-values,
false-discovery control, the combined detector suite and detection metrics.

Names are imported on first use, so a worker that needs only the feature layout (extraction) or the
moments does not pay for scipy and scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_MODULES = {
    "Combination": "conformal",
    "CombinedTest": "conformal",
    "ConformalCalibrator": "conformal",
    "FdrMethod": "conformal",
    "combine_log_p": "conformal",
    "conformal_p_values": "conformal",
    "fdr_flags": "conformal",
    "q_values_from_index": "conformal",
    "ComplexityCorrected": "ood_tests",
    "DiagonalGaussian": "ood_tests",
    "FisherLayers": "ood_tests",
    "GradNorm": "ood_tests",
    "NegLogLikelihood": "ood_tests",
    "OODTest": "ood_tests",
    "ShrinkageGaussian": "ood_tests",
    "Typicality": "ood_tests",
    "LOG_PROB_COLUMN": "layout",
    "log_features": "layout",
    "split_of": "layout",
    "aupr_in": "metrics",
    "aupr_out": "metrics",
    "auroc": "metrics",
    "fpr_at_95_tpr": "metrics",
    "ood_metrics": "metrics",
    "Moments": "moments",
    "DetectorSuite": "suite",
    "TestName": "suite",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
