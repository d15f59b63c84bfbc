"""`metrics.measure_memory_bandwidth`: the streaming triad the decode roofline of the performance suite divides by."""

import warnings

import pytest

from v4jax.training import metrics


def test_memory_bandwidth_is_a_plausible_rate():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable": the output must be written in place
        rate = metrics.measure_memory_bandwidth(mib=16, repeats=2, rounds=2)
    assert 1e8 < rate < 1e13  # bytes/s: more than 100 MB/s, less than 10 TB/s


@pytest.mark.parametrize("kwargs", [dict(mib=0), dict(repeats=0), dict(rounds=0)])
def test_memory_bandwidth_rejects_empty_measurements(kwargs):
    with pytest.raises(ValueError, match="must be >= 1"):
        metrics.measure_memory_bandwidth(**kwargs)
