"""Detection metrics from OOD scores (higher = more out-of-distribution) of ID and OOD rows.

Label convention: OOD is the positive class unless a metric's name says otherwise (``aupr_in`` and
the ID-positive ``fpr_at_95_tpr``). Every ``ood_metrics`` result carries its convention string.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score

CONVENTION = (
    "scores: higher = more OOD. auroc, aupr_out: OOD positive, score s. aupr_in: ID positive, score -s. "
    "fpr_at_95_tpr: ID positive, threshold from ID rows alone accepting (s <= t) at least 95% of them; "
    "value = fraction of OOD rows also accepted (OpenOOD's OOD-positive FPR@95 is a different number)."
)


def _scores(score_id: np.ndarray, score_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sid = np.asarray(score_id, dtype=np.float64).ravel()
    sood = np.asarray(score_ood, dtype=np.float64).ravel()
    if sid.size == 0 or sood.size == 0:
        raise ValueError(f"need ID and OOD rows, got {sid.size} ID and {sood.size} OOD")
    if not (np.isfinite(sid).all() and np.isfinite(sood).all()):
        raise ValueError("scores must be finite")
    return sid, sood


def auroc(score_id: np.ndarray, score_ood: np.ndarray) -> float:
    """P(s_OOD > s_ID) + 0.5 P(s_OOD = s_ID) over all (ID, OOD) pairs, via the Mann-Whitney U statistic.

    Average ranks count every tie as half a win, and sorting keeps it O(n log n).
    """
    sid, sood = _scores(score_id, score_ood)
    ranks = rankdata(np.concatenate([sid, sood]))
    n_id, n_ood = sid.size, sood.size
    u_ood = ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2
    return float(u_ood / (n_id * n_ood))


def fpr_at_95_tpr(score_id: np.ndarray, score_ood: np.ndarray) -> float:
    """ID-positive FPR at 95 % TPR: the fraction of OOD rows accepted by a threshold set on ID rows alone.

    The threshold t is the smallest ID score with at least 95 % of ID rows at or below it (accepted:
    s <= t); ties at t can push the accepted ID fraction above 95 %. This is the rule a screening job
    can deploy, since it needs no OOD data. OpenOOD and pytorch-ood report the OOD-positive version
    instead (threshold flagging 95 % of the OOD rows, value = fraction of ID rows flagged), which
    depends on the OOD set and is generally a different number.
    """
    sid, sood = _scores(score_id, score_ood)
    # integer ceil(0.95 n): a float product could land just above an integer and skip a row
    accepted = (95 * sid.size + 99) // 100
    threshold = np.partition(sid, accepted - 1)[accepted - 1]
    return float(np.mean(sood <= threshold))


def _average_precision(score_pos: np.ndarray, score_neg: np.ndarray) -> float:
    labels = np.concatenate([np.ones(score_pos.size), np.zeros(score_neg.size)])
    return float(average_precision_score(labels, np.concatenate([score_pos, score_neg])))


def aupr_in(score_id: np.ndarray, score_ood: np.ndarray) -> float:
    """Average precision with ID rows as positives, ranked by -s."""
    sid, sood = _scores(score_id, score_ood)
    return _average_precision(-sid, -sood)


def aupr_out(score_id: np.ndarray, score_ood: np.ndarray) -> float:
    """Average precision with OOD rows as positives, ranked by s."""
    sid, sood = _scores(score_id, score_ood)
    return _average_precision(sood, sid)


def ood_metrics(score_id: np.ndarray, score_ood: np.ndarray) -> dict[str, Any]:
    """All four metrics, the row counts and the label convention, as JSON-safe values."""
    sid, sood = _scores(score_id, score_ood)
    return {
        "auroc": auroc(sid, sood),
        "fpr_at_95_tpr": fpr_at_95_tpr(sid, sood),
        "aupr_in": aupr_in(sid, sood),
        "aupr_out": aupr_out(sid, sood),
        "n_id": int(sid.size),
        "n_ood": int(sood.size),
        "convention": CONVENTION,
    }
