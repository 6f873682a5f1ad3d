"""Where a batch-of-one transcription's peak memory (MLX's allocator) comes from, stage by stage.

After load and warm-up, each stage of one clip is evaluated on its own with MLX's peak counter reset before it:
features, encoder, adaptor + prompt, prefill + decode. Printed: the stage's peak above the memory held before it,
and its time. Run for the audio path's products stored [in, out] (asr.linear_nn, the default on CUDA) and as
nn.Linear stores them, in one process.
Usage: python3 tools/gpu/probe_memory.py --model /root/ck/full --clip a.wav [--tokens 32]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import time

import asr
import mlx.core as mx

from asr import linear_nn
from asr.audio import load_audio
from asr.frontend import audio_token_count, features_padded
from asr.llm import greedy_decode_padded


def measure(a, samples, layout: bool) -> None:
    linear_nn.ENABLED = layout
    mx.clear_cache()
    model = asr.load_model(a.model, dtype="bfloat16")
    weights = mx.get_active_memory() / 2**20
    model.warmup()
    ids = model.prompt_ids("auto")
    llm = model.net.llm
    state: dict = {}

    def feats():
        state["f"], state["n"] = features_padded([samples], model.cfg.frontend)
        return state["f"]

    def prompt():
        rows = model.adapt(state["e"])
        state["p"], state["pl"] = model.prompt_batch(rows, [audio_token_count(state["n"][0])], ids)
        return state["p"]

    stages = {
        "features": feats,
        "encoder": lambda: state.__setitem__("e", model.encode(state["f"])) or state["e"],
        "adaptor+prompt": prompt,
        "prefill+decode": lambda: greedy_decode_padded(llm, state["p"], state["pl"], eos_ids=set(),
                                                       max_new_tokens=a.tokens, repetition_guard=False)[0].tokens,
    }
    print(f"\n== {'[in, out] (linear_nn)' if layout else 'nn.Linear [out, in]'}: weights {weights:.0f} MB")
    for name, fn in stages.items():
        peaks, times = [], []
        for _ in range(a.repeats):
            mx.synchronize()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            out = fn()
            if isinstance(out, mx.array):
                mx.eval(out)
            times.append((time.perf_counter() - t0) * 1e3)
            peaks.append((mx.get_peak_memory() - before) / 2**20)
        print(f"{name:16s} peak above held: {max(peaks):7.1f} MB (runs {[round(p, 1) for p in peaks]}), "
              f"time {min(times):7.2f} ms", flush=True)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        e = model.encode(state["f"])
        prompts, lengths = model.prompt_batch(model.adapt(e), [audio_token_count(state["n"][0])], ids)
        greedy_decode_padded(llm, prompts, lengths, eos_ids=set(), max_new_tokens=a.tokens, repetition_guard=False)
    print(f"whole clip x{a.repeats}: peak {mx.get_peak_memory() / 2**20:.0f} MB, "
          f"{(time.perf_counter() - t0) / a.repeats * 1e3:.1f} ms a clip")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clip", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    samples = load_audio(a.clip).samples
    for layout in (True, False):
        measure(a, samples, layout)
        mx.synchronize()

if __name__ == "__main__":
    main()
