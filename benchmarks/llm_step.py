"""One LLM runner alone: prefill and decode-step times of the runner a backend gives a model's LLM, for A/Bs of
backends (the reference `mlx` against `cpu` or `cuda`), the BLAS, threads and the weights' dtype.

    .venv/bin/python benchmarks/llm_step.py --model DIR [--backend auto|mlx|cpu|cuda] [--batch 1 4 16] [--prompt 46]
        [--steps 20] [--dtype float32|bfloat16]

Run it under two environments (e.g. .venv with the system OpenBLAS and a venv with the `mkl` extra) a few times,
alternating, on a machine whose speed drifts. Random prompt embeddings; the tokens are not looked at.
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import statistics
import time

import asr
import mlx.core as mx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt", type=int, default=46, help="prompt positions a row")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps (median)")
    ap.add_argument("--dtype", default="float32", help="the LLM's dtype")
    a = ap.parse_args()
    model = asr.load_model(a.model, dtype=a.dtype, runtime=asr.RuntimeOptions(backend=a.backend))
    runner = model.runtime.llm
    print(f"{model.runtime.info.backend} backend, LLM {runner.description}, BLAS {model.runtime.info.cpu_blas}, "
          f"dtype {a.dtype}")
    for b in a.batch:
        emb = (mx.random.normal((b, a.prompt, model.net.llm.args.hidden_size), key=mx.random.key(0)) * 0.5).astype(
            runner.embeds_dtype)
        lengths = [a.prompt] * b
        mx.eval(runner.start(emb, lengths)[0])  # warm-up
        t0 = time.perf_counter()
        tok, step = runner.start(emb, lengths)
        mx.eval(tok)
        prefill = time.perf_counter() - t0
        tok = step(tok)
        mx.eval(tok)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            tok = step(tok)
            mx.eval(tok)
            times.append(time.perf_counter() - t0)
        print(f"batch {b}: prefill {prefill * 1e3:.0f} ms, decode step {statistics.median(times) * 1e3:.1f} ms "
              f"(min {min(times) * 1e3:.1f})", flush=True)


if __name__ == "__main__":
    main()
