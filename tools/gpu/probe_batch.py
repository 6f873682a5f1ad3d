"""Where a batch of segments spends its time on a GPU: each stage of the batched path timed on its own (synced).

For a checkpoint and clips repeated to --segments rows: features, encoder, adaptor, prompt building, prefill and
decode, median of --repeats after a warm-up, for the encoder in fp32 and in bf16 and for two decode steps
(asr.cuda_rows.PersistentRows, asr.cuda_decode.RowsStep with each --attend-par, the masked MLX step; tokens compared
with the first's). Then the whole batch end to end, as examples/benchmark.py times it.
Usage:
  python3 tools/gpu/probe_batch.py --model /root/ck/full --clips a.wav b.wav [--segments 64] [--tokens 32]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import statistics
import time

import asr
import mlx.core as mx

from asr import cuda_decode, cuda_rows, inflight
from asr.audio import load_audio
from asr.frontend import audio_token_count, features_padded
from asr.llm import greedy_decode_padded, last_logits, prefill_cache


def peak_from_here():
    """A function giving the MB MLX's peak rose above what is held now (the peak counter is reset here)."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    return lambda: (mx.get_peak_memory() - base) / 2**20


def timed(fn, repeats: int) -> tuple[float, object, float]:
    """Median ms of fn (after a warm-up), its output, and the MB its runs held above what was held before them."""
    peak = peak_from_here()
    out = fn()  # warm-up (traces, compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out, peak()


