"""The display envelope of a Window (slabcast.client.window.envelope): each column's true min and max.

Moved from tests/integration/test_window.py, whose other tests read a real broker's streams.
"""

from __future__ import annotations

import numpy as np
import pytest

from slabcast.client.window import envelope


@pytest.mark.parametrize(("n", "pixels"), [(1000, 7), (10, 3), (5, 50), (1, 1), (997, 996)])
def test_envelope_equals_the_true_min_and_max_of_each_column(n, pixels):
    data = np.random.default_rng(n).standard_normal((3, n))
    times = np.arange(n) * 0.1
    mins, maxs, cols = envelope(data, times, pixels)
    columns = min(n, pixels)
    bounds = [(k * n) // columns for k in range(columns)] + [n]
    for k in range(columns):
        part = data[:, bounds[k] : bounds[k + 1]]
        assert part.shape[1] >= 1
        np.testing.assert_array_equal(mins[:, k], part.min(axis=1))
        np.testing.assert_array_equal(maxs[:, k], part.max(axis=1))
    assert cols[0] == 0.0


def test_display_envelope_by_tsdownsample_keeps_every_peak_like_numpy():
    pytest.importorskip("tsdownsample")
    from slabcast.client.window import envelope, envelope_tsdownsample

    rng = np.random.default_rng(4)
    data = rng.standard_normal((8, 20480)).astype(np.float32)
    data[3, 12345] = 50.0  # a single-sample spike must survive decimation
    times = np.arange(20480) / 2048.0
    for fn in (envelope, envelope_tsdownsample):
        mins, maxs, cols = fn(data, times, 1200)
        assert mins.shape == maxs.shape == (8, 1200) and cols.shape == (1200,)
        assert maxs[3].max() == 50.0 and np.array_equal(mins.min(axis=1), data.min(axis=1))
        assert np.all(np.diff(cols) > 0)
