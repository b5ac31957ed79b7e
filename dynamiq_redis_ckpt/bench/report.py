"""Presenting results: one-line cell descriptions, the markdown tables, the pass/fail targets, and the chart."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from dynamiq_redis_ckpt.bench.targets import ORDER as COLUMNS

MISSING = "—"


def _ms(value: float) -> str:
    if value != value:  # nan
        return "nan"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _bytes(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def cell(entry: dict[str, Any], value: dict[str, Any] | None) -> str:
    """A metric's value for one column of the table."""
    if value is None:
        return MISSING
    if "error" in value:
        return "error"
    if "skipped" in value:
        return f"skipped ({value['skipped']})"
    if "na" in value:
        return "n/a"
    kind = entry["kind"]
    if kind == "latency":
        return f"{_ms(value['p50_ms'])} / {_ms(value['p99_ms'])}"
    if kind == "list":
        return _ms(value["p50_ms"])
    if kind == "bytes":
        text = _bytes(value["bytes"])
        if "blocks" in value:
            text += f" (blocks {_bytes(value['blocks'])})"
        return text
    if kind == "throughput":
        return f"{value['saves_per_s']:,.0f}" + (" (threads)" if value.get("mode") == "threads" else "")
    if kind == "overhead":
        return _ms(value["per_node_ms"])
    return str(value)


def describe(entry: dict[str, Any], value: dict[str, Any]) -> str:
    """A progress line for one measured cell."""
    kind = entry["kind"]
    if "skipped" in value:
        return f"skipped ({value['skipped']})"
    if "na" in value:
        return f"n/a ({value['na']})"
    if kind == "latency":
        return f"p50 {_ms(value['p50_ms'])} ms  p99 {_ms(value['p99_ms'])} ms  (n={value['n']})"
    if kind == "list":
        return f"p50 {_ms(value['p50_ms'])} ms  (n={value['n']}; fill {value.get('fill_seconds', 0):.1f} s)"
    if kind == "bytes":
        extra = ", ".join(f"{k} {v:,}" for k, v in value.items() if k not in ("bytes", "measure"))
        return f"{value['bytes']:,} B ({value['measure']}{'; ' + extra if extra else ''})"
    if kind == "throughput":
        return f"{value['saves_per_s']:,.0f} saves/s ({value['mode']})"
    if kind == "overhead":
        return (f"{value['per_node_ms']:.3f} ms/node (median run {value['run_off_ms']:.1f} ms off, "
                f"{value['run_on_ms']:.1f} ms on, n={value['n']})")  # fmt: skip
    return str(value)


def headline(entry: dict[str, Any], value: dict[str, Any] | None) -> float | None:
    """The number a ratio or check uses: p50 ms, bytes, saves/s or ms per node; None when not measured."""
    if not value or "error" in value or "skipped" in value or "na" in value:
        return None
    return {
        "latency": value.get("p50_ms"), "list": value.get("p50_ms"), "bytes": value.get("bytes"),
        "throughput": value.get("saves_per_s"), "overhead": value.get("per_node_ms"),
    }[entry["kind"]]  # fmt: skip


def ratio(entry: dict[str, Any], other: str, base: str = "redis") -> float | None:
    """How many times better ``base`` is than ``other`` on this metric (other/base, or base/other for saves/s)."""
    a, b = headline(entry, entry["values"].get(other)), headline(entry, entry["values"].get(base))
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return b / a if entry["kind"] == "throughput" else a / b


def floor_ratio(entry: dict[str, Any]) -> float | None:
    """How many times the raw SET of the same bytes our p50 save takes (None without a usable floor)."""
    raw, ours = entry.get("raw_set"), headline(entry, entry["values"].get("redis"))
    if not raw or "error" in raw or ours is None or raw["p50_ms"] <= 0:
        return None
    return ours / raw["p50_ms"]


def _x(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}×" if value < 10 else f"{value:,.1f}×"


