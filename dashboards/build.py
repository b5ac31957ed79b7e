"""The Grafana dashboard, defined once: ``python -m dashboards.build`` writes ``dashboards/dynamiq-redis-ckpt.json``.

Every panel and query is declared in :data:`ROWS`; the JSON an operator imports, the test that runs each query on a
real Prometheus (tests/test_dashboards.py) and the renderer of ``docs/dashboard.png`` (dashboards/render.py) all read
what this module produces. ``python -m dashboards.build --check`` fails when the JSON file is out of date.

Importable into any Grafana (9.x or later): the data source is the template variable ``datasource`` (any
Prometheus), and ``job`` narrows every query to the scrape jobs of one deployment. The dashboard's own uid is a stable
slug, so re-importing replaces it instead of making a copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dynamiq-redis-ckpt.json"
UID = "dynamiq-redis-ckpt"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job=~"$job"'


# ---- PromQL helpers: every query filters on $job ------------------------------------------------------------------


def sel(metric: str, matchers: str = "") -> str:
    """``metric{job=~"$job", <matchers>}``."""
    return f"{metric}{{{JOB}{', ' + matchers if matchers else ''}}}"


def rate(metric: str, matchers: str = "", by: str = "", window: str = "$__rate_interval", fn: str = "rate") -> str:
    """``sum [by (...)] (rate(metric{...}[window]))``."""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}({fn}({sel(metric, matchers)}[{window}]))"


def quantile(q: float, histogram: str, matchers: str = "", by: str = "", window: str = "$__rate_interval") -> str:
    """The ``q`` quantile of a histogram over ``window``, per ``by``."""
    keys = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({q}, sum by ({keys}) (rate({sel(histogram + '_bucket', matchers)}[{window}])))"


# ---- panels --------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    """One panel: ``kind`` is ``timeseries``, ``stat`` (one number per series, an instant query) or ``heatmap`` (a
    histogram's buckets over time)."""

    title: str
    kind: str
    targets: list[Target]
    description: str
    unit: str = "short"
    w: int = 8
    h: int = 8
    thresholds: list[tuple[float, str]] = field(default_factory=list)  # (from value, color) after green


def ts(title, targets, description, unit="short", w=8, h=8) -> Panel:
    return Panel(title, "timeseries", [Target(*t) for t in targets], description, unit, w, h)


def stat(title, expr, description, unit="short", w=3, h=4, legend="", thresholds=()) -> Panel:
    return Panel(title, "stat", [Target(expr, legend)], description, unit, w, h, list(thresholds))


def heatmap(title, histogram, matchers, description, unit="s", w=12, h=8) -> Panel:
    expr = f"sum by (le) (rate({sel(histogram + '_bucket', matchers)}[$__rate_interval]))"
    return Panel(title, "heatmap", [Target(expr, "{{le}}")], description, unit, w, h)


FLEET = "dynamiq_ckpt_fleet_runs"
OP = "dynamiq_ckpt_operation_duration_seconds"
RECOVERY = "dynamiq_ckpt_recovery_latency_seconds"

ROWS: list[tuple[str, list[Panel]]] = [
    ("Overview", [
        stat("Runs by state", f"max by (state) ({sel(FLEET)})",
             "Runs of the whole fleet by state, read from Redis by the workers (every worker reports the same fleet: "
             "max across them). leased: a live lease; orphaned: its lease ran out, waiting for a worker; scheduled: "
             "paused until a timer; due: its timer came or a person answered, waiting for a worker; dead: dead "
             "letters.",
             w=8, legend="{{state}}"),
        stat("Orphans waiting", "max(" + sel(FLEET, 'state="orphaned"') + ")",
             "Runs whose lease ran out and that no worker has claimed yet. Normally 0 or briefly a few.",
             thresholds=[(1, "orange"), (10, "red")]),
        stat("Oldest orphan", f"max({sel('dynamiq_ckpt_fleet_oldest_orphan_age_seconds')})",
             "How long the oldest unclaimed orphan has waited (0 when none). Above twice the lease ttl the workers "
             "do not keep up, or none runs.", unit="s", thresholds=[(30, "orange"), (60, "red")]),
        stat("Recovery latency p99", quantile(0.99, RECOVERY, window="$__range"),
             "99th percentile over the dashboard's time range of the time from an orphan's lease running out to the "
             "resumed run's first confirmed save: the number to set an SLO on.", unit="s",
             thresholds=[(30, "orange"), (60, "red")]),
        stat("Save p99", quantile(0.99, OP, 'operation="save"', window="$__range"),
             "99th percentile of a checkpoint save's client time (retries included) over the time range, all "
             "processes that save.", unit="s", thresholds=[(0.05, "orange"), (0.25, "red")]),
        stat("Fenced writes", rate("dynamiq_ckpt_fenced_writes_total", window="$__range", fn="increase"),
             "Saves of a running flow refused over the time range because another holder has the run's lease: a "
             "process that froze or lost Redis past its lease ttl while a worker took the run over.",
             w=2, thresholds=[(1, "orange")]),
        stat("Dead letters", "max(" + sel(FLEET, 'state="dead"') + ")",
             "Runs whose recovery failed --max-attempts times, waiting for an operator "
             "(dynamiq-redis-ckpt dead list | retry | drop).", w=2, thresholds=[(1, "red")]),
        ts("Runs by state", [(f"max by (state) ({sel(FLEET)})", "{{state}}")],
           "The fleet's runs by state over time (max across workers: each reports the whole fleet).", w=16),
        stat("Workers", f"count({sel('dynamiq_ckpt_build_info')})",
             "Worker processes Prometheus scrapes now.", w=4, thresholds=[]),
        stat("Fleet read", f"min({sel('dynamiq_ckpt_fleet_up')})",
             "1 when every worker's last read of the fleet reached Redis; 0 when one could not.", w=4),
    ]),
    ("Store", [
        heatmap("Save latency", OP, 'operation="save"',
                "Client time of each checkpoint save (retries included), by histogram bucket: 50 µs to 5 s."),
        heatmap("Load latency", OP, 'operation="load"',
                "Client time of each checkpoint load (retries included), by histogram bucket: 50 µs to 5 s."),
        ts("Latency by operation", [
            (quantile(0.99, OP, by="operation"), "p99 {{operation}}"),
            (quantile(0.5, OP, by="operation"), "p50 {{operation}}"),
        ], "p50 and p99 of every backend call: save, load, list, delete, cleanup.", unit="s"),
        ts("Checkpoint size", [
            (quantile(0.99, "dynamiq_ckpt_checkpoint_encoded_bytes"), "encoded p99"),
            (quantile(0.5, "dynamiq_ckpt_checkpoint_encoded_bytes"), "encoded p50"),
            (quantile(0.99, "dynamiq_ckpt_save_added_bytes"), "added to Redis p99"),
            (quantile(0.5, "dynamiq_ckpt_save_added_bytes"), "added to Redis p50"),
        ], "A saved checkpoint's msgpack size before dedup and compression (encoded), and the compressed bytes one "
           "save actually added to Redis (new content only).", unit="bytes"),
        ts("Compression ratio", [
            (rate("dynamiq_ckpt_content_bytes_total", 'stage="raw"') + " / "
             + rate("dynamiq_ckpt_content_bytes_total", 'stage="compressed"'), "raw / compressed"),
        ], "New content the saves stored, its size before zstd over its size after."),
        ts("Saves by outcome", [(rate("dynamiq_ckpt_saves_total", by="outcome"), "{{outcome}}")],
           "Saves per second by how they ended: ok, error, fenced (another holder has the lease), too_large, "
           "not_found.", unit="ops", w=12),
        ts("Redis errors by kind", [
            (rate("dynamiq_ckpt_redis_errors_total", by="kind"), "{{kind}}"),
            (rate("dynamiq_ckpt_damaged_checkpoints_total"), "damaged checkpoints found"),
        ],
           "Every failed Redis request attempt per second, retried or not: timeout, connection, readonly (a "
           "failover), moved/ask (cluster redirections), noscript, wrongtype, auth, ... "
           "Damaged checkpoints found by loads and lists are counted too.", unit="ops", w=12),
    ]),
    ("Leases and recovery", [
        ts("Recovery latency", [
            (quantile(0.99, RECOVERY), "p99"),
            (quantile(0.5, RECOVERY), "p50"),
        ], "From the moment an orphan's lease ran out (Redis's clock) to the resumed run's first confirmed save.",
           unit="s"),
        ts("Claims by trigger and outcome", [
            (rate("dynamiq_ckpt_worker_claims_total", by="trigger, outcome"), "{{trigger}} {{outcome}}"),
        ], "Workers' claim attempts per second: won, lost_race (another worker got it), dead_lettered.", unit="ops"),
        ts("Resumes by trigger and outcome", [
            (rate("dynamiq_ckpt_resumes_total", by="trigger, outcome"), "{{trigger}} {{outcome}}"),
        ], "Resumed runs that returned, per second, by what woke them (orphan, timer, input) and how they ended.",
           unit="ops"),
        ts("Lease renewals by outcome", [
            (rate("dynamiq_ckpt_lease_renewals_total", by="outcome"), "{{outcome}}"),
        ], "Heartbeat renewals of held leases per second: ok, lost (someone else holds it now), error (Redis).",
           unit="ops"),
        ts("Leases lost by reason", [
            (rate("dynamiq_ckpt_leases_lost_total", by="reason"), "{{reason}}"),
        ], "Leases processes lost per second, by reason (expired, taken_over, handed_back, ...).", unit="ops"),
        ts("Leases held and runs resuming", [
            (f"sum({sel('dynamiq_ckpt_leases_held')})", "leases held"),
            (f"sum({sel('dynamiq_ckpt_runs_in_progress')})", "runs workers are resuming"),
        ], "Leases all processes hold now, and the runs the workers are resuming now."),
        ts("Fencing rejections", [(rate("dynamiq_ckpt_fenced_writes_total"), "fenced writes")],
           "Saves refused per second because another holder has the run's lease: the write that would have "
           "corrupted a run taken over by a worker.", unit="ops"),
        ts("Resume duration", [
            (quantile(0.99, "dynamiq_ckpt_resume_duration_seconds"), "p99"),
            (quantile(0.5, "dynamiq_ckpt_resume_duration_seconds"), "p50"),
        ], "From a worker's claim to the resumed run's end.", unit="s"),
        ts("Worker poll", [
            (quantile(0.99, "dynamiq_ckpt_worker_scan_duration_seconds", by="instance"), "scan p99 {{instance}}"),
            (f"time() - max by (instance) ({sel('dynamiq_ckpt_worker_last_scan_timestamp_seconds')} > 0)",
             "since last pass {{instance}}"),
        ], "Time one poll pass (find + claim) takes, and seconds since each worker last completed a pass (a stalled "
           "loop grows without bound; /healthz fails past --stall-seconds).", unit="s"),
    ]),
    ("Timers and people", [
        ts("Timer lag", [
            (quantile(0.99, "dynamiq_ckpt_timer_lag_seconds"), "p99"),
            (quantile(0.5, "dynamiq_ckpt_timer_lag_seconds"), "p50"),
        ], "From a timer's due time (or a person's answer) to the resumed run's first confirmed save.", unit="s",
           w=6),
        ts("Runs scheduled and due", [("max by (state) (" + sel(FLEET, 'state=~"scheduled|due"') + ")", "{{state}}")],
           "Runs paused until a timer (scheduled), and runs whose timer came or whose person answered, waiting for "
           "a worker (due).", w=6),
        ts("Human input wait", [
            (quantile(0.99, "dynamiq_ckpt_human_input_wait_seconds"), "p99"),
            (quantile(0.5, "dynamiq_ckpt_human_input_wait_seconds"), "p50"),
        ], "From a run's pause for a person to its claim after the answer.", unit="s", w=6),
        ts("Resumes after a timer or an answer", [
            (rate("dynamiq_ckpt_resumes_total", 'trigger=~"timer|input"', by="trigger, outcome"),
             "{{trigger}} {{outcome}}"),
        ], "Runs resumed because their timer came (timer) or a person answered (input), per second, by outcome.",
           unit="ops", w=6),
    ]),
    ("Dead letters", [
        ts("Dead letters", [("max(" + sel(FLEET, 'state="dead"') + ")", "dead letters")],
           "Runs waiting in dead letters for an operator: dynamiq-redis-ckpt dead list, then retry or drop."),
        ts("Runs moved to dead letters", [
            (rate("dynamiq_ckpt_dead_letters_total", fn="increase"), "moved"),
            (rate("dynamiq_ckpt_worker_claims_total", 'outcome="dead_lettered"', by="trigger", fn="increase"),
             "claims that dead-lettered ({{trigger}})"),
        ], "Runs the workers moved to dead letters in each interval: a claim found the run had failed "
           "--max-attempts recoveries."),
        ts("Failed recoveries", [
            (rate("dynamiq_ckpt_resumes_total", 'outcome!="success"', by="trigger, outcome", fn="increase"),
             "{{trigger}} {{outcome}}"),
        ], "Resumed runs that did not succeed, in each interval: error (the resume raised; retried after a "
           "back-off, then dead-lettered), failure (the flow failed), lease_lost, handed_back, canceled."),
    ]),
]


# ---- Grafana JSON --------------------------------------------------------------------------------------------------


def _thresholds(panel: Panel) -> dict:
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in panel.thresholds]
    return {"mode": "absolute", "steps": steps}


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    targets = [
        {"datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend or "__auto", "refId": chr(ord("A") + i),
         "range": panel.kind != "stat", "instant": panel.kind == "stat",
         **({"format": "heatmap"} if panel.kind == "heatmap" else {})}
        for i, t in enumerate(panel.targets)
    ]  # fmt: skip
    out = {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": panel.h, "w": panel.w, "x": x, "y": y}, "targets": targets,
    }  # fmt: skip
    if panel.kind == "timeseries":
        custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False}
        out["fieldConfig"] = {"defaults": {"unit": panel.unit, "min": 0, "custom": custom}, "overrides": []}
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
    elif panel.kind == "stat":
        out["fieldConfig"] = {"defaults": {"unit": panel.unit, "thresholds": _thresholds(panel),
                                           "color": {"mode": "thresholds"}}, "overrides": []}  # fmt: skip
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
                          "textMode": "value_and_name" if panel.targets[0].legend else "value"}  # fmt: skip
    elif panel.kind == "heatmap":
        out["maxDataPoints"] = 60
        out["fieldConfig"] = {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []}
        out["options"] = {
            "calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": panel.unit},
            "rowsFrame": {"layout": "auto"}, "filterValues": {"le": 1e-9}, "showValue": "never",
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5, "steps": 64,
                      "fill": "dark-orange", "reverse": False},
            "cellValues": {"unit": "ops"}, "tooltip": {"show": True, "yHistogram": True}, "legend": {"show": True},
        }  # fmt: skip
    return out


