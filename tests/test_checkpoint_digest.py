"""What a resumable save is checked against: digests of feeds and arrays, empty arrays included
(a decoder's calibration feeds carry empty KV caches)."""

from __future__ import annotations

import numpy as np

from flarc.calib.checkpoint import arrays_digest, feeds_digest


def test_digests_take_empty_arrays_and_see_every_difference():
    empty = np.zeros((2, 4, 0, 8), np.float32)
    feed = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3), "past": empty}
    base = feeds_digest([feed])
    assert base == feeds_digest([{k: v.copy() for k, v in feed.items()}])
    changed = [
        {**feed, "past": np.zeros((2, 4, 0, 4), np.float32)},  # another empty shape
        {**feed, "past": empty.astype(np.float16)},  # another dtype
        {**feed, "input_ids": feed["input_ids"] + 1},  # other values
    ]
    assert len({base, *(feeds_digest([f]) for f in changed)}) == 4
    assert feeds_digest([feed, feed]) != base  # the number of batches counts
    arrays = {"s0_gram": np.eye(3), "s0_count": np.array(5), "s1_sum1": np.zeros(0)}
    assert arrays_digest(arrays) == arrays_digest(dict(reversed(list(arrays.items()))))
    assert arrays_digest(arrays) != arrays_digest({**arrays, "s0_count": np.array(6)})
