"""Where a batch-1 decode step's time goes on a GPU (Qwen3-0.6B shape, bf16, random weights, no checkpoint).

Prints ms per step for: our compiled step (asr.llm.FastDecoder) and variants of it, a bare chain of the step's
matmuls (the floor set by the weights), and chains of N tiny kernels (MLX's cost per kernel), plus how much of a
step the host spends building/encoding it. Usage: python3 tools/gpu/probe_step.py [--steps 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import BatchKVCache

import asr  # noqa: F401
from asr import llm as L

CONFIG = dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
              num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, vocab_size=151936,
              rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=40960)


class AddmmDecoder(L.FastDecoder):
    """Residual adds folded into the o_proj / down_proj products (mx.addmm), tokens stay uint32."""

    def _forward(self, tok, slot, left_pad, kv):
        m = self.model.model
        x = m.embed_tokens(tok)
        B = x.shape[0]
        cap = kv[0][0].shape[2]
        pos = mx.arange(cap)
        mask = ((pos[None] >= left_pad[:, None]) & (pos[None] <= slot))[:, None, None, :]
        rope_pos = slot - left_pad
        at = slot.reshape(1)
        new_kv = []
        for layer, (qkv, gate_up), (k_cache, v_cache) in zip(m.layers, self.fused, kv, strict=True):
            a = layer.self_attn
            nq, nk = qkv.sizes[0], qkv.sizes[1]
            q, k, v = mx.split(qkv(layer.input_layernorm(x)), [nq, nq + nk], axis=-1)
            q = a.rope(a.q_norm(q.reshape(B, a.n_heads, 1, -1)), offset=rope_pos)
            k = a.rope(a.k_norm(k.reshape(B, a.n_kv_heads, 1, -1)), offset=rope_pos)
            v = v.reshape(B, a.n_kv_heads, 1, -1)
            k_cache = mx.slice_update(k_cache, k, at, axes=(2,))
            v_cache = mx.slice_update(v_cache, v, at, axes=(2,))
            o = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=a.scale, mask=mask)
            x = mx.addmm(x, o.reshape(B, -1), a.o_proj.weight.T)
            gate, up = mx.split(gate_up(layer.post_attention_layernorm(x)), 2, axis=-1)
            x = mx.addmm(x, swiglu(gate, up), layer.mlp.down_proj.weight.T)
            new_kv.append([k_cache, v_cache])
        h = m.norm(x)
        return mx.argmax(m.embed_tokens.as_linear(h), axis=-1), new_kv, slot + 1


class QKRopeDecoder(AddmmDecoder):
    """AddmmDecoder plus q and k normalised and rotated together (one rms_norm, one rope)."""

    def __init__(self, model):
        super().__init__(model)
        self.qk_w = [mx.concatenate([mx.broadcast_to(layer.self_attn.q_norm.weight, (layer.self_attn.n_heads, 128)),
                                     mx.broadcast_to(layer.self_attn.k_norm.weight, (layer.self_attn.n_kv_heads, 128))])
                     [None, :, None, :] for layer in model.model.layers]
        mx.eval(self.qk_w)

    def _forward(self, tok, slot, left_pad, kv):
        m = self.model.model
        x = m.embed_tokens(tok)
        B = x.shape[0]
        cap = kv[0][0].shape[2]
        pos = mx.arange(cap)
        mask = ((pos[None] >= left_pad[:, None]) & (pos[None] <= slot))[:, None, None, :]
        rope_pos = slot - left_pad
        at = slot.reshape(1)
        new_kv = []
        for layer, (qkv, gate_up), (k_cache, v_cache), w in zip(m.layers, self.fused, kv, self.qk_w, strict=True):
            a = layer.self_attn
            nq, nk = a.n_heads, a.n_kv_heads
            h = qkv(layer.input_layernorm(x))
            qk = h[:, : (nq + nk) * 128].reshape(B, nq + nk, 1, 128)
            qk = a.rope(mx.fast.rms_norm(qk, None, 1e-6) * w, offset=rope_pos)
            q, k = qk[:, :nq], qk[:, nq:]
            v = h[:, (nq + nk) * 128:].reshape(B, nk, 1, 128)
            k_cache = mx.slice_update(k_cache, k, at, axes=(2,))
            v_cache = mx.slice_update(v_cache, v, at, axes=(2,))
            o = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=a.scale, mask=mask)
            x = mx.addmm(x, o.reshape(B, -1), a.o_proj.weight.T)
            gate, up = mx.split(gate_up(layer.post_attention_layernorm(x)), 2, axis=-1)
            x = mx.addmm(x, swiglu(gate, up), layer.mlp.down_proj.weight.T)
            new_kv.append([k_cache, v_cache])
        h = m.norm(x)
        return mx.argmax(m.embed_tokens.as_linear(h), axis=-1), new_kv, slot + 1


class Knockout(L.FastDecoder):
    """FastDecoder with parts of the step removed (wrong tokens; for timing only)."""

    drop: frozenset = frozenset()

    def _forward(self, tok, slot, left_pad, kv):
        d = self.drop
        m = self.model.model
        x = m.embed_tokens(tok)
        B = x.shape[0]
        cap = kv[0][0].shape[2]
        pos = mx.arange(cap)
        mask = None if "mask" in d else ((pos[None] >= left_pad[:, None]) & (pos[None] <= slot))[:, None, None, :]
        rope_pos = slot - left_pad
        at = slot.reshape(1)
        new_kv = []
        for layer, (qkv, gate_up), (k_cache, v_cache) in zip(m.layers, self.fused, kv, strict=True):
            a = layer.self_attn
            nq, nk = qkv.sizes[0], qkv.sizes[1]
            q, k, v = mx.split(qkv(layer.input_layernorm(x)), [nq, nq + nk], axis=-1)
            q, k, v = q.reshape(B, a.n_heads, 1, -1), k.reshape(B, a.n_kv_heads, 1, -1), v.reshape(B, a.n_kv_heads, 1, -1)
            if "norm" not in d:
                q, k = a.q_norm(q), a.k_norm(k)
            if "rope" not in d:
                q, k = a.rope(q, offset=rope_pos), a.rope(k, offset=rope_pos)
            if "update" not in d:
                k_cache = mx.slice_update(k_cache, k, at, axes=(2,))
                v_cache = mx.slice_update(v_cache, v, at, axes=(2,))
            if "sdpa" in d:
                o = q
            elif "manual" in d:
                G = a.n_heads // a.n_kv_heads
                qg = q.reshape(B, a.n_kv_heads, G, -1)
                s = (qg @ k_cache.swapaxes(-1, -2)) * a.scale
                if mask is not None:
                    s = mx.where(mask, s, -mx.inf)
                o = mx.softmax(s.astype(mx.float32), axis=-1).astype(v_cache.dtype) @ v_cache
            else:
                o = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=a.scale, mask=mask)
            x = x + L._linear(a.o_proj, o.reshape(B, -1))
            gate, up = mx.split(gate_up(layer.post_attention_layernorm(x)), 2, axis=-1)
            x = x + L._linear(layer.mlp.down_proj, swiglu(gate, up))
            new_kv.append([k_cache, v_cache])
        h = m.norm(x)
        return mx.argmax(m.embed_tokens.as_linear(h), axis=-1).astype(mx.int32), new_kv, slot + 1


QK_SOURCE = """
    // one warp per head of the fused q|k|v row: q and k heads are RMS-normalised and rotated, v heads copied
    constexpr int R = HD / 32;
    const int head = blockIdx.x;
    const int lane = threadIdx.x;
    const T* src = qkv + head * HD;
    if (head >= NQ + NKV) {
        T* dst = kv + (head - NQ) * HD;
        for (int i = lane; i < HD; i += 32) dst[i] = src[i];
        return;
    }
    const T* w = head < NQ ? qw : kw;
    float x[R];
    float ss = 0.0f;
    for (int j = 0; j < R; ++j) { x[j] = static_cast<float>(src[lane + 32 * j]); ss += x[j] * x[j]; }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
    const float r = rsqrt(ss / HD + EPS);
    float y[R];
    for (int j = 0; j < R; ++j) y[j] = static_cast<float>(w[lane + 32 * j] * static_cast<T>(x[j] * r));
    const float p = static_cast<float>(pos[0]);
    T* dst = head < NQ ? q + head * HD : kv + (head - NQ) * HD;
    for (int j = 0; j < R / 2; ++j) {
        const int i = lane + 32 * j;
        const float inv_freq = 1.0 / freqs[i];
        const float theta = p * inv_freq;
        const float c = cos(theta), s = sin(theta);
        const float x1 = y[j], x2 = y[j + R / 2];
        dst[i] = static_cast<T>(x1 * c - x2 * s);
        dst[i + HD / 2] = static_cast<T>(x1 * s + x2 * c);
    }
