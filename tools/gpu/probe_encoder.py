"""Why the fp32 encoder of a large batch is slower than its GPU work: MLX's CUDA graphs and cuBLAS's products.

CUPTI (profile_batch.py) showed the fp32 encoder of 64 segments at ~91 ms of wall time for ~54 ms of GPU work,
with every MLX command buffer instantiated as a new CUDA graph (cudaGraphInstantiate + cudaGraphExecDestroy, no
cudaGraphExecUpdate) while the bf16 encoder's graphs are updated in place. MLX 0.32 re-instantiates a graph that
holds a kernel node it cannot update (a cluster launch wider than x), and the fp32 products ran cuBLAS's sm90
TF32 kernels. This times the encoder alone (fp32, --segments rows) with its linear layers computed several ways:
  base      nn.Linear (MLX: addmm with a bias epilogue, weights [out, in])
  matmul    x @ W.T, then + b
  nn        x @ Wt + b with Wt = W.T stored contiguous ([in, out]: the other cuBLAS layout)
  nn-addmm  addmm(b, x, Wt)
each with asr.cuda_encoder's kernels on and off, and counts the graph calls and the product kernels under CUPTI.
Usage: python3 tools/gpu/probe_encoder.py --model /root/ck/full --clips a.wav b.wav [--segments 64]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import os
from collections import Counter

from common import median_ms, traced

import asr
import mlx.core as mx

from asr import cuda_encoder, linear_nn
from asr.audio import load_audio
from asr.frontend import features_padded

LINEARS = (("self_attn", "linear_q_k_v"), ("self_attn", "linear_out"), ("feed_forward", "w_1"),
           ("feed_forward", "w_2"))


class Product:
    def __init__(self, linear, how: str):
        self.how = how
        self.w, self.b = linear.weight, linear.bias
        self.wt = mx.contiguous(linear.weight.T) if how.startswith("nn") else None
        if self.wt is not None:
            mx.eval(self.wt)

    def __call__(self, x: mx.array) -> mx.array:
        if self.how == "matmul":
            return x @ self.w.T + self.b
        if self.how == "nn":
            return x @ self.wt + self.b
        return mx.addmm(self.b, x, self.wt)


def layers(model):
    enc = model.net.encoder
    return enc.encoders0 + enc.encoders + enc.tp_encoders


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["base", "matmul", "nn", "nn-addmm"])
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__, "env",
          {k: v for k, v in os.environ.items() if k.startswith("MLX_")}, flush=True)
    linear_nn.ENABLED = False  # "base" is nn.Linear, the layout before asr.linear_nn (which is the nn-addmm variant)
    model = asr.load_model(a.model, dtype="bfloat16", encoder_dtype="float32")
    audios = [load_audio(p).samples for p in a.clips]
    feats, lengths = features_padded([audios[i % len(audios)] for i in range(a.segments)], model.cfg.frontend)
    valid = mx.array(lengths)
    mx.eval(feats)
    originals = {(i, p, n): getattr(getattr(layer, p), n) for i, layer in enumerate(layers(model)) for p, n in LINEARS}
    reference = model.encode(feats, valid)
    mx.eval(reference)
    for how in a.variants:
        for (i, p, n), lin in originals.items():
            setattr(getattr(layers(model)[i], p), n, lin if how == "base" else Product(lin, how))
        for on in (False, True):
            cuda_encoder.ENABLED = on

            def run():
                return model.encode(feats, valid)

            out = run()
            err = mx.abs(out - reference).max().item()
            line = f"{how:9s} kernels {'on ' if on else 'off'}: median {median_ms(run, a.repeats):7.2f} ms, " \
                   f"max |diff| vs base {err:.2e}"
            if not a.no_profile:
                events, _ = traced(lambda: mx.eval(run()))
                api = Counter(e["name"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver"))
                gemms = Counter(e["name"][:60] for e in events if e.get("cat") == "kernel" and
                                ("gemm" in e["name"] or "nvjet" in e["name"] or "xmma" in e["name"]))
                line += (f"; graphs: instantiate {api['cudaGraphInstantiate']}, update {api['cudaGraphExecUpdate']}"
                         f", launch {api['cudaGraphLaunch']}; products: {dict(gemms.most_common(4))}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