def _metric(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((m for m in results.get("metrics", []) if m["key"] == key), None)


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets the backend is meant to meet, each with its measured ratio and whether it is met (None: n/a)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, ok: Callable[[float], bool], shown: str | None = None) -> None:
        out.append({"check": name, "ratio": value, "shown": shown or _x(value),
                    "ok": None if value is None else bool(ok(value))})  # fmt: skip

    def faster(key: str, other: str, at_least: float, what: str) -> None:
        m = _metric(results, key)
        add(f"{what} ≥ {at_least:g}× faster than {other}", ratio(m, other) if m else None, lambda r: r >= at_least)

    for other in ("postgresql", "filesystem"):
        faster("save_first_10", other, 4, "save p50 (first, 10 nodes)")
    for other in ("postgresql", "filesystem"):
        faster("incr_10", other, 10, "incremental APPEND save p50 (10 nodes)")
    faster("load_10", "postgresql", 2, "load p50 (10 nodes)")

    lists = sorted((m for m in results.get("metrics", []) if m["kind"] == "list"), key=lambda m: int(m["key"][5:]))
    if lists:
        low, high = lists[0], lists[-1]
        a, b = headline(low, low["values"].get("redis")), headline(high, high["values"].get("redis"))
        n_low, n_high = int(low["key"][5:]), int(high["key"][5:])
        flat = b / a if a and b and high is not low else None
        name = f"at {n_high:,} / at {n_low:,}" if high is not low else "at largest / at smallest list size"
        add(f"list newest 10: redis p50 {name} ≤ 1.5", flat, lambda r: r <= 1.5,
            f"{flat:.2f}" if flat is not None else None)
    m10k = _metric(results, "list_10000")
    faster_fs = ratio(m10k, "filesystem") if m10k else None
    add("list newest 10 at 10,000: redis ≥ 20× faster than filesystem", faster_fs, lambda r: r >= 20)

    mb = _metric(results, "bytes_20")
    share = None
    if mb:
        r, p = headline(mb, mb["values"].get("redis")), headline(mb, mb["values"].get("postgresql"))
        share = r / p if r is not None and p else None
    add("bytes per 20-node APPEND run: redis ≤ 5% of postgresql", share, lambda s: s <= 0.05,
        f"{share * 100:.1f}%" if share is not None else None)

    for key, what, limit in (("incr_10", "incremental APPEND save p50 (10 nodes)", 3),
                             ("save_first_10", "save p50 (first, 10 nodes)", 5), ("load_10", "load p50 (10 nodes)", 3)):
        m = _metric(results, key)
        op = ((m or {}).get("raw_set") or {}).get("op", "SET")
        add(f"{what} within {limit}× of a raw {op} of its bytes", floor_ratio(m) if m else None, lambda f: f <= limit)
    out += cost_checks(results.get("cost") or {})
    return out


def cost_checks(cost: dict[str, Any]) -> list[dict[str, Any]]:
    """The cost targets: growth of a save with what did not change, and Redis CPU per operation."""
    out = []
    growth = cost.get("growth") or {}
    for key, what in (("agent_loop", "agent loop iteration"), ("chain_50", "50-node chain node")):
        side = growth.get(key)
        value = side.get("ratio") if side else None
        at = side["at"] if side else ("?", "?")
        out.append({"check": f"incremental save p50: {what} {at[1]} within 1.3× of {at[0]}", "ratio": value,
                    "shown": f"{value:.2f}×" if value is not None else MISSING,
                    "ok": None if value is None else value <= 1.3})  # fmt: skip
    cpu = cost.get("redis_cpu") or {}
    for key, what, limit in (("save_incremental", "incremental save", 30), ("load_cold", "cold load (10 nodes)", 40)):
        row = cpu.get(key)
        value = row.get("commandstats_us") if row else None
        out.append({"check": f"Redis CPU per {what} ≤ {limit} µs (commandstats)", "ratio": value,
                    "shown": f"{value:.1f} µs" if value is not None else MISSING,
                    "ok": None if value is None else value <= limit})  # fmt: skip
    return out


