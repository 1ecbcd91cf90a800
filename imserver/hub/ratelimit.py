"""Token buckets. Time is an input (``now`` in seconds), so tests drive it directly.

Capacities and rates are values, not constants (SCALE-OUT point 6): a later
multi-node step can give each node a share of a user's budget.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens. Returns 0.0 on success, else seconds until they would be there."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely (so it can be forgotten)."""
        self._refill(now)
        return self.tokens >= self.burst


class RateLimiter:
    """Named buckets per key (user or address), pruned when full again."""

    def __init__(self, limits: dict[str, tuple[float, float]]) -> None:
        self.limits = limits
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.rejections: dict[str, int] = dict.fromkeys(limits, 0)

    def take(self, kind: str, key: str, now: float, n: float = 1.0) -> float:
        """Take from ``key``'s bucket of ``kind``: 0.0 or the seconds to wait."""
        b = self.buckets.get((kind, key))
        if b is None:
            rate, burst = self.limits[kind]
            b = self.buckets[(kind, key)] = TokenBucket(rate, burst, now)
        wait = b.take(now, n)
        if wait:
            self.rejections[kind] += 1
        return wait

    def prune(self, now: float) -> int:
        """Forget buckets that are full (an absent bucket starts full): bounds memory."""
        dead = [k for k, b in self.buckets.items() if b.full(now)]
        for k in dead:
            del self.buckets[k]
        return len(dead)
