"""Shared by the GPU probes in tools/gpu: a synced median time, and CUPTI traces (kernels, their union on the GPU
timeline, CUDA API host time).

A chrome trace from torch.profiler (ProfilerActivity.CUDA) records every kernel and CUDA call of the process, MLX's
included (both use the device's primary context).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import mlx.core as mx


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of mx.eval(fn()) over `repeats` runs, after one untimed run (traces, compiles)."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def traced(fn: Callable[[], object], path: str | None = None) -> tuple[list[dict], float]:
    """The CUPTI trace events of one run of fn (kept as a chrome trace at `path` if given) and its wall time, ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    out = path or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(out)
    events = json.load(open(out))["traceEvents"]
    if path is None:
        os.unlink(out)
    return events, wall


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summary(events: list[dict], wall_ms: float, top: int) -> dict:
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    api = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    out: dict = {"wall_ms": round(wall_ms, 2), "kernels": len(kernels)}
    if kernels:
        iv = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in kernels]
        out["busy_ms"] = round(union(iv) / 1e3, 2)
        out["span_ms"] = round((max(e for _, e in iv) - min(s for s, _ in iv)) / 1e3, 2)
        out["sum_ms"] = round(sum(e.get("dur", 0) for e in kernels) / 1e3, 2)
    by_name: dict = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        k = by_name[e["name"][:90]]
        k[0] += 1
        k[1] += e.get("dur", 0)
    out["top_kernels"] = [(n, c, round(d / 1e3, 3)) for n, (c, d) in
                          sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]
    by_api: dict = defaultdict(lambda: [0, 0.0])
    for e in api:
        k = by_api[e["name"]]
        k[0] += 1
        k[1] += e.get("dur", 0)
    out["api"] = [(n, c, round(d / 1e3, 3)) for n, (c, d) in sorted(by_api.items(), key=lambda kv: -kv[1][1])[:top]]
    return out


def profiled(name: str, fn: Callable[[], object], tdir: str, top: int) -> dict:
    """Run fn once unprofiled (warm), once under CUPTI (the trace kept in tdir); print and return the summary."""
    fn()
    path = os.path.join(tdir, name.split(" ")[0].replace("+", "_").replace(",", "") + ".json")
    s = summary(*traced(fn, path), top)
    print(f"\n== {name}: wall {s['wall_ms']} ms, {s['kernels']} kernels, busy {s.get('busy_ms')} ms, "
          f"span {s.get('span_ms')} ms, sum {s.get('sum_ms')} ms", flush=True)
    for n, c, d in s["top_kernels"]:
        print(f"   {d:9.3f} ms {c:6d}x  {n}")
    print("   -- CUDA API (host)")
    for n, c, d in s["api"]:
        print(f"   {d:9.3f} ms {c:6d}x  {n}")
    return s