def cost_markdown(cost: dict[str, Any]) -> list[str]:
    """The cost section: growth, Redis CPU per operation, and one shard's saturation."""
    if not cost:
        return []
    lines = ["", "## Cost", ""]
    growth = cost.get("growth") or {}
    if "error" in growth:
        lines.append(f"Growth: failed ({growth['error']}).")
    elif growth:
        lines += ["How an incremental save's p50 grows with what did not change (same runs, leases on):", "",
                  "| workload | p50 at | p50 at | ratio |", "|---|---:|---:|---:|"]  # fmt: skip
        for key, what in (("agent_loop", "agent loop, iteration"), ("chain_50", "50-node chain, node")):
            side = growth[key]
            lines.append(f"| {what} | {side['at'][0]}: {_ms(side['small']['p50_ms'])} ms | {side['at'][1]}: "
                         f"{_ms(side['large']['p50_ms'])} ms | {side['ratio']:.2f}× |")
    cpu = cost.get("redis_cpu") or {}
    if "error" in cpu:
        lines += ["", f"Redis CPU: failed ({cpu['error']})."]
    elif cpu:
        lines += ["", "Redis CPU per operation (10-node checkpoints, leases on): `INFO commandstats` (scripts, the "
                  "commands inside them included, plus the commands sent outside scripts) and the main thread's CPU "
                  "(`INFO cpu`: parsing, replies, networking too); commands sent per operation:", "",
                  "| operation | commandstats µs | of which scripts | main thread µs | commands sent |",
                  "|---|---:|---:|---:|---|"]  # fmt: skip
        for key, what in (("save_incremental", "incremental save"), ("save_first", "first save"),
                          ("load_cold", "cold load")):  # fmt: skip
            row = cpu.get(key)
            if row:
                sent = ", ".join(f"{k} {v:g}" for k, v in row["sent_per_op"].items())
                lines.append(f"| {what} | {row['commandstats_us']:.1f} | {row['script_us']:.1f} | "
                             f"{row['main_thread_us']:.1f} | {sent} |")
    sat = cost.get("saturation")
    if isinstance(sat, dict) and "error" in sat:
        lines += ["", f"Saturation: failed ({sat['error']})."]
    elif sat:
        lines += ["", "One Redis shard, N client processes saving APPEND chains (the clients share the machine's "
                  "cores with the server):", "",
                  "| clients | saves/s | Redis main thread busy | Redis µs per save | shard ceiling, saves/s |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in sat:
            per = row.get("server_us_per_save")
            ceiling = row.get("shard_ceiling_saves_per_s")
            lines.append(f"| {row['clients']} | {row['saves_per_s']:,.0f} | {row['server_busy']:.0%} | "
                         f"{per:.1f} | {ceiling:,.0f} |" if per else f"| {row['clients']} | 0 | — | — | — |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The results and targets tables, with the machine and the notes, as markdown."""
    targets = [c for c in COLUMNS if c in results.get("targets", [])]
    m = results.get("machine", {})
    lines = [
        "# dynamiq-redis-ckpt benchmark",
        "",
        f"{m.get('date', '')} · {m.get('cpu', '?')} · {m.get('cores', '?')} cores · Python {m.get('python', '?')}"
        f" · dynamiq {m.get('dynamiq', '?')} · redis-server {m.get('redis_server') or MISSING}"
        f" · PostgreSQL {m.get('postgresql_server') or MISSING} · wall time {results.get('wall_seconds', 0):.0f} s"
        + (f" · CPU busy with other work before start {m['cpu_busy_before_start']:.0%}"
           if m.get("cpu_busy_before_start") is not None else ""),
        "",
        "Latency cells: p50 / p99 in ms; list rows: p50 ms; throughput: saves/s (total over all clients); "
        "overhead: ms per node. Ratio columns: how many times better redis is (other / redis; "
        "for throughput rows † redis / other).",
        "",
    ]
    header = ["metric"] + list(COLUMNS) + ["raw SET / GET", "PG / redis", "FS / redis", "redis / raw"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for entry in results.get("metrics", []):
        row = [entry["label"] + (" †" if entry["kind"] == "throughput" else "")]
        for t in COLUMNS:
            row.append(cell(entry, entry["values"].get(t)) if t in targets else MISSING)
        raw = entry.get("raw_set")
        row.append((cell(entry, raw) + (" (GET)" if raw.get("op") == "GET" else "")) if raw else MISSING)
        row.append(_x(ratio(entry, "postgresql")))
        row.append(_x(ratio(entry, "filesystem")))
        row.append(_x(floor_ratio(entry)))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Targets", "", "| check | measured | met |", "|---|---:|:---:|"]
    for c in results.get("checks", []):
        met = "n/a" if c["ok"] is None else ("✅" if c["ok"] else "❌")
        lines.append(f"| {c['check']} | {c['shown'] if c['ok'] is not None else 'n/a'} | {met} |")
    lines += cost_markdown(results.get("cost") or {})
    ctx = results.get("context", {})
    if ctx:
        lines += ["", "Context: " + "; ".join(f"{k}: {v:,}" for k, v in ctx.items()) + "."]
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: str) -> None:
    """Grouped bars of p50 latency (log scale, ms) per operation and backend, raw SET included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [c for c in COLUMNS if c in results.get("targets", [])] + ["raw SET"]
    entries = [e for e in results.get("metrics", []) if e["kind"] in ("latency", "list")]
    labels = [e["label"].replace("save, ", "save ").replace(" APPEND", "") for e in entries]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(entries) + 3), 6.5))
    colors = {"redis": "#d62728", "inmemory": "#7f7f7f", "filesystem": "#2ca02c", "postgresql": "#1f77b4",
              "raw SET": "#ff9896"}  # fmt: skip
    for i, name in enumerate(series):
        xs, ys = [], []
        for j, e in enumerate(entries):
            value = e.get("raw_set") if name == "raw SET" else e["values"].get(name)
            y = headline(e, value)
            if y is not None and y > 0:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(y)
        ax.bar(xs, ys, width, label="raw SET / GET (floor)" if name == "raw SET" else name, color=colors.get(name))
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency, ms (log scale)")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend()
    m = results.get("machine", {})
    ax.set_title(f"Checkpoint backends, p50 per operation ({m.get('cpu', '')}, {m.get('cores', '?')} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict[str, Any], text: str, out_dir: str, *, draw_chart: bool = True,
          say: Callable[[str], None] = print) -> list[str]:
    """Write results.md, results.json and (unless disabled, or matplotlib is missing) chart.png; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")]
    with open(paths[0], "w") as f:
        f.write(text)
    with open(paths[1], "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    if draw_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            say("matplotlib is not installed: chart.png was not drawn (pip install matplotlib to get it)")
        else:
            chart(results, os.path.join(out_dir, "chart.png"))
            paths.append(os.path.join(out_dir, "chart.png"))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
