"""Where the peak memory of one clip's transcription sits, stage by stage (MLX's allocator counters).

For each clip, after the model is loaded and warmed up: the peak of `transcribe()` alone (the counter reset just
before), then the same clip's stages one by one (features + encoder + adaptor, then prefill + decode), each with
the counter reset before it, reported above the memory that was active when it started.

    python -m benchmarks.peak_memory --model DIR [--mode bf16] [--clips A.wav B.wav] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "cpu", "cuda"])
    ap.add_argument("--clips", nargs="+", default=[str(TESTDATA / "en" / "jfk.wav"),
                                                   str(TESTDATA / "zh" / "example_zh.wav")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--inflight-layers", type=int, nargs="+", default=[None],
                    help="asr.RuntimeOptions.inflight_layers values to measure in turn (default: the option's default)")
    a = ap.parse_args()

    import asr  # noqa: I001  (first: picks the BLAS before MLX loads)
    import mlx.core as mx

    results = []
    for layers in a.inflight_layers:
        opts = {"backend": a.backend} | ({} if layers is None else {"inflight_layers": layers})
        runtime = asr.RuntimeOptions(**opts)
        model = asr.load_model(a.model, dtype=a.dtype, runtime=runtime)
        results.append({"inflight_layers": runtime.inflight_layers, **measure(model, a)})
        del model
        mx.clear_cache()
    print(json.dumps(results if len(results) > 1 else results[0], indent=1))


def measure(model, a) -> dict:
    import mlx.core as mx

    from asr.audio.io import load_audio
    from asr.decode.loop import greedy

    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    model.warmup()
    out = {"runtime": model.runtime.info.model_dump(), "weights_mb": mb(mx.get_active_memory()), "clips": []}
    ids = model.prompt_ids()
    for path in a.clips:
        audio = load_audio(path)
        rows = []
        for _ in range(a.repeats + 1):  # the first is a warm-up of this clip's shapes
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            model.transcribe(path, max_new_tokens=a.max_new_tokens)
            row = {"transcribe_peak_mb": mb(mx.get_peak_memory()), "above_mb": mb(mx.get_peak_memory() - base)}
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            emb, lengths, enc, _ = model.batch_prompts([audio.samples], ids)
            mx.eval(emb, enc)
            row["front_above_mb"] = mb(mx.get_peak_memory() - base)
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            greedy(model.runtime.llm, emb, lengths, eos_ids=model.eos_ids, max_new_tokens=a.max_new_tokens)
            mx.synchronize()
            row["llm_above_mb"] = mb(mx.get_peak_memory() - base)
            row["held_after_mb"] = mb(mx.get_active_memory())
            del emb, enc
            rows.append(row)
        out["clips"].append({"clip": Path(path).name, "runs": rows[1:]})
    return out


if __name__ == "__main__":
    main()
