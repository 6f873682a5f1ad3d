"""Where a decode step's time goes on a GPU (Qwen3-0.6B shape, bf16 or --quantize, random weights, no checkpoint).

Prints ms per step for: our step (asr.llm.FastDecoder) and variants of it (`--names`: the MLX-op steps without
asr.cuda_decode, the fused step uncompiled, the masked MLX step forced at batch 1, the MLX-op steps instead of
RowsStep), FastDecoder with parts knocked out (--knockouts), a bare chain of the step's matmuls (the floor set by
the weights), and chains of N tiny kernels (MLX's cost per kernel), plus how much of a step the host spends
building/encoding it. Usage: python3 tools/gpu/probe_step.py [--steps 64] [--batch 1 64] [--names ...]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import contextlib
import time

import asr  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from asr import cuda_decode, cuda_persistent
from asr import llm as L

CONFIG = dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
              num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, vocab_size=151936,
              rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=40960)


# parts of a step replaced by the identity while it is built (wrong tokens; for timing only). They act on MLX
# operations, so they change the MLX-op steps, not asr.cuda_decode's custom kernels.
_KNOCKOUTS = {
    "attention": [(mx.fast, "scaled_dot_product_attention", lambda q, *a, **k: q)],
    "rope": [(mx.fast, "rope", lambda x, *a, **k: x)],
    "norm": [(mx.fast, "rms_norm", lambda x, *a, **k: x)],  # every RMSNorm, the layers' too
}


@contextlib.contextmanager
def _patched(settings):
    """Attributes (obj, name, value) set for the duration of the block."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    for obj, name, value in settings:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


class _MaskedAtOne(L.FastDecoder):
    def _start_single(self, kv, prompt_slots):
        return self._start_masked(kv, prompt_slots, [0])


def variant(*settings, base=L.FastDecoder):
    """`base` with `settings` (see _patched) applied while a decode starts and while each step is built (a compiled
    step is traced on its first call)."""

    class Variant(base):
        def start(self, *args):
            with _patched(settings):
                step = super().start(*args)

            def patched_step(tok):
                with _patched(settings):
                    return step(tok)

            return patched_step

    return Variant


# FastDecoder without asr.cuda_decode's fused step: the batch-of-one step built from MLX operations
Unfused = variant((cuda_decode, "ENABLED", False))
# the fused step built kernel by kernel every step (not compiled)
FusedEager = variant((cuda_decode, "COMPILE", False))
# without asr.cuda_decode.RowsStep (batches, quantized LLMs): the MLX-op steps
NoRows = variant((cuda_decode, "rows_available", lambda model: False))
# the masked, compiled batch step even for a batch of one (what it did before the mask-free path)
Masked = variant((cuda_decode, "ENABLED", False), base=_MaskedAtOne)


# the five-kernels-a-layer FusedStep instead of the one-launch step (its schedules: tools/gpu/probe_persistent.py)
Fused = variant((cuda_persistent, "ENABLED", False))


def knockout(*parts: str):
    """The MLX-op step built without `parts` (see _KNOCKOUTS)."""
    return variant((cuda_decode, "ENABLED", False), *(s for part in parts for s in _KNOCKOUTS[part]))


def time_decoder(dec, model, batch: int, steps: int, prompt: int = 46) -> tuple[float, float, list]:
    cache = [BatchKVCache([0] * batch) for _ in model.layers]
    emb = (mx.random.normal((batch, prompt, model.args.hidden_size), key=mx.random.key(batch)) * 0.05).astype(mx.bfloat16)
    logits = L.last_logits(model, mx.zeros((batch, prompt), dtype=mx.int32), cache, emb)
    cur = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.int32)
    mx.eval(cur)
    step = dec.start(cache, prompt, [0] * batch)
    for _ in range(8):  # warm-up: compile
        cur = step(cur)
        mx.eval(cur)
    call = 0.0
    host = 0.0
    seq = []
    t0 = time.perf_counter()
    for i in range(steps):
        h0 = time.perf_counter()
        cur = step(cur)
        call += time.perf_counter() - h0
        mx.async_eval(cur)
        host += time.perf_counter() - h0
        seq.append(cur)
        if i % 8 == 7:
            cur.tolist()
    mx.eval(cur)
    wall = time.perf_counter() - t0
    print(f"    (building the step {call / steps * 1e3:.3f} ms, encoding it {(host - call) / steps * 1e3:.3f} ms)")
    return wall / steps * 1e3, host / steps * 1e3, mx.stack(seq, axis=1).tolist()


