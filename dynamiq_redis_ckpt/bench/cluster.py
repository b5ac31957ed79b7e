"""``python3 -m dynamiq_redis_ckpt.bench.cluster --url redis+cluster://host:port``: how one flow spreads over a cluster.

For each bucket count (``--buckets``, default 1 and 16): saves ``--runs`` runs of one flow (``--steps`` APPEND
checkpoints each, the benchmark's agent-like content), then prints, per master, the keys it holds, the memory they
added, the save scripts it ran and the Redis CPU they cost (``INFO commandstats``), each as a share of the whole and
as its deviation from an even share; then the latency (p50, p99) of listing the flow's newest 10 checkpoints. Last,
a save's latency with and without ``replica_acks=1`` (``WAIT`` for one replica). Nothing is asserted: the numbers
are the result (docs/cluster.md keeps the latest). Each count uses its own prefix, deleted after.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Any

import redis

from dynamiq_redis_ckpt import CheckpointStoreError, RedisCheckpointBackend
from dynamiq_redis_ckpt.bench.measure import summary
from dynamiq_redis_ckpt.bench.workloads import append_chain
from dynamiq_redis_ckpt.cluster import primaries


def _node_stats(client: Any, prefix: str) -> dict[str, dict[str, float]]:
    stats = {}
    for node in primaries(client):
        conn = node.redis_connection
        keys = sum(1 for _ in conn.scan_iter(match=f"{prefix}:*", count=1000))
        memory = conn.info("memory")["used_memory"]
        evalsha = conn.info("commandstats").get("cmdstat_evalsha", {})
        stats[node.name] = {"keys": keys, "memory": memory, "scripts": evalsha.get("calls", 0),
                            "script_usec": evalsha.get("usec", 0)}  # fmt: skip
    return stats


def _timed(fn, samples: int) -> dict[str, float]:
    took = []
    for _ in range(samples):
        started = time.perf_counter()
        fn()
        took.append(time.perf_counter() - started)
    return summary(took[max(1, samples // 10) :])


def spread(url: str, runs: int, steps: int, samples: int, buckets: int, flow: str = "hot-flow",
           wait: bool = True) -> dict[str, Any]:  # fmt: skip
    """Save ``runs`` runs of one flow over ``buckets`` buckets and measure where they landed; the report as a dict."""
    prefix = f"bench-cluster-{secrets.token_hex(3)}"
    backend = RedisCheckpointBackend(url=url, prefix=prefix, flow_buckets=buckets)
    client = backend.redis
    for node in primaries(client):
        node.redis_connection.config_resetstat()
    before = _node_stats(client, prefix)
    try:
        for run in range(runs):
            for cp in append_chain(1000 + run, steps, flow_id=flow):
                backend.save(cp)
        after = _node_stats(client, prefix)
        nodes = {}
        for name in after:
            nodes[name] = {key: after[name][key] - (0 if key == "keys" else before[name][key]) for key in after[name]}
        totals = {key: sum(node[key] for node in nodes.values()) or 1 for key in ("keys", "memory", "scripts")}
        for node in nodes.values():
            node["share"] = {key: node[key] / totals[key] for key in totals}
            node["off_even"] = {key: node["share"][key] * len(nodes) - 1 for key in totals}
        newest = _timed(lambda: backend.get_list_by_flow(flow, limit=10), samples)
        saves = {}
        for acks in (0, 1) if wait else ():
            waiting = RedisCheckpointBackend(url=url, prefix=prefix, replica_acks=acks, flow_buckets=buckets)
            chain = list(append_chain(7 + acks, samples, flow_id=f"wait-{acks}"))
            it = iter(chain)
            saves[acks] = _timed(lambda b=waiting, c=it: b.save(next(c)), samples)
            waiting.close()
        return {"buckets": buckets, "runs": runs, "steps": steps, "masters": nodes, "list_newest_10": newest,
                **({"save": saves[0], "save_replica_acks_1": saves[1]} if wait else {})}  # fmt: skip
    finally:
        backend.clear()
        backend.close()


def render(result: dict[str, Any]) -> str:
    lines = [f"one flow, {result['runs']} runs x {result['steps']} saves, {result['buckets']} bucket(s), over "
             f"{len(result['masters'])} masters",
             "| master | keys | share (vs even) | memory added | share (vs even) | save scripts | share (vs even) |"
             " script CPU (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, node in sorted(result["masters"].items()):
        share, off = node["share"], node["off_even"]
        lines.append(f"| {name} | {node['keys']} | {share['keys']:.0%} ({off['keys']:+.0%}) | "
                     f"{node['memory'] / 1e6:.2f} MB | {share['memory']:.0%} ({off['memory']:+.0%}) | "
                     f"{node['scripts']} | {share['scripts']:.0%} ({off['scripts']:+.0%}) | "
                     f"{node['script_usec'] / 1000:.1f} |")  # fmt: skip
    for label, key in (("list newest 10", "list_newest_10"), ("save", "save"),
                       ("save, replica_acks=1 (WAIT)", "save_replica_acks_1")):  # fmt: skip
        if key in result:
            lines.append(f"{label}: p50 {result[key]['p50_ms']:.3f} ms, p99 {result[key]['p99_ms']:.3f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m dynamiq_redis_ckpt.bench.cluster", description=__doc__)
    parser.add_argument("--url", required=True, help="redis+cluster://host:port[,host:port]")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="saves per run")
    parser.add_argument("--samples", type=int, default=200, help="timed calls per latency")
    parser.add_argument("--buckets", default="1,16", help="bucket counts to compare (comma-separated)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.buckets.split(",")]
    results = []
    try:
        for i, buckets in enumerate(counts):
            results.append(spread(args.url, args.runs, args.steps, args.samples, buckets, wait=i == len(counts) - 1))
            print(render(results[-1]) + "\n", flush=True)
    except (redis.RedisError, CheckpointStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
