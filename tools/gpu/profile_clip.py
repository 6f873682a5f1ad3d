"""Where one clip's time goes on a CUDA GPU: GPU kernel time against wall time, per stage, through CUPTI.

torch.profiler's CUPTI tracing records every kernel and CUDA API call of the process, MLX's included (both use
the device's primary context). For each stage of one clip at batch 1 (features, encoder, adaptor + prompt,
prefill, decode of --tokens tokens), evaluated and synced on its own:
  wall     the stage's wall time (host start to sync)
  kernels  how many kernels ran, busy = their union on the GPU timeline, span = first start to last end
  api      the CUDA runtime/driver calls by total host time (graph instantiate/update/launch, syncs, ...)
busy << wall means the stage waits on the host (per-kernel cost in MLX or the driver), busy ~ wall means the GPU
is the bound. Also: the same clip timed without the profiler, stage by stage and in one pass, and the GPU clocks.
Usage: python3 tools/gpu/profile_clip.py --model /root/ck/full --clip a.wav [--tokens 32] [--trace DIR]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict

from common import profiled

import asr
import mlx.core as mx

from asr.audio import load_audio
from asr.frontend import audio_token_count, features_padded
from asr.llm import greedy_decode_padded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clip", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--encoder-dtype", default="float32")
    ap.add_argument("--trace", default=None, help="keep the chrome traces in this folder")
    a = ap.parse_args()
    import torch

    print("device", mx.default_device(), "mlx", mx.__version__, "torch", torch.__version__, flush=True)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,pstate,power.draw,utilization.gpu",
                            "--format=csv,noheader", "-lms", "200"], stdout=open(smi_log := tempfile.mktemp(), "w"))
    model = asr.load_model(a.model, dtype="bfloat16", encoder_dtype=a.encoder_dtype)
    model.warmup()
    llm = model.net.llm
    ids = model.prompt_ids("auto")
    samples = load_audio(a.clip).samples

    def front():
        feats, lengths = features_padded([samples], model.cfg.frontend)
        mx.eval(feats)
        return feats, lengths

    feats, lengths = front()
    enc = model.encode(feats)
    mx.eval(enc)
    rows = model.adapt(enc)
    prompts, plens = model.prompt_batch(rows, [audio_token_count(lengths[0])], ids)
    mx.eval(prompts)

    stages = {
        "features": lambda: mx.eval(features_padded([samples], model.cfg.frontend)[0]),
        "encoder": lambda: mx.eval(model.encode(feats)),
        "adaptor+prompt": lambda: mx.eval(model.prompt_batch(model.adapt(enc), [audio_token_count(lengths[0])],
                                                             ids)[0]),
        "prefill+decode": lambda: greedy_decode_padded(llm, prompts, plens, eos_ids=set(), max_new_tokens=a.tokens,
                                                       repetition_guard=False),
    }
    # without the profiler: each stage alone, then the benchmark's per-clip path and the one-pass path
    for name, fn in stages.items():
        fn()
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            r = fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        extra = ""
        if name == "prefill+decode":
            extra = f" (prefill {r[0].prefill_s * 1e3:.2f} ms, decode {r[0].decode_s * 1e3:.2f} ms)"
        print(f"{name:16s} median {statistics.median(ts):8.2f} ms  min {min(ts):8.2f}{extra}", flush=True)

    def per_clip(timed: bool):
        t = defaultdict(float)
        t0 = time.perf_counter()
        ps, pl, _, _ = model.batch_prompts([samples], ids, t if timed else None)
        out = greedy_decode_padded(llm, ps, pl, eos_ids=set(), max_new_tokens=a.tokens, repetition_guard=False)
        return (time.perf_counter() - t0) * 1e3, dict(t), out[0]

    for timed in (True, False):
        per_clip(timed)
        runs = [per_clip(timed) for _ in range(a.repeats)]
        tot = statistics.median(r[0] for r in runs)
        print(f"per clip, {'stage syncs' if timed else 'one pass   '}: median {tot:8.2f} ms  all "
              f"{[round(r[0], 1) for r in runs]}", flush=True)

    # A/B: the one-launch decode step against the fused five-kernels-a-layer step
    from asr import cuda_persistent

    for enabled in (False, True):
        cuda_persistent.ENABLED = enabled
        llm._fast_decoder = None
        per_clip(False)
        runs = [per_clip(False) for _ in range(a.repeats)]
        dec = statistics.median(r[2].decode_s for r in runs) * 1e3
        print(f"PersistentStep {'on ' if enabled else 'off'}: per clip median {statistics.median(r[0] for r in runs):8.2f} ms,"
              f" decode {dec:.2f} ms ({(a.tokens - 1) / dec * 1e3:.0f} tok/s), {type(llm._fast_decoder._fused_step).__name__}",
              flush=True)

    # with the profiler
    tdir = a.trace or tempfile.mkdtemp()
    os.makedirs(tdir, exist_ok=True)
    report = {}
    for name, fn in [*stages.items(), ("per clip (stage syncs)", lambda: per_clip(True))]:
        report[name] = profiled(name, fn, tdir, a.top)
    smi.terminate()
    clocks = open(smi_log).read().strip().splitlines()
    print("\nnvidia-smi samples (first, middle, last):", clocks[:1], clocks[len(clocks) // 2: len(clocks) // 2 + 1],
          clocks[-1:])
    if a.trace:
        json.dump(report, open(os.path.join(tdir, "summary.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
