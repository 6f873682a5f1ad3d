"""Time one projection of the decoder at each batch size: dense bf16, 8-bit and 4-bit weights, with the
activations passed as [B, 1, K] (what mlx-lm's model hands its Linear layers during decoding) or as [B, K]
(what asr.llm.FastDecoder does). Finds the quantized small-batch collapse and checks the 2-D fix.

    PYTHONPATH=/root/site python3 tools/gpu/qmm_scan.py [--json OUT]
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn


def bench(fn, warm=3, n=20):
    for _ in range(warm):
        mx.eval(fn())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__)
    rows = []
    for N, K in [(3072, 1024), (1024, 3072), (151936, 1024)]:
        dense = nn.Linear(K, N, bias=False)
        dense.set_dtype(mx.bfloat16)
        layers = {"bf16": dense}
        for bits in (8, 4):
            q = nn.Linear(K, N, bias=False)
            q.set_dtype(mx.bfloat16)
            layers[f"q{bits}"] = nn.QuantizedLinear.from_linear(q, group_size=64, bits=bits)
        mx.eval([m.parameters() for m in layers.values()])
        for B in (1, 2, 4, 8, 16, 32, 64):
            x3 = mx.random.normal((B, 1, K)).astype(mx.bfloat16)
            x2 = x3.reshape(B, K)
            mx.eval(x3, x2)
            for name, layer in layers.items():
                t3 = bench(lambda layer=layer, x3=x3: layer(x3))
                t2 = bench(lambda layer=layer, x2=x2: layer(x2))
                rows.append({"N": N, "K": K, "B": B, "weights": name, "ms_3d": t3 * 1e3, "ms_2d": t2 * 1e3})
                print(f"{N:>6}x{K:<5} B={B:<3} {name:5s} [B,1,K] {t3 * 1e3:8.3f} ms   [B,K] {t2 * 1e3:8.3f} ms", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
