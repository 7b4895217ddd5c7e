"""The paper's analyses of per-layer gradient norms (``jobs/analyse.py``).

Ray-free building blocks: :mod:`.layers` (histograms, separation, correlation decay, normality, scaled
chi-square fits), :mod:`.fisher` (FIM slices), :mod:`.invariance` (Prop. 1: :class:`TransformedInput`),
:mod:`.results` (the analyses on feature files and a model), :mod:`.figures` and :mod:`.report`. Only
:mod:`.run` imports Ray.
"""

from gradood.analysis.config import AnalyseConfig, load_analyse_config
from gradood.analysis.invariance import AffineMap, LogitMap, PixelMap, TransformedInput, invariance_check

__all__ = [
    "AffineMap",
    "AnalyseConfig",
    "LogitMap",
    "PixelMap",
    "TransformedInput",
    "invariance_check",
    "load_analyse_config",
]