def _place(panels: list[Panel], top: int) -> list[tuple[int, int]]:
    """Grafana's gravity: each panel at the highest, then leftmost, free spot of the row."""
    heights = [top] * 24
    spots = []
    for p in panels:
        y, x = min((max(heights[x : x + p.w]), x) for x in range(0, 25 - p.w))
        heights[x : x + p.w] = [y + p.h] * p.w
        spots.append((x, y))
    return spots


def dashboard() -> dict:
    """The dashboard as Grafana's JSON model."""
    panels, pid, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        pid, y = pid + 1, y + 1
        spots = _place(row, y)
        for panel, (x, py) in zip(row, spots):
            panels.append(_panel_json(panel, pid, x, py))
            pid += 1
        y = max(py + p.h for p, (_, py) in zip(row, spots))
    kinds = sorted({p.kind for _, row in ROWS for p in row})
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.1.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": k, "name": k, "version": ""} for k in kinds),
        ],
        "uid": UID, "title": "Dynamiq Redis checkpoints", "description": "Checkpoint store, leases, recovery "
        "workers, timers and dead letters of dynamiq-redis-ckpt.", "tags": ["dynamiq", "redis", "checkpoints"],
        "editable": True, "graphTooltip": 1, "refresh": "30s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-3h", "to": "now"}, "timezone": "", "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
             "regex": ""},
            {"name": "job", "label": "Job", "type": "query", "datasource": DATASOURCE,
             "definition": "label_values(dynamiq_ckpt_leases_held, job)",
             "query": {"query": "label_values(dynamiq_ckpt_leases_held, job)", "refId": "job"},
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0, "includeAll": True,
             "allValue": ".+", "multi": True, "options": [], "refresh": 2, "regex": "", "sort": 1},
        ]},
        "panels": panels,
    }  # fmt: skip


def render_json() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the JSON file differs from this module")
    args = parser.parse_args(argv)
    if args.check:
        if not OUT.exists() or OUT.read_text() != render_json():
            print(f"{OUT} is out of date: run python -m dashboards.build", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render_json())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
