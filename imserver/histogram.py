"""A fixed-bucket histogram cheap enough for the batch writer's hot path.

``/metrics`` exposes it as a Prometheus histogram (``imserver.http.metrics``);
keeping the recording side free of the client library keeps one ``bisect``
and two additions per observation.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Histogram:
    """Counts of observations at or below each upper bound, plus their sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs, cumulative, ending with ``+Inf``."""
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


#: Rows per committed batch.
BATCH_ROWS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
#: Seconds per batch commit (prepare + the one-statement insert + fsync).
COMMIT_SECONDS_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
