"""End to end on long audio: `FunASRNano.transcribe` of one long file at several batch sizes, in one process.

The file is the given clips one after another, over and over, with 0.4-1.5 s of faint noise between them (dense
speech, as a meeting or a lecture), --minutes long. Each batch size transcribes the whole file once after a
warm-up on its first minute (with --cold: no such warm-up, only `model.warmup(largest batch size)`, as the
server does at start, and the file twice, so that any cost of a batch size's first use shows); printed: wall
time, real-time speed-up (RTFx), the segments VAD cut, the stage times the result reports, and MLX's peak memory
above the loaded model. Random weights never emit the end
token, so every segment decodes exactly --max-new-tokens tokens (repetition guard off): equal work at every
batch size.

    python3 -m benchmarks.long_audio --model /root/ck/full --clips a.wav b.wav [--minutes 10] [--batch 1 4 16 32]
        [--cold]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import tempfile
import time
from pathlib import Path

import asr
import mlx.core as mx
import numpy as np
import soundfile as sf

from asr.audio.io import SAMPLE_RATE as SR
from asr.audio.io import load_audio


def dense_speech(clips: list[str], minutes: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    speech = [load_audio(p).samples for p in clips]
    parts, n, total, k = [], 0, int(minutes * 60 * SR), 0
    while n < total:
        gap = np.zeros(int(rng.uniform(0.4, 1.5) * SR), np.float32)
        parts += [gap, speech[k % len(speech)]]
        n, k = n + len(gap) + len(speech[k % len(speech)]), k + 1
    x = np.concatenate(parts)[:total]
    return x + (5e-4 * rng.standard_normal(len(x))).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default=None, help="the LLM's dtype (default: load_model's for this device)")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up per batch size; the file twice (first use, then again)")
    a = ap.parse_args()
    model = asr.load_model(a.model, **({"dtype": a.dtype} if a.dtype else {}))
    t0 = time.perf_counter()
    model.warmup(max(a.batch))
    print(f"warmup({max(a.batch)}) {time.perf_counter() - t0:.2f} s")
    weights = mx.get_active_memory() / 2**20
    print(f"device {mx.default_device()}, mlx {mx.__version__}, weights {weights:.0f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        path, first = Path(tmp) / "long.wav", Path(tmp) / "first.wav"
        x = dense_speech(a.clips, a.minutes)
        sf.write(path, x, SR, subtype="PCM_16")
        sf.write(first, x[: 60 * SR], SR, subtype="PCM_16")
        print(f"{a.minutes:g} min of dense speech, {a.max_new_tokens} tokens a segment\n")
        print("| batch | wall | RTFx | segments | features | encoder | prefill | decode | peak above weights |")
        print("|---|---|---|---|---|---|---|---|---|")
        for b in a.batch:
            opts = dict(batch_size=b, max_new_tokens=a.max_new_tokens, repetition_guard=False, timestamps=False)
            if not a.cold:
                model.transcribe(str(first), **opts)  # warm-up (this batch size's shapes)
            for run in ("first use", "again") if a.cold else ("",):
                mx.synchronize()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                r = model.transcribe(str(path), **opts)
                wall = time.perf_counter() - t0
                t = r.timings
                label = f"{b} ({run})" if run else f"{b}"
                print(f"| {label} | {wall:.2f} s | {t.audio_duration_s / wall:.0f} | {len(r.segments)} | {t.features_s:.2f} s "
                      f"| {t.encoder_s:.2f} s | {t.prefill_s:.2f} s | {t.decode_s:.2f} s "
                      f"| {mx.get_peak_memory() / 2**20 - weights:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
