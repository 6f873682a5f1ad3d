"""Where PersistentStep's time goes, phase by phase (Qwen3-0.6B shape, bf16, random weights, no checkpoint).

The one-launch step (asr.cuda_persistent) built with SCHEDULE["TIMING"] = 1 records, in GPU nanoseconds
(%globaltimer), the latest time a block reached each grid barrier and when block 0 left it. Per phase kind
(q|k|v, attention, o, gate|up, down, the LM head): "work" = last arrival minus the previous barrier's release (the
slowest block's phase), "barrier" = release minus last arrival; summed over a step, averaged over steps. Then each
schedule's ms per step without timing (tools/gpu/probe_step.py's loop), tokens compared with the first schedule's.
Usage: python3 tools/gpu/probe_persistent.py [--steps 64] [--schedules base ahead ahead-par8 ...]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse

import asr  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from probe_step import CONFIG, time_decoder
from asr import cuda_persistent
from asr import llm as L

SCHEDULES = {
    "base": dict(AHEAD=0, GU_ROWS=2, ATTN_PAR=2),
    "ahead": dict(AHEAD=1, GU_ROWS=3, ATTN_PAR=2),
    "par8": dict(AHEAD=0, GU_ROWS=2, ATTN_PAR=8),
    "ahead-par4": dict(AHEAD=1, GU_ROWS=3, ATTN_PAR=4),
    "ahead-par8": dict(AHEAD=1, GU_ROWS=3, ATTN_PAR=8),
    "ahead-par16": dict(AHEAD=1, GU_ROWS=3, ATTN_PAR=16),
}
KINDS = ("qkv", "attention", "o", "gate|up", "down")


def phases(model, schedule: dict, steps: int, prompt: int = 46) -> dict[str, tuple[float, float]]:
    """Mean per-step (work, barrier) microseconds by phase kind, and the kernel's span."""
    cuda_persistent.SCHEDULE = dict(schedule, TIMING=1)
    cache = [BatchKVCache([0]) for _ in model.layers]
    emb = (mx.random.normal((1, prompt, model.args.hidden_size), key=mx.random.key(1)) * 0.05).astype(mx.bfloat16)
    logits = L.last_logits(model, mx.zeros((1, prompt), dtype=mx.int32), cache, emb)
    cur = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
    dec = L.FastDecoder(model)
    step = dec.start(cache, prompt, [0])
    one = dec._fused_step
    assert isinstance(one, cuda_persistent.PersistentStep), type(one)
    layers = len(model.layers)
    sums = {k: np.zeros(2) for k in (*KINDS, "head")}
    span = 0.0
    for i in range(steps + 4):
        cur = step(cur)
        mx.eval(cur)
        t = np.array(one.times).astype(np.int64)
        if i < 4:  # warm-up
            continue
        start, end = t[0], t[1]
        marks = t[2:].reshape(-1, 2)[: 5 * layers + 1]
        prev = start
        for p, (arrived, left) in enumerate(marks):
            kind = "head" if p == 5 * layers else KINDS[p % 5]
            sums[kind] += (arrived - prev, left - arrived)
            prev = left
        span += end - start
    out = {k: (v[0] / steps / 1e3, v[1] / steps / 1e3) for k, v in sums.items()}
    out["span"] = (span / steps / 1e3, 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__, "SMs", cuda_persistent.sm_count())
    model = L.build_llm(CONFIG)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    for name in a.schedules:
        res = phases(model, SCHEDULES[name], a.steps)
        cells = ", ".join(f"{k} {w:.1f}+{b:.1f}" for k, (w, b) in res.items() if k != "span")
        print(f"{name:10s} in-kernel span {res['span'][0]:.1f} us; work+barrier us a step: {cells}", flush=True)
    ref = None
    for name in a.schedules + a.schedules:
        cuda_persistent.SCHEDULE = dict(SCHEDULES[name], TIMING=0)
        wall, host, toks = time_decoder(L.FastDecoder(model), model, 1, a.steps)
        ref = toks if ref is None else ref
        same = sum(x == y for x, y in zip(ref[0], toks[0], strict=True))
        print(f"{name:10s} {wall:.3f} ms/step ({1e3 / wall:.0f} steps/s), tokens equal to the first: {same}/{a.steps}",
              flush=True)


if __name__ == "__main__":
    main()