"""


class FusedSingle(L.FastDecoder):
    """Batch of one: q/k norm + RoPE + k|v packing in one custom CUDA kernel, one cache write, residual adds in
    the products (addmm). 10 kernels a layer instead of 16."""

    use_kernel = True

    def __init__(self, model):
        super().__init__(model)
        a = model.model.layers[0].self_attn
        eps = model.args.rms_norm_eps
        self.kernel = mx.fast.cuda_kernel(
            name="qk_norm_rope", input_names=["qkv", "qw", "kw", "freqs", "pos"], output_names=["q", "kv"],
            source=QK_SOURCE.replace("EPS", f"{eps!r}f")) if self.use_kernel else None
        self.H, self.KV, self.hd = a.n_heads, a.n_kv_heads, model.args.head_dim

    def _start_single(self, cache, prompt_slots):
        kv = [L._grow(mx.concatenate([c.keys[..., :prompt_slots, :], c.values[..., :prompt_slots, :]], axis=1),
                      prompt_slots + 1) for c in cache]
        state = {"kv": kv, "slot": prompt_slots}

        def step(tok):
            slot = state["slot"]
            if slot >= state["kv"][0].shape[2]:
                state["kv"] = [L._grow(c, slot + L.CACHE_STEP) for c in state["kv"]]
            state["slot"] = slot + 1
            return self._forward_single(tok, slot, state["kv"])

        return step

    def _qk(self, layer, h, slot, pos):
        a = layer.self_attn
        H, KV, hd = self.H, self.KV, self.hd
        if self.kernel is not None:
            return self.kernel(inputs=[h, a.q_norm.weight, a.k_norm.weight, a.rope._freqs, pos],
                               template=[("T", h.dtype), ("NQ", H), ("NKV", KV), ("HD", hd)],
                               grid=(32 * (H + 2 * KV), 1, 1), threadgroup=(32, 1, 1),
                               output_shapes=[(1, H, 1, hd), (1, 2 * KV, 1, hd)], output_dtypes=[h.dtype, h.dtype])
        q, k, v = mx.split(h, [H * hd, (H + KV) * hd], axis=-1)
        q = a.rope(a.q_norm(q.reshape(1, H, 1, hd)), offset=slot)
        k = a.rope(a.k_norm(k.reshape(1, KV, 1, hd)), offset=slot)
        return q, mx.concatenate([k, v.reshape(1, KV, 1, hd)], axis=1)

    def _forward_single(self, tok, slot, kv):
        m = self.model.model
        x = m.embed_tokens(tok)
        pos = mx.array([slot], dtype=mx.int32)
        KV = self.KV
        for layer, (qkv, gate_up), cache in zip(m.layers, self.fused, kv, strict=True):
            a = layer.self_attn
            q, knew = self._qk(layer, qkv(layer.input_layernorm(x)), slot, pos)
            cache[:, :, slot: slot + 1, :] = knew
            o = mx.fast.scaled_dot_product_attention(q, cache[:, :KV, : slot + 1], cache[:, KV:, : slot + 1],
                                                     scale=a.scale)
            x = mx.addmm(x, o.reshape(1, -1), a.o_proj.weight.T)
            gate, up = mx.split(gate_up(layer.post_attention_layernorm(x)), 2, axis=-1)
            x = mx.addmm(x, swiglu(gate, up), layer.mlp.down_proj.weight.T)
        return mx.argmax(m.embed_tokens.as_linear(m.norm(x)), axis=-1).astype(mx.int32)


class PackedSingle(FusedSingle):
    """FusedSingle without the custom kernel (packing by concatenation)."""

    use_kernel = False


class Masked(L.FastDecoder):
    """FastDecoder's masked, compiled step even for a batch of one (what it did before the mask-free path)."""

    def start(self, cache, prompt_slots, left_pad):
        return self._start_masked(cache, prompt_slots, left_pad)


