"""Draw the dashboard from a real Prometheus's data into one PNG, laid out as Grafana lays it out.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 --minutes 30 --out docs/dashboard.png

No Grafana server is needed: every panel of ``dashboards/dynamiq-redis-ckpt.json`` runs its queries the way Grafana
runs them (:mod:`dashboards.queries`) and is drawn on the panel's grid position; time series as lines, stat panels
as big numbers coloured by their thresholds, heatmaps as heatmaps of the histogram's buckets. ``docs/dashboard.png``
comes from the test that proves the dashboard (tests/test_dashboards.py, with ``DYNAMIQ_CKPT_DASHBOARD_PNG`` set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from dashboards.queries import PrometheusAPI, Result, legend, run_panel  # noqa: E402

JSON = Path(__file__).resolve().parent / "dynamiq-redis-ckpt.json"
BG, PANEL_BG, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#d8d9da", "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
           "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477"]  # Grafana's classic palette
COLORS = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c", "yellow": "#fade2a", "blue": "#5794f2"}
COL_IN, ROW_IN = 0.8, 0.36  # inches of a grid column (1/24 of the width) and of a grid row (Grafana's 30 px + gap)


# ---- units ---------------------------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    """A value as Grafana shows it in ``unit`` (s, bytes, ops, short)."""
    if value is None or not math.isfinite(value):
        return "NaN" if value is not None and math.isnan(value) else "-"
    a = abs(value)
    if unit == "s":
        if a == 0:
            return "0 s"
        for limit, div, name in ((1e-3, 1e-6, "µs"), (1, 1e-3, "ms"), (120, 1, "s"), (7200, 60, "min")):
            if a < limit:
                return f"{value / div:.3g} {name}"
        return f"{value / 3600:.3g} h"
    if unit == "bytes":
        for name in ("B", "KiB", "MiB", "GiB"):
            if a < 1024 or name == "GiB":
                return f"{value:.3g} {name}"
            value, a = value / 1024, a / 1024
    if unit == "ops":
        return f"{value:.3g} ops/s"
    return f"{value:.3g}" if a < 1e4 or a != int(a) else f"{int(value)}"


def axis_fmt(unit: str) -> FuncFormatter:
    return FuncFormatter(lambda v, _: fmt(v, unit).replace(" ops/s", "/s"))


# ---- panels --------------------------------------------------------------------------------------------------------


def _title(ax, panel: dict) -> None:
    ax.set_title(panel["title"], loc="left", color=TEXT, fontsize=10, fontweight="bold", pad=6)


def _frame(ax) -> None:
    ax.set_facecolor(PANEL_BG)
    for side in ax.spines.values():
        side.set_color(BORDER)
    ax.tick_params(colors=MUTED, labelsize=7.5)
    ax.grid(True, color=BORDER, linewidth=0.6)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "No data", color=MUTED, ha="center", va="center", fontsize=12, transform=ax.transAxes)
    ax.set_xticks([]), ax.set_yticks([])
    ax.grid(False)


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts)


def draw_timeseries(ax, panel: dict, results: list[Result], span: tuple[float, float]) -> None:
    _frame(ax)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    drawn = []  # (label, xs, ys) of every series with a number to draw
    for result in results:
        for series in sorted(result.series, key=lambda s: legend(result.legend, s["metric"])):
            xs = [_when(t) for t, _ in series["values"]]
            ys = [float(v) if math.isfinite(float(v)) else math.nan for _, v in series["values"]]
            if any(math.isfinite(y) for y in ys):
                drawn.append((legend(result.legend, series["metric"]), xs, ys))
    # Many series (errors by kind, ...): the legend names those that moved; the flat zeros are one grey line.
    quiet = [d for d in drawn if all(not math.isfinite(y) or y == 0 for y in d[2])] if len(drawn) > 6 else []
    lines = 0
    for label, xs, ys in drawn:
        if any(q[0] == label for q in quiet):
            continue
        ax.plot(xs, ys, color=PALETTE[lines % len(PALETTE)], linewidth=1.4, label=label)
        lines += 1
    if quiet:
        ax.plot(quiet[0][1], [0 if math.isfinite(y) else math.nan for y in quiet[0][2]], color=MUTED, linewidth=1,
                label=f"{len(quiet)} more at 0")  # fmt: skip
        lines += 1
    if not lines:
        _no_data(ax)
        return
    ax.set_xlim(_when(span[0]), _when(span[1]))
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(axis_fmt(unit))
    ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=3, fontsize=7, frameon=False, labelcolor=TEXT,
              handlelength=1.2, columnspacing=1.0)  # fmt: skip


def _color(panel: dict, value: float) -> str:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    color = "green"
    for step in steps:
        if step["value"] is None or (math.isfinite(value) and value >= step["value"]):
            color = step["color"]
    return COLORS.get(color, color)


def draw_stat(ax, panel: dict, results: list[Result], span: tuple[float, float]) -> None:
    ax.set_facecolor(PANEL_BG)
    ax.set_xticks([]), ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color(BORDER)
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    named = panel.get("options", {}).get("textMode") == "value_and_name"
    values = [(legend(r.legend, s["metric"]), float(s["value"][1])) for r in results for s in r.series]
    if not values:
        _no_data(ax)
        return
    values.sort(key=lambda nv: nv[0])
    n = len(values)
    size = 24 if n == 1 else max(11, 22 - 2 * n)
    for i, (name, value) in enumerate(values):
        x = (i + 0.5) / n
        ax.text(x, 0.45 if named else 0.42, fmt(value, unit), color=_color(panel, value), ha="center", va="center",
                fontsize=size, fontweight="bold", transform=ax.transAxes)  # fmt: skip
        if named:
            ax.text(x, 0.12, name, color=MUTED, ha="center", va="center", fontsize=8, transform=ax.transAxes)


def draw_heatmap(ax, panel: dict, results: list[Result], span: tuple[float, float]) -> None:
    """Buckets (de-accumulated from the cumulative ``le`` series, as Grafana's heatmap does) over time."""
    import numpy as np

    _frame(ax)
    ax.grid(False)
    series = [s for r in results for s in r.series]
    if not series:
        _no_data(ax)
        return
    les = sorted(series, key=lambda s: float(s["metric"]["le"]))
    times = sorted({t for s in les for t, _ in s["values"]})
    index = {t: i for i, t in enumerate(times)}
    cumulative = np.zeros((len(les), len(times)))
    for row, s in enumerate(les):
        for t, v in s["values"]:
            cumulative[row, index[t]] = float(v) if math.isfinite(float(v)) else 0.0
    counts = np.diff(cumulative, axis=0, prepend=0).clip(min=0)
    used = np.nonzero(counts.sum(axis=1) > 0)[0]
    if not len(used):
        _no_data(ax)
        return
    lo, hi = max(used[0] - 1, 0), min(used[-1] + 2, len(les))
    shown = counts[lo:hi]
    bounds = [float(s["metric"]["le"]) for s in les[lo:hi]]
    unit = panel.get("options", {}).get("yAxis", {}).get("unit", "s")
    xs = mdates.date2num([_when(t) for t in times])
    step = (xs[1] - xs[0]) if len(xs) > 1 else 1 / 86400
    edges_x = np.append(xs - step / 2, xs[-1] + step / 2)
    masked = np.ma.masked_where(shown <= 0, shown)
    cmap = plt.get_cmap("Oranges").with_extremes(bad=PANEL_BG)
    ax.pcolormesh(edges_x, np.arange(len(bounds) + 1), masked, cmap=cmap, shading="flat",
                  norm=matplotlib.colors.PowerNorm(0.5, vmin=0))  # fmt: skip
    ax.set_yticks(np.arange(len(bounds)) + 0.5)
    ax.set_yticklabels([("+Inf" if math.isinf(b) else fmt(b, unit)) for b in bounds], fontsize=7)
    ax.set_xlim(mdates.date2num(_when(span[0])), mdates.date2num(_when(span[1])))
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.xaxis.set_major_locator(MaxNLocator(5))


DRAW = {"timeseries": draw_timeseries, "stat": draw_stat, "heatmap": draw_heatmap}


# ---- the dashboard -------------------------------------------------------------------------------------------------


def render(dashboard: dict, api: PrometheusAPI, start: float, end: float, out: Path, *, scrape_seconds: float,
           template: dict | None = None, subtitle: str = "") -> dict[int, list[Result]]:  # fmt: skip
    """Query every panel over [start, end] and draw the whole dashboard into ``out``; returns the results by panel
    id (the test checks them)."""
    template = {"job": ".+", "datasource": "prometheus"} | (template or {})
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    header = 1.6  # grid rows for the dashboard's title
    height = bottom + header
    fig = plt.figure(figsize=(24 * COL_IN, height * ROW_IN), facecolor=BG)
    fig.text(0.005, 1 - 0.6 / height, dashboard["title"], color=TEXT, fontsize=16, fontweight="bold", va="center")
    period = f"{_when(start):%Y-%m-%d %H:%M:%S} to {_when(end):%H:%M:%S}"
    fig.text(0.995, 1 - 0.6 / height, f"{subtitle}   {period}   job=~{template['job']}".strip(), color=MUTED,
             fontsize=9, ha="right", va="center")  # fmt: skip
    results: dict[int, list[Result]] = {}

    def box(grid: dict, pad_top=0.0, pad_bottom=0.0, pad_left=0.0, pad_right=0.0):
        x, y, w, h = grid["x"], grid["y"] + header, grid["w"], grid["h"]
        left, right = (x + pad_left) / 24, (x + w - pad_right) / 24
        top, low = 1 - (y + pad_top) / height, 1 - (y + h - pad_bottom) / height
        return [left, low, right - left, top - low]

    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(grid["x"] / 24 + 0.004, 1 - (grid["y"] + header + 0.55) / height, panel["title"], color=TEXT,
                     fontsize=13, fontweight="bold", va="center")  # fmt: skip
            continue
        # the panel's card, then its plot inside it (room for the title, tick labels and the legend)
        card = fig.add_axes(box(grid, 0.08, 0.08, 0.04, 0.04))
        card.set_facecolor(PANEL_BG), card.set_xticks([]), card.set_yticks([])
        for side in card.spines.values():
            side.set_color(BORDER)
        card.set_zorder(0)
        try:
            results[panel["id"]] = found = run_panel(api, panel, start, end, scrape_seconds, template)
        except Exception as e:  # drawn as Grafana shows a failed query; the test fails on it anyway
            found = []
            card.text(0.5, 0.5, f"query error:\n{e}"[:300], color=COLORS["red"], ha="center", va="center",
                      fontsize=7, wrap=True, transform=card.transAxes)  # fmt: skip
        card.text(0.012, 0.985, panel["title"], color=TEXT, fontsize=9.5, fontweight="bold", ha="left", va="top",
                  transform=card.transAxes)  # fmt: skip
        if panel["type"] == "stat":
            inner = fig.add_axes(box(grid, 0.7, 0.15, 0.1, 0.1))
            for side in inner.spines.values():
                side.set_visible(False)
        elif panel["type"] == "timeseries":
            inner = fig.add_axes(box(grid, 0.8, 2.6, 1.05, 0.25))
        else:
            inner = fig.add_axes(box(grid, 0.8, 0.8, 1.05, 0.25))
        inner.set_zorder(1)
        if found or panel["type"] != "stat":
            DRAW[panel["type"]](inner, panel, found, (start, end))
        if panel["type"] == "stat":
            inner.set_facecolor(PANEL_BG)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the Grafana dashboard from a Prometheus's data into a PNG.")
    parser.add_argument("--prometheus", required=True, help="Prometheus base url, e.g. http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=60, help="time range ending now (default 60)")
    parser.add_argument("--scrape-interval", type=float, default=15, help="Prometheus's scrape interval, seconds")
    parser.add_argument("--job", default=".+", help="the job variable: a regex of scrape jobs (default all)")
    parser.add_argument("--dashboard", type=Path, default=JSON)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args(argv)
    end = time.time()
    render(json.loads(args.dashboard.read_text()), PrometheusAPI(args.prometheus), end - args.minutes * 60, end,
           args.out, scrape_seconds=args.scrape_interval, template={"job": args.job})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
