"""The greedy k-center coreset (dn2.search.kcenter_greedy, StreamingCoreset) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from dn2.config import config_context
from dn2.search import StreamingCoreset, kcenter_greedy, random_projection


def brute_force_kcenter(X: np.ndarray, n: int, first: int) -> list[int]:
    """Greedy k-center written out: full float64 distance matrix, pick the row farthest from the picks."""
    d = np.sqrt(((X[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1))
    picked = [first]
    while len(picked) < n:
        nearest = d[:, picked].min(axis=1)
        if nearest.max() == 0:
            break
        picked.append(int(nearest.argmax()))
    return picked


def covering_radius(X: np.ndarray, picked: np.ndarray) -> float:
    d = np.sqrt(((X[:, None, :] - X[None, picked, :]) ** 2).sum(-1))
    return float(d.min(axis=1).max())


@pytest.mark.parametrize("seed", range(5))
def test_greedy_picks_the_rows_brute_force_picks(seed):
    X = np.random.default_rng(seed).normal(size=(120, 6)).astype(np.float32)
    picked = kcenter_greedy(X, 15, projection=None)
    centred = ((X - X.mean(0)) ** 2).sum(1)
    assert picked[0] == int(centred.argmax())  # the first pick: farthest from the mean
    assert picked.tolist() == brute_force_kcenter(X, 15, int(picked[0]))


def test_greedy_on_a_projection_is_brute_force_on_the_projected_rows():
    X = np.random.default_rng(1).normal(size=(200, 300)).astype(np.float32)
    R = random_projection(300, 32, seed=3)
    assert R.shape == (300, 32) and random_projection(16, 32) is None  # no projection to more dimensions
    picked = kcenter_greedy(X, 20, projection=R)
    assert picked.tolist() == brute_force_kcenter(X @ R, 20, int(picked[0]))
    assert kcenter_greedy(X, 20).tolist() == kcenter_greedy(X, 20, projection=random_projection(300)).tolist()


def test_greedy_continues_from_initial_distances_and_stops_when_everything_is_covered():
    X = np.array([[0.0], [1.0], [10.0], [10.0], [0.0]], np.float32)
    # the existing bank holds 0: the first pick is the farthest row from it, then the next farthest
    assert kcenter_greedy(X, 3, projection=None, initial=np.abs(X[:, 0])).tolist() == [2, 1]
    assert kcenter_greedy(X, 10, projection=None).tolist() == [2, 0, 1]  # duplicates are never picked twice
    with pytest.raises(ValueError, match="positive"):
        kcenter_greedy(X, 0)
    with pytest.raises(ValueError, match="initial"):
        kcenter_greedy(X, 2, initial=np.zeros(3))


def test_a_coreset_covers_clustered_data_better_than_a_random_subset():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(c, 0.1, (100, 4)) for c in rng.normal(0, 10, (8, 4))]).astype(np.float32)
    picked = kcenter_greedy(X, 8, projection=None)
    assert len({int(i) // 100 for i in picked}) == 8  # one row of every cluster
    assert covering_radius(X, picked) < covering_radius(X, rng.choice(len(X), 8, replace=False))


def test_streaming_coreset_in_one_step_is_the_greedy_selection():
    X = np.random.default_rng(2).normal(size=(500, 8)).astype(np.float32)
    stream = StreamingCoreset(0.1, step_rows=10_000)
    for part in np.array_split(X, 7):
        stream.add(part)
    rows, positions = stream.finish()
    assert positions.tolist() == sorted(kcenter_greedy(X, 50, projection=None).tolist())
    np.testing.assert_array_equal(rows, X[positions])


def test_streaming_steps_continue_one_selection_instead_of_repeating_it():
    """Each step starts from the distances to the rows picked before, so a second step over the same rows
    picks exactly what one greedy selection of twice the size picks next; independent steps (the chunked
    coreset that lost 4.5 ROCAUC points in the study) would pick the same rows again."""
    X = np.random.default_rng(3).normal(size=(300, 5)).astype(np.float32)
    stream = StreamingCoreset(0.2, step_rows=300, projection_dim=128)
    stream.add(X)
    stream.add(X)  # the same rows again: a second step
    rows, positions = stream.finish()
    first, second = positions[positions < 300], positions[positions >= 300] - 300
    greedy = kcenter_greedy(X, 120, projection=None)
    assert set(first.tolist()) == set(greedy[:60].tolist())
    assert set(second.tolist()) == set(greedy[60:].tolist())  # nothing picked twice


def test_streaming_step_is_bounded_by_the_working_memory():
    stream = StreamingCoreset(0.5)
    with config_context(working_memory=1):  # 1 MiB: a few hundred rows of 512 + 128 floats
        assert stream._step(512) < 500
    assert stream._step(512) == 8192  # the default: cache-sized, whatever the data
    with pytest.raises(ValueError, match="fraction"):
        StreamingCoreset(0.0)
    with pytest.raises(ValueError, match="no rows"):
        StreamingCoreset(0.5).finish()