class MaskedSdpa(Masked):
    """The masked step with MLX's masked sdpa instead of asr.cuda_attention's kernel."""

    def _forward(self, *args):
        from asr import cuda_attention

        cuda_attention.ENABLED = False
        try:
            return super()._forward(*args)
        finally:
            cuda_attention.ENABLED = True


def knockout(*drop: str):
    return type("Knockout_" + "_".join(drop), (Knockout,), {"drop": frozenset(drop)})


def time_decoder(dec, model, batch: int, steps: int, prompt: int = 46) -> tuple[float, float, list]:
    cache = [BatchKVCache([0] * batch) for _ in model.layers]
    emb = (mx.random.normal((batch, prompt, 1024), key=mx.random.key(batch)) * 0.05).astype(mx.bfloat16)
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

    f = mx.compile(one)
    x = mx.ones((batch, 1024), mx.bfloat16)
    for _ in range(4):
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

    f = mx.compile(one) if compiled_barrier else one
    for _ in range(3):
        mx.eval(f(x))
    t0 = time.perf_counter()
    for _ in range(steps):
        x = f(x)
        mx.async_eval(x)
    mx.eval(x)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--variants", type=int, default=4, help="how many of the step variants to time")
    ap.add_argument("--knockouts", nargs="*", default=[],
                    help="variants without parts: sdpa, manual (own attention), update, rope, norm, mask; join with +")
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__)
    model = L.build_llm(CONFIG)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    for n in (100, 400):
        print(f"chain of {n} rms_norm kernels: {tiny_chain(n, 20, True):.3f} ms ({tiny_chain(n, 20, True) / n * 1e3:.1f} us each)")
    variants = [("FastDecoder", L.FastDecoder), ("masked", Masked), ("masked-sdpa", MaskedSdpa),
                ("fused-kernel", FusedSingle), ("packed", PackedSingle), ("addmm+uint32", AddmmDecoder),
                ("qk-rope", QKRopeDecoder)][: a.variants]
    if a.knockouts:
        variants = [("FastDecoder", L.FastDecoder)] + [(k, knockout(*k.split("+"))) for k in a.knockouts]
    for b in a.batch:
        print(f"B={b} matmul chain (113 products + LM head): {matmul_chain(model, b, a.steps):.3f} ms/step")
        ref = None
        for name, cls in variants:
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
