"""The cost-over-time chart: one bar per day, drawn as inline SVG (the page loads nothing from outside).

Each day of the window gets a bar of what its runs cost in batches and, behind it, a lighter bar
of what the same requests would have cost in real time, so the gap is the saving. Days without
runs stay empty. Every bar has a ``<title>`` (the browser's tooltip) with the day's figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from html import escape

from claude_batch.cli import money
from claude_batch.ops import DailyCost

WIDTH, HEIGHT = 720, 200
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 28


@dataclass(frozen=True)
class DayBar:
    """One day of the chart (the sums over the workloads in ``days``)."""

    day: date
    runs: int
    cost_usd: float
    realtime_cost_usd: float


def day_bars(days: Sequence[DailyCost], *, end: date, span: int) -> list[DayBar]:
    """``span`` days up to ``end`` (oldest first), each the sum of its ``DailyCost`` lines."""
    totals: dict[date, list[float]] = {}
    for line in days:
        runs, cost, realtime = totals.setdefault(line.day, [0, 0.0, 0.0])
        totals[line.day] = [runs + line.runs, cost + line.cost_usd, realtime + line.realtime_cost_usd]
    out = []
    for back in range(span - 1, -1, -1):
        day = end - timedelta(days=back)
        runs, cost, realtime = totals.get(day, [0, 0.0, 0.0])
        out.append(DayBar(day, int(runs), round(cost, 6), round(realtime, 6)))
    return out


def cost_chart_svg(bars: Sequence[DayBar], *, title: str) -> str:
    """The chart as an ``<svg>`` element (its text escaped; safe to put in the page as it is)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top_value = max([b.realtime_cost_usd for b in bars] + [b.cost_usd for b in bars] + [0.0])
    scale = _nice_ceiling(top_value)
    slot = plot_w / max(len(bars), 1)
    bar_w = max(slot * 0.7, 1.0)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'preserveAspectRatio="xMinYMin meet" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for fraction in (0.0, 0.5, 1.0):  # gridlines and their values
        y = TOP + plot_h * (1 - fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(money(scale * fraction))}</text>"
        )
    for index, bar in enumerate(bars):
        x = LEFT + index * slot + (slot - bar_w) / 2
        tip = escape(
            f"{bar.day.isoformat()}: {bar.runs} run(s), cost {money(bar.cost_usd)}, "
            f"real-time equivalent {money(bar.realtime_cost_usd)}, "
            f"saving {money(bar.realtime_cost_usd - bar.cost_usd)}"
        )
        parts.append(
            f'<g class="day" data-day="{bar.day.isoformat()}" data-cost="{bar.cost_usd:.6f}">'
            f"<title>{tip}</title>"
        )
        for css, value in (("realtime", bar.realtime_cost_usd), ("cost", bar.cost_usd)):
            if value > 0 and scale > 0:
                h = max(plot_h * value / scale, 1.0)
                parts.append(
                    f'<rect class="{css}" x="{x:.1f}" y="{TOP + plot_h - h:.1f}" '
                    f'width="{bar_w:.1f}" height="{h:.1f}"/>'
                )
        parts.append("</g>")
        if (len(bars) - 1 - index) % 7 == 0:  # a label a week, the last day's included
            parts.append(
                f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                f"{escape(bar.day.strftime('%b %d'))}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (the axis' top)."""
    if value <= 0:
        return 0.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power
