import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from gradood.stats import aupr_in, aupr_out, auroc, fpr_at_95_tpr, ood_metrics


def _tied_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer-valued scores: plenty of ties within and across the two sets."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 8, size=57).astype(float), rng.integers(2, 10, size=43).astype(float)


def _labels(n_id: int, n_ood: int) -> np.ndarray:
    return np.concatenate([np.zeros(n_id), np.ones(n_ood)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_and_pair_count_with_ties(seed):
    sid, sood = _tied_scores(seed)
    expected = roc_auc_score(_labels(sid.size, sood.size), np.concatenate([sid, sood]))
    assert auroc(sid, sood) == pytest.approx(expected, rel=1e-12)
    wins = (sood[:, None] > sid[None, :]).mean() + 0.5 * (sood[:, None] == sid[None, :]).mean()
    assert auroc(sid, sood) == pytest.approx(wins, rel=1e-12)


def test_auroc_extremes():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_fpr_at_95_tpr_hand_example():
    # ID scores 1..20: 95 % of 20 is 19 rows, so t = 19 and rows with s <= 19 are accepted.
    # OOD 18.5 and 19 are accepted, 19.5 and 25 are not: FPR = 2 / 4.
    sid = np.arange(1.0, 21.0)
    assert fpr_at_95_tpr(sid, [18.5, 19.0, 19.5, 25.0]) == 0.5
    # ID order does not matter; 21 rows need ceil(19.95) = 20 accepted, so t = 20
    sid21 = np.random.default_rng(0).permutation(np.arange(1.0, 22.0))
    assert fpr_at_95_tpr(sid21, [19.5, 20.0, 20.5]) == pytest.approx(2 / 3)


def _fpr_reference(sid: np.ndarray, sood: np.ndarray) -> float:
    """Smallest candidate threshold among ID scores that accepts at least 95 % of ID rows (brute force)."""
    for t in np.unique(sid):
        if (sid <= t).sum() * 100 >= 95 * sid.size:
            return float((sood <= t).mean())
    raise AssertionError("unreachable: the max ID score accepts every ID row")


@pytest.mark.parametrize("n_id", [1, 19, 20, 100, 137])
def test_fpr_at_95_tpr_matches_direct_computation(n_id):
    rng = np.random.default_rng(n_id)
    sid, sood = rng.normal(size=n_id), rng.normal(1.0, size=77)
    assert fpr_at_95_tpr(sid, sood) == _fpr_reference(sid, sood)
    tied_id, tied_ood = _tied_scores(n_id)
    assert fpr_at_95_tpr(tied_id, tied_ood) == _fpr_reference(tied_id, tied_ood)


@pytest.mark.parametrize("seed", [0, 3])
def test_aupr_conventions_match_sklearn(seed):
    sid, sood = _tied_scores(seed)
    scores = np.concatenate([sid, sood])
    is_ood = _labels(sid.size, sood.size)
    assert aupr_out(sid, sood) == pytest.approx(average_precision_score(is_ood, scores), rel=1e-12)
    assert aupr_in(sid, sood) == pytest.approx(average_precision_score(1 - is_ood, -scores), rel=1e-12)
    assert aupr_in(sid, sood) != pytest.approx(aupr_out(sid, sood))


def test_aupr_perfect_separation():
    assert aupr_in([0.0, 1.0], [5.0, 6.0, 7.0]) == 1.0
    assert aupr_out([0.0, 1.0], [5.0, 6.0, 7.0]) == 1.0


def test_ood_metrics_bundle_is_json_safe():
    sid, sood = _tied_scores(4)
    out = json.loads(json.dumps(ood_metrics(sid, sood)))
    assert out["auroc"] == auroc(sid, sood)
    assert out["fpr_at_95_tpr"] == fpr_at_95_tpr(sid, sood)
    assert out["aupr_in"] == aupr_in(sid, sood)
    assert out["aupr_out"] == aupr_out(sid, sood)
    assert (out["n_id"], out["n_ood"]) == (57, 43)
    assert "OOD positive" in out["convention"] and "ID positive" in out["convention"]


@pytest.mark.parametrize("metric", [auroc, fpr_at_95_tpr, aupr_in, aupr_out, ood_metrics])
def test_invalid_inputs_raise(metric):
    with pytest.raises(ValueError, match="need ID and OOD rows"):
        metric([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        metric([1.0, np.nan], [1.0])
