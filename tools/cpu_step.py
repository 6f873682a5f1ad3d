"""The CPU LLM runner (asr.cpu_llm) alone: prefill and decode-step times of a model's LLM (fp32 weights, or bf16
ones through asr.cpu_gemv or MKL), for A/Bs of the BLAS, threads, product forms and weight dtype
(docs/performance.md, "Current code on the AMD Zen 4 VM" and "bf16 weights with fp32 arithmetic").

    .venv/bin/python tools/cpu_step.py --model DIR [--batch 1 4 16] [--prompt 46] [--steps 20] [--dtype bfloat16]

Run it under two environments (e.g. .venv with the system OpenBLAS and a venv with the `mkl` extra) a few times,
alternating, on a machine whose speed drifts. Random prompt embeddings; the tokens are not looked at.
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import statistics
import time

import asr
import mlx.core as mx

from asr import _blas, cpu_llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt", type=int, default=46, help="prompt positions a row")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps (median)")
    ap.add_argument("--dtype", default="float32", help="the LLM's dtype (bfloat16: asr.cpu_gemv or MKL's bf16)")
    a = ap.parse_args()
    model = asr.load_model(a.model, dtype=a.dtype)
    runner = cpu_llm.NumpyQwen3.of(model.net.llm)
    print(f"BLAS {_blas.loaded}, dtype {a.dtype}, bf16 products {runner.bf16}")
    for b in a.batch:
        emb = mx.random.normal((b, a.prompt, model.net.llm.args.hidden_size), key=mx.random.key(0)) * 0.5
        runner.start(emb, [0] * b)  # warm-up
        t0 = time.perf_counter()
        tok, step = runner.start(emb, [0] * b)
        prefill = time.perf_counter() - t0
        tok = step(tok)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            tok = step(tok)
            times.append(time.perf_counter() - t0)
        print(f"batch {b}: prefill {prefill * 1e3:.0f} ms, decode step {statistics.median(times) * 1e3:.1f} ms "
              f"(min {min(times) * 1e3:.1f})", flush=True)


if __name__ == "__main__":
    main()
