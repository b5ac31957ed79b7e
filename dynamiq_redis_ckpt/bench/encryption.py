"""``python3 -m dynamiq_redis_ckpt.bench.encryption``: what encryption at rest costs a save and a load.

A quick measurement for docs/encryption.md, not part of the main benchmark. On a private ``redis-server`` (or
``--url``), two backends, one plain and one encrypting, take turns in blocks (A B, B A, ...) so that load on the
machine falls on both. Each iteration uses a checkpoint of its own (another seed, the same shape): the last snapshot
of :func:`~dynamiq_redis_ckpt.bench.workloads.append_chain`, 10 agent-like nodes (about 60 KB as JSON).

* **save, new content**: the 10-node checkpoint saved with no parent and nothing cached: every chunk goes into one
  new pack, so the whole pack is compressed and (when on) encrypted.
* **save, APPEND step**: one snapshot of a run (the 10th node completing after nine): the new pack holds one node
  state and the root, compressed against the previous pack.
* **load, cold**: the process holds no pack (cache cleared), so every pack is fetched, decrypted and decompressed.
* **load, warm**: the packs are held decoded in the process: no decryption (the common case of a resume).
"""

from __future__ import annotations

import argparse
import time
import uuid

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.bench.workloads import append_chain
from dynamiq_redis_ckpt.embedded import start_embedded_redis

KEY = bytes(range(32))


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a Redis to use (default: a private redis-server)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--block", type=int, default=25)
    args = parser.parse_args()
    chains = [list(append_chain(seed, 10, flow_id="enc-bench")) for seed in range(args.iterations)]

    def run(kwargs: dict) -> dict[str, dict[str, float]]:
        backends = {
            "off": RedisCheckpointBackend(**kwargs, prefix=f"b{uuid.uuid4().hex[:6]}", leases=False),
            "on": RedisCheckpointBackend(**kwargs, prefix=f"b{uuid.uuid4().hex[:6]}", leases=False,
                                         encryption_keys=lambda: ({"k1": KEY}, "k1")),
        }  # fmt: skip
        samples = {name: {m: [] for m in ("save_new", "save_append", "load_cold", "load_warm")} for name in backends}
        order = list(backends)
        for start in range(0, args.iterations, args.block):
            for name in order:
                backend, got = backends[name], samples[name]
                for i in range(start, min(start + args.block, args.iterations)):
                    chain = chains[i]
                    last = chain[-1].model_copy(update={"id": f"{name}-new-{i}", "parent_checkpoint_id": None})
                    backend.store.cache.clear()
                    t = time.perf_counter()
                    backend.save(last)
                    got["save_new"].append(time.perf_counter() - t)
                    for cp in chain[:-1]:  # a run's snapshots up to nine nodes, then the timed tenth
                        backend.save(cp.model_copy(update={"id": f"{name}-{i}-{cp.id}"}))
                    step = chain[-1].model_copy(
                        update={"id": f"{name}-{i}-{chain[-1].id}",
                                "parent_checkpoint_id": f"{name}-{i}-{chain[-2].id}"}
                    )  # fmt: skip
                    t = time.perf_counter()
                    backend.save(step)
                    got["save_append"].append(time.perf_counter() - t)
                    backend.store.cache.clear()
                    t = time.perf_counter()
                    assert backend.load(step.id) is not None
                    got["load_cold"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    backend.load(step.id)
                    got["load_warm"].append(time.perf_counter() - t)
            order.reverse()
        for backend in backends.values():
            backend.clear()
        return {
            name: {m: (_p(v, 0.5), _p(v, 0.95)) for m, v in got.items()} for name, got in samples.items()
        }  # fmt: skip

    if args.url:
        result = run({"url": args.url})
    else:
        with start_embedded_redis() as server:
            result = run(server.backend_kwargs())
    print(f"{args.iterations} iterations per metric, µs (p50 / p95)")
    print(f"{'metric':<12} {'off p50':>9} {'on p50':>9} {'Δ p50':>8} {'off p95':>9} {'on p95':>9}")
    for metric in result["off"]:
        (off50, off95), (on50, on95) = result["off"][metric], result["on"][metric]
        print(f"{metric:<12} {off50:9.0f} {on50:9.0f} {on50 - off50:+8.0f} {off95:9.0f} {on95:9.0f}")


if __name__ == "__main__":
    main()
