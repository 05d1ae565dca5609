"""Spend charts as SVG written on the server: no script draws them, so they obey the console's
Content-Security-Policy and read the same in every browser. Each chart names itself and sums up
its data in ``<title>`` and ``<desc>`` (what a screen reader announces), each bar carries its
own title, and the page shows the same numbers in a table beside it.

Colours are CSS classes (``console.css``): an SVG presentation attribute is not a style
attribute, but classes keep every colour, and its contrast, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

from broker.console.render import money

DAY = 86_400
_WIDTH, _HEIGHT = 640, 180
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 8, 12, 28


@dataclass(frozen=True)
class Series:
    """Spend per day (UTC), oldest first: ``(day start, micro-dollars)``."""

    days: list[tuple[int, int]]
    # A daily budget's limit, drawn as a line across the bars.
    daily_limit: int | None = None

    @property
    def total(self) -> int:
        return sum(micros for _day, micros in self.days)


def day_label(day: int) -> str:
    return datetime.fromtimestamp(day, UTC).strftime("%Y-%m-%d")


def _short(day: int) -> str:
    return datetime.fromtimestamp(day, UTC).strftime("%m-%d")


def describe(series: Series) -> str:
    """The chart in one sentence: its range, total and busiest day."""
    if not series.days:
        return "No days to show."
    first, last = day_label(series.days[0][0]), day_label(series.days[-1][0])
    text = f"Spend per day from {first} to {last}: {money(series.total)} in total"
    peak_day, peak = max(series.days, key=lambda d: (d[1], d[0]))
    text += f", most on {day_label(peak_day)} ({money(peak)})." if peak > 0 else ", nothing spent."
    if series.daily_limit is not None:
        text += f" The daily budget is {money(series.daily_limit)}."
    return text


def bar_chart(chart_id: str, title: str, series: Series) -> Markup:
    """An SVG bar chart of ``series``; ``chart_id`` must be unique on the page (it ties the
    chart to its title and description)."""
    top = max([m for _d, m in series.days] + [series.daily_limit or 0, 1])
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    n = max(1, len(series.days))
    step = plot_w / n
    bar_w = max(1.0, step * 0.7)
    cid = escape(chart_id)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-labelledby="{cid}-t {cid}-d" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{cid}-t">{escape(title)}</title>',
        f'<desc id="{cid}-d">{escape(describe(series))}</desc>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_WIDTH - _RIGHT}" '
        f'y2="{_TOP + plot_h}"/>',
        f'<text class="tick" x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">'
        f'{escape(money(top))}</text>',
        f'<text class="tick" x="{_LEFT - 6}" y="{_TOP + plot_h}" text-anchor="end">$0</text>',
    ]
    for i, (day, micros) in enumerate(series.days):
        h = plot_h * micros / top if micros > 0 else 0.0
        # A day with some spend shows at least a sliver: "little" must not read as "none".
        if micros > 0:
            h = max(h, 1.5)
        x = _LEFT + i * step + (step - bar_w) / 2
        y = _TOP + plot_h - h
        label = f"{day_label(day)}: {money(micros)}"
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                     f'height="{h:.1f}"><title>{escape(label)}</title></rect>')
        if i % max(1, n // 7) == 0 or i == n - 1:
            parts.append(f'<text class="tick" x="{x + bar_w / 2:.1f}" y="{_HEIGHT - 8}" '
                         f'text-anchor="middle">{escape(_short(day))}</text>')
    if series.daily_limit is not None:
        y = _TOP + plot_h - plot_h * series.daily_limit / top
        parts.append(f'<line class="limit" x1="{_LEFT}" y1="{y:.1f}" x2="{_WIDTH - _RIGHT}" '
                     f'y2="{y:.1f}"/>')
        parts.append(f'<text class="limit-label" x="{_WIDTH - _RIGHT - 2}" y="{y - 4:.1f}" '
                     f'text-anchor="end">daily budget {escape(money(series.daily_limit))}</text>')
    parts.append("</svg>")
    # Every value written above was escaped or is a number formatted here.
    return Markup("".join(parts))  # noqa: S704
