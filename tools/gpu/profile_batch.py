"""Where a batch of segments spends its time on a CUDA GPU: GPU kernel time against wall time per stage (CUPTI).

For --segments rows (the clips repeated), each stage of the batched path evaluated and synced on its own under
torch.profiler's CUPTI tracing: features (with the host-to-device copy of the padded waveforms apart), encoder
(each --encoder-dtypes), adaptor + prompts, prefill (one new token) and prefill + decode (--tokens). Then an A/B of
asr.cuda_encoder's kernels against MLX's operations at several batch sizes (encoder only, synced, median).
Usage:
  python3 tools/gpu/profile_batch.py --model /root/ck/full --clips a.wav b.wav [--segments 64] [--tokens 32]
"""

from __future__ import annotations  # noqa: I001  (asr before mlx: it picks the BLAS before MLX loads)

import argparse
import tempfile

from common import median_ms, profiled

import asr
import mlx.core as mx
import numpy as np

from asr import cuda_encoder
from asr.audio import load_audio
from asr.frontend import audio_token_count, fbank, features_padded
from asr.llm import greedy_decode_padded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--encoder-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--ab-batches", type=int, nargs="*", default=[1, 8, 16, 64])
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__, flush=True)
    models = {d: asr.load_model(a.model, dtype="bfloat16", encoder_dtype=d) for d in a.encoder_dtypes}
    model = models[a.encoder_dtypes[0]]
    model.warmup()
    llm = model.net.llm
    ids = model.prompt_ids("auto")
    audios = [load_audio(p) for p in a.clips]
    segs = [audios[i % len(audios)].samples for i in range(a.segments)]
    feats, lengths = features_padded(segs, model.cfg.frontend)
    valid = mx.array(lengths)
    enc = model.encode(feats, valid)
    counts = [audio_token_count(n) for n in lengths]
    prompts, plens = model.prompt_batch(model.adapt(enc, valid), counts, ids)
    mx.eval(prompts)
    width = max(s.shape[0] for s in segs)
    padded = np.zeros((len(segs), width), dtype=np.float32)
    for row, s in zip(padded, segs, strict=True):
        row[: s.shape[0]] = s
    on_device = mx.array(padded)
    mx.eval(on_device)

    def decode(tokens: int):
        return lambda: greedy_decode_padded(llm, prompts, plens, eos_ids=set(), max_new_tokens=tokens,
                                            repetition_guard=False)

    stages = {
        "host-to-device copy of the waveforms": lambda: mx.eval(mx.array(padded)),
        "fbank of device waveforms": lambda: mx.eval(fbank(on_device, model.cfg.frontend)),
        "features_padded": lambda: mx.eval(features_padded(segs, model.cfg.frontend)[0]),
        **{f"encoder {d}": (lambda m=m: mx.eval(m.encode(feats, valid))) for d, m in models.items()},
        "adaptor+prompts": lambda: mx.eval(model.prompt_batch(model.adapt(enc, valid), counts, ids)[0]),
        "prefill (1 token)": decode(1),
        f"prefill+decode ({a.tokens} tokens)": decode(a.tokens),
    }
    print(f"{a.segments} segments, L={feats.shape[1]}, prompt length {max(plens)}", flush=True)
    for name, fn in stages.items():
        print(f"{name:36s} median {median_ms(fn, a.repeats):8.2f} ms", flush=True)
    tdir = tempfile.mkdtemp()
    for name, fn in stages.items():
        profiled(name, fn, tdir, a.top)

    print("\n== A/B: asr.cuda_encoder kernels (on) against MLX operations (off), encoder only, median ms", flush=True)
    cuda_encoder.MAX_BATCH = {mx.float32: 1 << 30, mx.bfloat16: 1 << 30}
    for b in a.ab_batches:
        f, v = feats[:b], (valid[:b] if b > 1 else None)
        for d, m in models.items():
            res = {}
            for enabled in (False, True):
                cuda_encoder.ENABLED = enabled
                res[enabled] = median_ms(lambda m=m, f=f, v=v: m.encode(f, v), a.repeats)
            print(f"batch {b:3d} {d:9s}: off {res[False]:8.2f}  on {res[True]:8.2f}", flush=True)


if __name__ == "__main__":
    main()