def prefill(llm, prompts: mx.array, lengths: list[int]) -> mx.array:
    """The LLM's prefill of a left-padded batch into a fresh cache, as greedy_decode_padded starts it."""
    cache = prefill_cache(llm, [prompts.shape[1] - n for n in lengths])
    return last_logits(llm, mx.zeros(prompts.shape[:2], dtype=mx.int32), cache, prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--segments", type=int, nargs="+", default=[64])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoder-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--attend-par", type=int, nargs="+", default=[cuda_decode.ROWS_ATTEND_PAR],
                    help="RowsStep's attention: key/value positions a warp loads at a time (cuda_decode.ROWS_ATTEND_PAR)")
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__)
    models = {d: asr.load_model(a.model, dtype="bfloat16", encoder_dtype=d) for d in a.encoder_dtypes}
    model = models[a.encoder_dtypes[0]]
    ids = model.prompt_ids("auto")
    audios = [load_audio(p) for p in a.clips]
    for n in a.segments:
        segs = [audios[i % len(audios)] for i in range(n)]
        audio_s = sum(s.duration_s for s in segs)
        print(f"\n== {n} segments, {audio_s:.1f} s of audio")
        ms, (feats, lengths), mb = timed(
            lambda segs=segs: features_padded([s.samples for s in segs], model.cfg.frontend), a.repeats)
        print(f"features_padded       {ms:8.2f} ms   peak +{mb:7.0f} MB   (L={feats.shape[1]})")
        valid = mx.array(lengths)
        enc = None
        for dtype, m in models.items():
            ms, out, mb = timed(lambda m=m, f=feats, v=valid: m.encode(f, v), a.repeats)
            enc = out if enc is None else enc
            print(f"encoder {dtype:9s}     {ms:8.2f} ms   peak +{mb:7.0f} MB")
        ms, rows, mb = timed(lambda e=enc, v=valid: model.adapt(e, v), a.repeats)
        print(f"adaptor               {ms:8.2f} ms   peak +{mb:7.0f} MB")
        counts = [audio_token_count(x) for x in lengths]
        ms, (prompts, plens), mb = timed(lambda r=rows, c=counts: model.prompt_batch(r, c, ids), a.repeats)
        print(f"prompt_batch          {ms:8.2f} ms   peak +{mb:7.0f} MB")
        llm = model.net.llm
        for budget in (inflight.BUDGET_BYTES, 0, inflight.BUDGET_BYTES):  # with the in-flight bound, without, with
            inflight.BUDGET_BYTES, kept = budget, inflight.BUDGET_BYTES
            ms, _, mb = timed(lambda m=llm, p=prompts, q=plens: prefill(m, p, q), a.repeats)
            inflight.BUDGET_BYTES = kept
            print(f"prefill, bound {budget >> 20:4d} MB {ms:8.2f} ms   peak +{mb:7.0f} MB (cache included)")
        default_par = cuda_decode.ROWS_ATTEND_PAR
        # PersistentRows only where it runs: up to MAX_ROWS rows, on a device and model it takes (elsewhere the
        # variant would run another step under its name)
        one_launch_fits = n <= cuda_rows.MAX_ROWS and cuda_rows.make_possible(llm)
        variants = ([("PersistentRows", True, default_par, True)] * one_launch_fits
                    + [(f"RowsStep par{p}", True, p, False) for p in a.attend_par]
                    + [("masked MLX step", False, default_par, False)])
        first = None
        for name, enabled, par, one_launch in variants:
            cuda_decode.ENABLED, cuda_decode.ROWS_ATTEND_PAR, cuda_rows.ENABLED = enabled, par, one_launch
            llm._fast_decoder = None
            peak = peak_from_here()
            runs = [greedy_decode_padded(llm, prompts, plens, eos_ids=set(), max_new_tokens=a.tokens,
                                         repetition_guard=False) for _ in range(a.repeats + 1)][1:]
            pre = statistics.median(r[0].prefill_s for r in runs) * 1e3
            dec = statistics.median(r[0].decode_s for r in runs) * 1e3
            tokens = [t.tokens for t in runs[0]]
            first = first or tokens
            same = sum(x == y for r, q in zip(tokens, first, strict=True) for x, y in zip(r, q, strict=False))
            print(f"decode {name:16s} prefill {pre:7.2f} ms, decode {dec:8.2f} ms "
                  f"({(a.tokens - 1) / dec * 1e3:.0f} steps/s, {dec / (a.tokens - 1):.2f} ms a step), "
                  f"tokens equal to the first variant's: {same}/{sum(len(q) for q in first)}, "
                  f"peak +{peak():.0f} MB")
        cuda_decode.ENABLED, cuda_decode.ROWS_ATTEND_PAR, cuda_rows.ENABLED = True, default_par, True
        if one_launch_fits:  # PersistentRows phase by phase (its last step; in-kernel marks)
            cuda_rows.TIMING = 1
            llm._fast_decoder = None
            greedy_decode_padded(llm, prompts, plens, eos_ids=set(), max_new_tokens=a.tokens, repetition_guard=False)
            cuda_rows.TIMING = 0
            t = llm._fast_decoder._rows_one.times.tolist()
            d = [(y - x) / 1e3 for x, y in zip(t, t[1:], strict=False)]
            layers = (len(t) - 3) // len(cuda_rows.PHASES)
            per = {p: sum(d[1 + i * len(cuda_rows.PHASES) + k] for i in range(layers))
                   for k, p in enumerate(cuda_rows.PHASES)}
            print(f"PersistentRows phases (us a step, phase + its barrier): start {d[0]:.1f}, "
                  + ", ".join(f"{p} {v:.0f}" for p, v in per.items()) + f", head {d[-1]:.1f}; "
                  f"kernel {(t[-1] - t[0]) / 1e3:.0f}")
        llm._fast_decoder = None
        for dtype, m in models.items():

            def whole(m=m, segs=segs):
                t0 = time.perf_counter()
                ps, pl, _, _ = m.batch_prompts([s.samples for s in segs], ids)
                mx.eval(ps)
                front = time.perf_counter() - t0
                greedy_decode_padded(m.net.llm, ps, pl, eos_ids=set(), max_new_tokens=a.tokens, repetition_guard=False)
                return time.perf_counter() - t0, front

            peak = peak_from_here()
            whole()
            best = min((whole() for _ in range(a.repeats)), key=lambda t: t[0])
            print(f"whole batch, encoder {dtype}: {best[0] * 1e3:.1f} ms (front {best[1] * 1e3:.1f} ms), "
                  f"RTFx {audio_s / best[0]:.0f}, peak +{peak():.0f} MB")


if __name__ == "__main__":
    main()
