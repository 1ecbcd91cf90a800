"""Cost of one hop across the Trio -> asyncio bridge (figures for docs/design.md).

    python -m bench.bridge_hop --dsn postgresql://... [--n 2000]

Measures, on the real bridge and pool: a ``SELECT 1`` per hop, the bare hop
(an asyncio no-op), and a batch of rows inserted with ``unnest`` in one hop.
"""

from __future__ import annotations

import argparse
import json
import time

import trio

from imserver.storage.db import Storage


async def _noop() -> None:
    return None


async def main(dsn: str, n: int) -> dict[str, float]:
    storage = Storage(dsn, pool_size=2)
    await storage.open()
    out: dict[str, float] = {}
    try:
        await storage.ping()
        t = time.perf_counter()
        for _ in range(n):
            await storage._thread.call(_noop)
        out["bare_hop_us"] = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        for _ in range(n):
            await storage.ping()
        out["select1_hop_us"] = (time.perf_counter() - t) / n * 1e6

        async def batch(conn, rows: int) -> None:  # type: ignore[no-untyped-def]
            async with conn.transaction():
                await conn.execute("CREATE TEMP TABLE IF NOT EXISTS hop (a bigint, b text)")
                await conn.execute(
                    "INSERT INTO hop SELECT * FROM unnest($1::bigint[], $2::text[])",
                    list(range(rows)),
                    ["x" * 32] * rows,
                )

        for rows in (1, 512, 5000):
            reps = max(5, n // max(1, rows // 10))
            t = time.perf_counter()
            for _ in range(reps):
                await storage._acquire_run(batch, rows)
            dt = (time.perf_counter() - t) / reps
            out[f"unnest_{rows}_rows_ms"] = dt * 1e3
            out[f"unnest_{rows}_rows_per_s"] = rows / dt
    finally:
        await storage.aclose()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--n", type=int, default=2000)
    a = p.parse_args()
    print(json.dumps(trio.run(main, a.dsn, a.n)))
