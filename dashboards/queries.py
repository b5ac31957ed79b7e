"""Run a dashboard's queries the way Grafana does, against Prometheus's HTTP API (standard library only).

Grafana expands ``$__interval`` (the step: the time range over the panel's data points, never below the scrape
interval), ``$__rate_interval`` (``max($__interval + scrape, 4 * scrape)``), ``$__range`` (the whole time range) and
the template variables before it sends a query; :func:`expand` does the same, so the test and the renderer run exactly
the queries an operator's Grafana runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from urllib.parse import urlencode
from urllib.request import urlopen

MAX_DATA_POINTS = 120  # a panel's default resolution here (Grafana uses the panel's width in pixels)


class PrometheusError(AssertionError):
    """A query Prometheus refused (bad PromQL) or could not run."""


class PrometheusAPI:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>; the ``data`` of a success, else :class:`PrometheusError` with Prometheus's words."""
        url = f"{self.url}/api/v1/{path}?{urlencode(params, doseq=True)}"
        try:
            with urlopen(url, timeout=30) as response:
                body = json.load(response)
        except OSError as e:  # an HTTPError (400 bad_data, 422 execution) carries Prometheus's JSON error too
            try:
                body = json.load(e)  # type: ignore[arg-type]
            except Exception:
                raise PrometheusError(f"{path} {params}: {e}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"{params.get('query', path)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        """An instant query at ``at``: the vector's samples (``metric``, ``value``)."""
        return self.api("query", query=expr, time=f"{at:.3f}")["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """A range query: one row (``metric``, ``values``) per series."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` variable query lists."""
        return self.api(f"label/{label}/values", **{"match[]": match})


def intervals(start: float, end: float, scrape_seconds: float, max_data_points: int = MAX_DATA_POINTS) -> dict:
    """Grafana's built-in variables for a time range (whole seconds, as PromQL durations)."""
    step = max(math.ceil(scrape_seconds), math.ceil((end - start) / max_data_points))
    return {
        "__interval": step,
        "__rate_interval": max(step + math.ceil(scrape_seconds), 4 * math.ceil(scrape_seconds)),
        "__range": max(1, math.ceil(end - start)),
    }


def expand(expr: str, variables: dict) -> str:
    """Substitute ``$name`` / ``${name}`` (longest names first, so ``$__rate_interval`` is not ``$__r...``)."""
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        text = f"{value}s" if isinstance(value, (int, float)) else str(value)
        expr = expr.replace("${" + name + "}", text)
        expr = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _: text, expr)
    if "$" in expr:
        raise ValueError(f"unexpanded variable in {expr!r}")
    return expr


@dataclass
class Result:
    panel: str
    ref: str
    expr: str  # as sent
    legend: str
    instant: bool
    series: list[dict]  # Prometheus's result rows

    def finite(self) -> int:
        """How many samples are numbers (not NaN, not ±Inf): what a panel can draw."""
        rows = [[s["value"]] if self.instant else s["values"] for s in self.series]
        return sum(1 for row in rows for _, v in row if math.isfinite(float(v)))

    def peak(self) -> float:
        """The largest finite sample (0 when none)."""
        rows = [[s["value"]] if self.instant else s["values"] for s in self.series]
        return max((float(v) for row in rows for _, v in row if math.isfinite(float(v))), default=0.0)


def panels(dashboard: dict) -> list[dict]:
    """Every panel that queries, rows' collapsed panels included, in the dashboard's order."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def run_panel(api: PrometheusAPI, panel: dict, start: float, end: float, scrape_seconds: float,
              template: dict) -> list[Result]:  # fmt: skip
    """Run each of ``panel``'s targets as Grafana would over [start, end]: stat targets as instant queries at
    ``end``, the others as range queries with step ``$__interval``."""
    variables = intervals(start, end, scrape_seconds, panel.get("maxDataPoints", MAX_DATA_POINTS)) | template
    results = []
    for target in panel["targets"]:
        expr = expand(target["expr"], variables)
        instant = bool(target.get("instant")) and not target.get("range")
        if instant:
            series = api.query(expr, end)
        else:
            series = api.query_range(expr, start, end, variables["__interval"])
        legend = target.get("legendFormat", "")
        results.append(Result(panel["title"], target["refId"], expr, "" if legend == "__auto" else legend, instant,
                              series))  # fmt: skip
    return results


def legend(fmt: str, labels: dict) -> str:
    """Grafana's ``{{label}}`` legend format (the series' labels when there is none)."""
    if not fmt:
        shown = {k: v for k, v in labels.items() if k != "__name__"}
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items())) + "}" if shown else "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
