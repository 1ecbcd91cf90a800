"""``--plot``: one PNG per run, next to the JSON results (matplotlib, headless Agg).

matplotlib is imported only when a plot is asked for, so the bench runs
without it; ``--plot`` without matplotlib installed is refused before the run
starts (:func:`require`). Each scenario hands :func:`write` a list of panels:

* ``("cdf", title, {label: samples_ms})``: latency CDFs on a log x axis,
  p50/p99 marked;
* ``("series", title, ylabel, {label: (xs, ys)})``: lines over time (or over
  any x, e.g. connections).
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, BenchError

Panel = tuple[Any, ...]


def require() -> None:
    """Refuse ``--plot`` early when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: pip install 'matplotlib>=3.9,<4' (the bench extra)"
        ) from None


def png_path(json_path: str | None, bench: str, date: str) -> Path:
    """``<dir of --json>/<bench>-<UTC date and time>.png`` (bench/results/ without --json)."""
    folder = Path(json_path).resolve().parent if json_path else BENCH_DIR / "results"
    try:
        stamp = datetime.datetime.fromisoformat(date).strftime("%Y%m%dT%H%M%SZ")
    except ValueError:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return folder / f"{bench}-{stamp}.png"


def _ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def _cdf(ax: Any, title: str, series: dict[str, Sequence[float]]) -> None:
    drawn = False
    for label, samples in series.items():
        s = sorted(x for x in samples if x is not None)
        n = len(s)
        if not n:
            continue
        # At most ~2,000 points per curve: quantiles, not every sample.
        step = max(1, n // 2000)
        xs = [max(s[i], 1e-3) for i in range(0, n, step)] + [max(s[-1], 1e-3)]
        ys = [i / n for i in range(0, n, step)] + [1.0]
        p50 = s[min(n - 1, math.ceil(0.5 * n) - 1)]
        p99 = s[min(n - 1, math.ceil(0.99 * n) - 1)]
        label = f"{label}: p50 {_ms(p50)}, p99 {_ms(p99)} ms (n={n:,})"
        ax.step(xs, ys, where="post", label=label)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("fraction of samples")
    if drawn:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", lw=0.3)


def _series(
    ax: Any, title: str, ylabel: str, series: dict[str, tuple[Sequence[float], Sequence[float]]]
) -> None:
    drawn = False
    for label, (xs, ys) in series.items():
        if len(xs):
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 60 else None)
            drawn = True
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if drawn and len(series) > 1:
        ax.legend(fontsize=8)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, lw=0.3)


def write(
    path: Path, suptitle: str, panels: list[Panel], xlabels: dict[int, str] | None = None
) -> Path:
    """Draw ``panels`` one under the other into ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for i, panel in enumerate(panels):
        ax = axes[i][0]
        if panel[0] == "cdf":
            _cdf(ax, panel[1], panel[2])
        else:
            _series(ax, panel[1], panel[2], panel[3])
            ax.set_xlabel((xlabels or {}).get(i, "seconds since start"))
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_run(
    json_path: str | None,
    bench: str,
    result: dict[str, Any],
    title: str,
    panels: list[Panel],
    xlabels: dict[int, str] | None = None,
) -> Path:
    """A run's ``--plot``: the PNG at :func:`png_path`, ``title`` over :func:`subtitle`.

    ``title`` ends with a newline. Prints where the plot went (stderr) and
    returns the path.
    """
    path = write(
        png_path(json_path, bench, result["date"]), title + subtitle(result), panels, xlabels
    )
    print(f"bench: plot written to {path}", file=sys.stderr)
    return path


def subtitle(result: dict[str, Any]) -> str:
    """Second title line: machine, date, commit, contention."""
    dirty = "+dirty" if result.get("git_dirty") else ""
    cont = ", CONTENDED" if result.get("cpu_contended") else ""
    return (
        f"{result.get('cpu_model')} x{result.get('nproc')}, {result.get('date')}, "
        f"commit {result.get('git_commit')}{dirty}{cont}"
    )


def ack_delivery_panels(
    ack_ms: Sequence[float],
    del_ms: Sequence[float],
    timeline: Sequence[tuple[float, float, float]],
) -> list[Panel]:
    """The send->ack / send->delivery latency CDF and the acked/delivered per second series.

    Shared by the message scenarios (pairs, fanout). ``timeline`` holds
    ``(seconds since start, acked/s, delivered/s)`` rows.
    """
    xs = [x[0] for x in timeline]
    return [
        (
            "cdf",
            "latency (scheduled or actual send -> ack / delivery), measured window",
            {"send->ack": ack_ms, "send->delivery": del_ms},
        ),
        (
            "series",
            "throughput over time (warmup, window, drain; per second)",
            "per second",
            {
                "acked/s": (xs, [x[1] for x in timeline]),
                "delivered/s": (xs, [x[2] for x in timeline]),
            },
        ),
    ]
