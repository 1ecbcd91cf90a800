"""Token buckets with time as an input (no clock at all)."""

from __future__ import annotations

import pytest

from imserver.hub.ratelimit import RateLimiter, TokenBucket


def test_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=10.0, burst=20, now=100.0)
    assert all(b.take(100.0) == 0.0 for _ in range(20))
    assert b.take(100.0) == pytest.approx(0.1)
    assert b.take(100.05) == pytest.approx(0.05)
    assert b.take(100.11) == 0.0
    assert not b.full(100.11)
    assert b.full(102.2)
    assert b.take(1000.0) == 0.0 and b.tokens == pytest.approx(19.0)  # capped at burst


def test_limiter_counts_rejections_and_prunes_full_buckets() -> None:
    lim = RateLimiter({"send": (1.0, 2.0)})
    assert lim.take("send", "a", 0.0) == 0.0
    assert lim.take("send", "a", 0.0) == 0.0
    assert lim.take("send", "a", 0.0) == pytest.approx(1.0)
    assert lim.take("send", "b", 0.0) == 0.0
    assert lim.rejections == {"send": 1}
    assert lim.prune(0.5) == 0
    assert lim.prune(2.0) == 2
    assert lim.buckets == {}
    assert lim.take("send", "a", 2.0) == 0.0  # a forgotten bucket starts full
