"""The feature rows' layout: the log-norm columns every test reads, the log-likelihood column, the
input-complexity column, and the held-out split. Extraction workers need these and nothing else of the
statistics, so this module imports numpy (and PIL, for PNG sizes) only: scipy and scikit-learn would add
about a second to every worker's start."""

from __future__ import annotations

import numpy as np

from gradood.core.checks import check_split
from gradood.stats.moments import as_matrix, check_finite

#: the feature column of log p(x) in nats (after the layers' log-norms)
LOG_PROB_COLUMN = "log_prob"
#: the optional feature column after log p(x): the input's PNG-compressed size in bits, a measure of its
#: complexity (Serra et al. 2020: simple images get high likelihoods because they are simple)
COMPLEXITY_COLUMN = "complexity_bits"


def column_groups(names: list[str] | None, num_features: int) -> dict[str, np.ndarray]:
    """Which columns of a feature matrix each kind of test reads: ``log_norms`` (the layers'), ``log_prob``,
    ``all`` (both) and ``complexity`` (log p, then the complexity bits; empty without that column).

    The layout is ``[log f_j ..., log_prob]`` or ``[log f_j ..., log_prob, complexity_bits]``; without
    names (a plain matrix) it is the first, log p last.
    """
    if names is None or LOG_PROB_COLUMN not in names:
        names = [f"x{j}" for j in range(num_features - 1)] + [LOG_PROB_COLUMN]
    names = [str(n) for n in names]
    tail = [LOG_PROB_COLUMN, COMPLEXITY_COLUMN] if COMPLEXITY_COLUMN in names else [LOG_PROB_COLUMN]
    if len(names) != num_features or names[-len(tail) :] != tail or num_features < len(tail) + 1:
        raise ValueError(
            f"feature columns must be at least one log-norm, then {' and '.join(tail)} last; got "
            f"{num_features} columns ending {names[-len(tail) :]}"
        )
    norms = np.arange(num_features - len(tail))
    log_prob = np.array([num_features - len(tail)])
    complexity = np.arange(num_features - 2, num_features) if len(tail) == 2 else np.zeros(0, np.int64)
    return {"log_norms": norms, "log_prob": log_prob, "all": np.r_[norms, log_prob], "complexity": complexity}


def png_bits(images: np.ndarray) -> np.ndarray:
    """Bits of each uint8 ``[N, C, H, W]`` image losslessly compressed as PNG (zlib level 9): float64 [N]."""
    import io

    from PIL import Image

    out = np.empty(len(images), np.float64)
    for k, image in enumerate(np.asarray(images, np.uint8)):
        buffer = io.BytesIO()
        array = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=9)
        out[k] = 8.0 * buffer.getbuffer().nbytes
    return out


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