def matmul_chain(model, batch: int, steps: int) -> float:
    ws = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        ws += [mx.concatenate([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
               mx.concatenate([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight]
    mx.eval(ws)
    head = model.model.embed_tokens.weight

    def one(x):
        for w in ws:  # each output is at least as wide as the next product's input
            x = x[:, : w.shape[1]] @ w.T
        return (x @ head.T)[:, :1024]

    return _ms_per_call(mx.compile(one), mx.ones((batch, 1024), mx.bfloat16), steps)


def _ms_per_call(f, x: mx.array, steps: int, warmup: int = 4) -> float:
    """ms per call of x = f(x), each call queued with async_eval behind the last, after `warmup` calls."""
    for _ in range(warmup):
        x = f(x)
    mx.eval(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = f(x)
        mx.async_eval(x)
    mx.eval(x)
    return (time.perf_counter() - t0) / steps * 1e3


def tiny_chain(n: int, steps: int, compiled_barrier: bool) -> float:
    """n dependent tiny kernels (vector adds that MLX cannot fuse: each result is also an output)."""
    x = mx.ones((1, 1024), mx.bfloat16)

    def one(x):
        outs = []
        for _ in range(n):
            x = mx.fast.rms_norm(x, None, 1e-6) if compiled_barrier else x + 1
            outs.append(x)
        return x

    return _ms_per_call(mx.compile(one) if compiled_barrier else one, x, steps, warmup=3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--variants", type=int, default=3, help="how many of the step variants to time")
    ap.add_argument("--names", nargs="*", default=[], help="time these variants (by name) instead")
    ap.add_argument("--knockouts", nargs="*", default=[],
                    help="FastDecoder without parts: attention, rope, norm; join with +")
    ap.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the LLM (mlx-lm's affine, group 64)")
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__)
    model = L.build_llm(CONFIG)
    model.set_dtype(mx.bfloat16)
    if a.quantize:
        nn.quantize(model, group_size=64, bits=a.quantize)
    mx.eval(model.parameters())
    for n in (100, 400):
        print(f"chain of {n} rms_norm kernels: {tiny_chain(n, 20, True):.3f} ms ({tiny_chain(n, 20, True) / n * 1e3:.1f} us each)")
    variants = [("FastDecoder", L.FastDecoder), ("unfused", Unfused), ("fused-eager", FusedEager), ("masked", Masked),
                ("no-rows", NoRows), ("fused", Fused)]
    variants = [v for v in variants if v[0] in a.names] if a.names else variants[: a.variants]
    if a.knockouts:
        variants = [("FastDecoder", L.FastDecoder)] + [(k, knockout(*k.split("+"))) for k in a.knockouts]
    for b in a.batch:
        if not a.quantize:
            print(f"B={b} matmul chain (113 products + LM head): {matmul_chain(model, b, a.steps):.3f} ms/step")
        ref = None
        # every variant twice, in turn: the first timing in a process has been ~20 ms a step for whichever variant
        # came first (whatever MLX or the driver sets up then), so only the second round is comparable
        for name, cls in variants + variants:
            for k in list(vars(model)):
                if k.startswith("_fast"):
                    delattr(model, k)
            try:
                wall, host, toks = time_decoder(cls(model), model, b, a.steps)
                ref = toks if ref is None else ref
                same = sum(x == y for r, t in zip(ref, toks, strict=True) for x, y in zip(r, t, strict=True))
                print(f"B={b} {name:14s} {wall:.3f} ms/step ({1e3 / wall:.0f} steps/s), host {host:.3f} ms/step, "
                      f"tokens equal to FastDecoder's: {same}/{b * a.steps}")
            except Exception as exc:  # noqa: BLE001 (a probe: report and go on)
                print(f"B={b} {name} failed: {exc!r}")


if __name__ == "__main__":
    main()
