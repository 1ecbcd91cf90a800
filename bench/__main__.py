"""``python -m bench <scenario> [options]``: load tests for imserver (see bench/README.md).

Scenarios: ``pairs``, ``fanout``, ``idle``, ``storm``, ``history``; more can be
added as modules with ``add_arguments(parser)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import sys

from . import common, fanout, history, idle, pairs, storm

SCENARIOS = {
    "pairs": (pairs, "P sender/receiver pairs: s{i} sends to r{i} (throughput, latency, order)"),
    "fanout": (
        fanout,
        "one group of M members, K senders: fan-out deliveries/s, delivery latency, order",
    ),
    "idle": (
        idle,
        "C idle authenticated connections with heartbeats: connect rate, server RSS per connection",
    ),
    "storm": (
        storm,
        "N offline users get M messages each, then all reconnect at once and catch up",
    ),
    "history": (
        history,
        "C HTTP clients, closed loop: history pages and searches per second, latency per kind",
    ),
}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--duration", type=float, default=10.0, help="seconds of measurement (default 10)"
    )
    g.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)"
    )
    g.add_argument(
        "--host", default="127.0.0.1", help="server host; loopback only (default 127.0.0.1)"
    )
    g.add_argument(
        "--port", type=int, default=None, help="server port (default 7700 for tcp, 7701 for ws)"
    )
    g.add_argument(
        "--procs",
        type=int,
        default=1,
        help="load-generator processes, each its own trio.run (default 1)",
    )
    g.add_argument(
        "--cpu",
        default=None,
        help="CPU list for the load generator, e.g. 1 or 1-3 (default: 1 with --spawn-server)",
    )
    g.add_argument(
        "--json", metavar="PATH", default=None, help="append the one-line JSON result to PATH"
    )
    g.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    g.add_argument(
        "--plot",
        action="store_true",
        help="also write a PNG (latency CDF, rates over time) next to --json (needs matplotlib)",
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--spawn-server",
        action="store_true",
        help="start the server with --server-config, pinned to --server-cpu; stop it at the end",
    )
    s.add_argument(
        "--server-config",
        default=str(common.DEFAULT_CONFIG),
        help="config for --spawn-server (default bench/bench.toml)",
    )
    s.add_argument("--server-cpu", default="0", help="CPU list for the spawned server (default 0)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Load tests for imserver.")
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, (module, help_text) in SCENARIOS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        _common_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    module, _ = SCENARIOS[args.scenario]
    try:
        return int(module.run(args))
    except common.BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
