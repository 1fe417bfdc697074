"""The one percentile every benchmark and `livepipe tap --stats` report.

Nearest rank: the q-th percentile is the smallest observed value with at least q % of the values at or
below it (rank ceil(q/100 * n)). It is always a value that was measured, never an interpolation
between two, so a p99 of 100 delays is the 99th smallest delay. Medians are the usual median
(`statistics.median`: the mean of the two middle values for an even count).
"""
from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100, nearest rank) of `values` (any order); None if there are none."""
    s = sorted(values)
    if not s:
        return None
    rank = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[rank]
