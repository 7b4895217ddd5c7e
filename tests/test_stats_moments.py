import json

import numpy as np
import pytest

from gradood.stats import Moments


def _random_pieces(rng: np.random.Generator, values: np.ndarray) -> list[np.ndarray]:
    """Split rows at random cut points, forcing an empty piece and a size-1 piece in."""
    n = values.shape[0]
    cuts = np.sort(rng.choice(np.arange(2, n - 1), size=6, replace=False))
    cuts = np.concatenate([[0, 0, 1], cuts, [n]])  # [0:0] empty, [0:1] a single row
    return [values[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# A float64 mean near 1e8 is only exact to ~7e-9, which bounds the between-chunk term of any merge of
# (count, mean, m2); noise of std >= 30 keeps that bound well under 1e-9 relative while the textbook
# sum-of-squares formula is still off by ~1e-4 there.
@pytest.mark.parametrize(
    ("offset", "scales"), [(0.0, [1.0, 0.1, 3.0, 1e-3]), (1e8, [30.0, 100.0, 300.0, 1000.0])]
)
@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_merge_of_random_pieces_matches_numpy(offset, scales, split_seed):
    rng = np.random.default_rng(split_seed)
    values = offset + rng.normal(size=(203, 4)) * np.array(scales)
    pieces = _random_pieces(rng, values)
    assert any(p.shape[0] == 0 for p in pieces) and any(p.shape[0] == 1 for p in pieces)

    parts = [Moments.from_values(p) for p in pieces]
    order = rng.permutation(len(parts))
    merged = Moments.merge_all(parts[i] for i in order)
    # a tree of merges must agree as well
    tree = Moments.merge_all(parts[:4]).merge(Moments.merge_all(parts[4:]))

    for m in (merged, tree):
        assert m.count == values.shape[0]
        np.testing.assert_allclose(m.mean, values.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(m.variance(), np.var(values, axis=0), rtol=1e-9)
        np.testing.assert_allclose(m.variance(ddof=1), np.var(values, axis=0, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(m.std(ddof=1), np.std(values, axis=0, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(m.covariance(ddof=1), np.cov(values, rowvar=False), rtol=1e-8)


def test_one_chunk_is_two_pass_accurate_at_large_offset():
    rng = np.random.default_rng(5)
    values = 1e8 + rng.normal(size=(1000, 2))
    naive = (np.square(values).sum(0) - np.square(values.sum(0)) / len(values)) / len(values)
    m = Moments.from_values(values)
    np.testing.assert_allclose(m.variance(), np.var(values, axis=0), rtol=1e-12)
    # the textbook sum-of-squares formula is hopeless here; this is what the test guards against
    assert np.max(np.abs(naive / np.var(values, axis=0) - 1)) > 1e-3


def test_empty_operands_and_identity():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(7, 3))
    m = Moments.from_values(values)
    for merged in (
        Moments.empty(3).merge(m),
        m.merge(Moments.empty(3)),
        Moments.from_values(values[:0]).merge(m),
    ):
        assert merged.count == 7
        np.testing.assert_array_equal(merged.mean, m.mean)
        np.testing.assert_array_equal(merged.comoment, m.comoment)
    assert Moments.merge_all([Moments.empty(3), Moments.empty(3)]).count == 0


def test_merge_result_does_not_alias_operands():
    m = Moments.from_values(np.ones((2, 2)))
    merged = m.merge(Moments.empty(2))
    merged.mean[0] = 42.0
    assert m.mean[0] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="features"):
        Moments.empty(2).merge(Moments.empty(3))
    with pytest.raises(ValueError, match="at least one"):
        Moments.merge_all([])
    with pytest.raises(ValueError, match="ddof=1"):
        Moments.from_values(np.ones((1, 2))).variance(ddof=1)
    with pytest.raises(ValueError, match="column 1"):
        Moments.from_values(np.array([[0.0, 1.0], [2.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        Moments.from_values(np.ones(3))


def test_dict_round_trip_through_json():
    rng = np.random.default_rng(4)
    m = Moments.from_values(rng.normal(size=(11, 5)) * 1e3)
    back = Moments.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.count == m.count
    np.testing.assert_array_equal(back.mean, m.mean)
    np.testing.assert_array_equal(back.comoment, m.comoment)
    assert back.mean.dtype == np.float64


def test_select_gives_the_moments_of_a_column_subset():
    rng = np.random.default_rng(6)
    values = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4))
    sub = Moments.from_values(values).select([3, 1])
    direct = Moments.from_values(values[:, [3, 1]])
    np.testing.assert_allclose(sub.mean, direct.mean, rtol=1e-12)
    np.testing.assert_allclose(sub.comoment, direct.comoment, rtol=1e-12)
