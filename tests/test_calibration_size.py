"""The calibration-size driver's pure parts: the grid order and the paired deltas."""

import numpy as np

from benchmarks.calibration_size import grid, paired_delta


def test_grid_puts_the_largest_calibration_last_and_covers_every_pair():
    rng = np.random.default_rng()
    samples = sorted(set(rng.integers(1, 20, 4).tolist()))
    steps = sorted(set(rng.integers(1, 50, 3).tolist()))
    g = grid(samples, steps)
    assert set(g) == {(n, s) for n in samples for s in steps} and len(g) == len(samples) * len(steps)
    assert g[-1][0] * g[-1][1] == max(samples) * max(steps)


def test_paired_delta_matches_a_hand_computed_standard_error():
    rng = np.random.default_rng()
    ref = rng.normal(30, 2, 9)
    vals = ref + rng.normal(0.5, 0.3, 9)
    mean, se = paired_delta(vals.tolist(), ref.tolist())
    d = vals - ref
    assert np.isclose(mean, d.sum() / 9)
    assert np.isclose(se, np.sqrt(((d - d.mean()) ** 2).sum() / 8 / 9))
