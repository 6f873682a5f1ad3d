"""Benchmark funasr-nano-mlx stage by stage, optionally side by side with the official funasr (PyTorch) code.

    python benchmarks/benchmark.py --model DIR [--modes fp32 bf16 q8 q4] [--clips A.wav ...] [--max-new-tokens 32]
        [--backend auto|mlx|cpu|cuda] [--no-one-launch] [--no-encoder-kernels]
        [--official --official-python .venv-ref/bin/python --official-device cpu|cuda --official-dtypes fp32 bf16]
        [--batch 64] [--json out.json]

--backend, --no-one-launch and --no-encoder-kernels choose the runners (asr.RuntimeOptions), so a backend's fast paths are measured
against the reference MLX backend with the same command.

Each mode (LLM dtype / quantization / encoder dtype) and each official run goes in its own subprocess, so load
time, peak memory and resident memory are per mode. Per clip and stage it reports the median of --repeats runs
after one untimed warm-up call: audio decode, features, encoder, adaptor (+ prompt splice), prefill, decode, and
the clip total; then prefill and decode tok/s, real-time factor, load time (conversion or quantization the first
time, cached afterwards), memory, and each mode's agreement with the fp32 model (teacher-forced top-1 agreement
and logit cosine over the fp32 model's greedy tokens). `--batch N` adds batched throughput over N segments.

Random-weight checkpoints (tools/checkpoint.py writes checkpoint_info.json) decode exactly --max-new-tokens
tokens on both sides: ours ignores EOS and the repetition guard, the official run gets min_new_tokens (EOS
suppressed), so both do identical work. The official side never imports this package (nor MLX); ours never
imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_CLIPS = ["audio/en/jfk.wav", "audio/zh/example_zh.wav"]
MODES = {  # name -> load_model arguments
    "fp32": {"dtype": "float32", "quantize": None, "encoder_dtype": "float32"},
    "bf16": {"dtype": "bfloat16", "quantize": None, "encoder_dtype": "float32"},
    "bf16-enc16": {"dtype": "bfloat16", "quantize": None, "encoder_dtype": "bfloat16"},
    "q8": {"dtype": "bfloat16", "quantize": 8, "encoder_dtype": "float32"},
    "q4": {"dtype": "bfloat16", "quantize": 4, "encoder_dtype": "float32"},
    "q4-enc16": {"dtype": "bfloat16", "quantize": 4, "encoder_dtype": "bfloat16"},
}
STAGES = ["audio_decode_s", "features_s", "encoder_s", "adaptor_s", "prefill_s", "decode_s", "total_s"]


# --- shared helpers --------------------------------------------------------------------------------------
def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB (Linux /proc; 0 elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def _median_stages(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def _with_rates(med: dict, duration_s: float) -> dict:
    """Median stages plus duration, real-time factor and tok/s (the first new token comes out of the prefill:
    decode time covers the other new_tokens - 1)."""
    med["duration_s"] = duration_s
    med["rtf"] = med["total_s"] / duration_s
    med["prefill_tok_s"] = med["prompt_tokens"] / med["prefill_s"]
    med["decode_tok_s"] = (med["new_tokens"] - 1) / med["decode_s"] if med["decode_s"] > 0 else 0.0
    return med


def _merge_rounds(group: list[dict]) -> dict:
    """One mode's results of several rounds as one: per clip, the median over every round's runs (ours adds the
    audio decode, timed once per process, to each total) and each round's own median total."""
    merged = json.loads(json.dumps(group[0]))
    for ci, clip in enumerate(merged["clips"]):
        rounds = [r["clips"][ci] for r in group]
        runs = [run for c in rounds for run in c["runs"]]
        med = _median_stages(runs)
        if merged["side"] == "ours":
            med["audio_decode_s"] = clip["stages"]["audio_decode_s"]
            med["total_s"] += med["audio_decode_s"]
        _with_rates(med, clip["stages"]["duration_s"])
        clip.update(stages=med, runs=runs, round_totals=[c["stages"]["total_s"] for c in rounds])
    merged["rounds"] = len(group)
    return merged


def _is_random_checkpoint(model: str) -> bool:
    p = Path(model)
    return (p / "checkpoint_info.json").is_file() or (p / "model" / "checkpoint_info.json").is_file()


# --- our side (one mode per process) ---------------------------------------------------------------------
def worker_ours(a: argparse.Namespace) -> dict:
    import asr  # noqa: I001  (first: picks the BLAS before MLX loads)
    import mlx.core as mx
    import numpy as np

    from asr.audio.io import load_audio
    from asr.backends.cpu import blas_load
    from asr.decode.loop import greedy
    from asr.loading.checkpoint import MLX_CONFIG, converted_dir_for, resolve
    from asr.model.llm import teacher_forced_logits

    mode = MODES[a.mode]
    runtime = asr.RuntimeOptions(backend=a.backend, cuda_one_launch=a.one_launch,
                                 cuda_encoder_kernels=a.encoder_kernels,
                                 **({} if a.inflight_layers is None else {"inflight_layers": a.inflight_layers}))
    variant = "" if (a.backend, a.one_launch, a.encoder_kernels) == ("auto", True, True) else (
        f"/{a.backend}" + ("" if a.one_launch else "-multi") + ("" if a.encoder_kernels else "-mlxenc"))
    if a.inflight_layers is not None:
        variant += f"/inflight-layers-{a.inflight_layers}"
    res: dict = {"side": "ours", "mode": a.mode + variant, **mode, "options": runtime.as_dict(),
                 "device": str(mx.default_device()), "mlx": mx.__version__, "blas": blas_load.loaded,
                 "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "FUNASR_NANO_BLAS"))}}
    src = resolve(a.model)
    conv = converted_dir_for(src.path) if src.kind == "official" else src.path
    res["converted_before"] = (conv / MLX_CONFIG).is_file()
    qfiles = lambda: sorted(p.name for p in conv.glob("llm-q*.safetensors"))  # noqa: E731
    q_before = qfiles()

    t0 = time.perf_counter()
    model = asr.load_model(a.model, **mode, runtime=runtime)
    res["load_s"] = time.perf_counter() - t0
    res["runtime"] = model.runtime.info.model_dump()
    res["load_kind"] = ("first (conversion)" if not res["converted_before"] else
                        "first (quantization)" if mode["quantize"] and qfiles() != q_before else "cached")
    if a.load_twice:  # the second load is the cached one
        del model
        mx.clear_cache()
        t0 = time.perf_counter()
        model = asr.load_model(a.model, **mode, runtime=runtime)
        res["load_cached_s"] = time.perf_counter() - t0
    res["weights_mb"] = mx.get_active_memory() / 2**20
    t0 = time.perf_counter()
    model.warmup()
    res["warmup_s"] = time.perf_counter() - t0
    mx.reset_peak_memory()

    llm = model.net.llm
    ids = model.prompt_ids()
    eos = set() if a.ignore_eos else model.eos_ids

    def run_clip(samples: np.ndarray) -> tuple[dict, list[int], mx.array]:  # what transcribe does for one pass
        t: dict = {"features_s": 0.0, "encoder_s": 0.0, "adaptor_s": 0.0}
        t_start = time.perf_counter()
        emb, lengths, _, _ = model.batch_prompts([samples], ids, t)
        out = greedy(model.runtime.llm, emb, lengths, eos_ids=eos, max_new_tokens=a.max_new_tokens,
                     repetition_guard=not a.ignore_eos)[0]
        t.update(prefill_s=out.prefill_s, decode_s=out.decode_s, prompt_tokens=out.prompt_tokens,
                 new_tokens=len(out.tokens))
        t["total_s"] = time.perf_counter() - t_start
        return t, out.tokens, emb

    clips = []
    for path in a.clips:
        audio = load_audio(path)
        for _ in range(a.warmup):  # warm-up for this shape (compiles; lets the clocks settle)
            run_clip(audio.samples)
        runs, tokens, emb = [], None, None
        for _ in range(a.repeats):
            t, tokens, emb = run_clip(audio.samples)
            runs.append(t)
        med = _median_stages(runs)
        med["audio_decode_s"] = audio.decode_s
        med["total_s"] += audio.decode_s
        _with_rates(med, audio.duration_s)
        clip = {"clip": Path(path).name, "stages": med, "tokens": tokens, "runs": runs}
        if a.agreement_dir:
            clip["agreement"] = _agreement(a, Path(path).stem, llm, emb, tokens, teacher_forced_logits)
        clips.append(clip)
    res["clips"] = clips
    res["peak_batch1_mb"] = mx.get_peak_memory() / 2**20
    res["rss_batch1_mb"] = _rss_mb()[0]

    peak = mx.get_peak_memory()  # the running peak over every stage (the counter is reset for each batch size)
    if a.batch:
        res["batch"] = []
        for n in a.batch:
            mx.reset_peak_memory()
            audios = [load_audio(p) for p in a.clips]
            segs = [audios[i % len(audios)] for i in range(n)]

            def run_batch(segs=segs, n=n):  # what FunASRNano._decode_batch does for a batch of segments
                t0 = time.perf_counter()
                prompts, prompt_lengths, _, _ = model.batch_prompts([s.samples for s in segs], ids)
                mx.eval(prompts)
                t_front = time.perf_counter() - t0
                outs = greedy(model.runtime.llm, prompts, prompt_lengths, eos_ids=eos,
                              max_new_tokens=a.max_new_tokens, repetition_guard=not a.ignore_eos)
                wall = time.perf_counter() - t0
                return {"segments": n, "audio_s": sum(s.duration_s for s in segs), "wall_s": wall,
                        "frontend_encoder_adaptor_s": t_front, "prefill_s": outs[0].prefill_s,
                        "decode_s": outs[0].decode_s, "new_tokens": sum(len(o.tokens) for o in outs),
                        "steps": max(len(o.tokens) for o in outs)}

            for _ in range(a.warmup):  # warm-up (compiles this batch size)
                run_batch()
            b = min((run_batch() for _ in range(max(1, a.repeats))), key=lambda r: r["wall_s"])
            b["rtfx"] = b["audio_s"] / b["wall_s"]
            b["decode_tok_s"] = (b["new_tokens"] - n) / b["decode_s"]
            b["decode_steps_s"] = (b["steps"] - 1) / b["decode_s"]
            b["peak_mb"] = mx.get_peak_memory() / 2**20  # this batch size's warm-up and runs
            peak = max(peak, mx.get_peak_memory())
            res["batch"].append(b)

    res["peak_mb"] = max(peak, mx.get_peak_memory()) / 2**20
    res["active_mb"] = mx.get_active_memory() / 2**20
    res["rss_mb"], res["rss_peak_mb"] = _rss_mb()
    return res


def _agreement(a, name: str, llm, emb, tokens: list[int], teacher_forced_logits) -> dict:
    """fp32 mode: store its greedy tokens and teacher-forced logits. Other modes: compare against them."""
    import mlx.core as mx
    import numpy as np

    ref = Path(a.agreement_dir) / f"{name}.npz"
    if a.mode == "fp32":
        logits = np.array(teacher_forced_logits(llm, emb, tokens))
        np.savez(ref, tokens=np.array(tokens), logits=logits)
        return {"reference": True}
    if not ref.is_file():
        return {}
    d = np.load(ref)
    gold = d["tokens"].tolist()
    ours = np.array(teacher_forced_logits(llm, emb, gold).astype(mx.float32))
    base = d["logits"]
    cos = (ours * base).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(base, axis=-1))
    same = next((i for i, (x, y) in enumerate(zip(tokens, gold, strict=False)) if x != y), min(len(tokens), len(gold)))
    return {"top1_agreement": float((ours.argmax(-1) == base.argmax(-1)).mean()), "logit_cosine_mean": float(cos.mean()),
            "logit_cosine_min": float(cos.min()), "greedy_prefix_equal": same, "greedy_len": len(gold)}


# --- the official side (runs under the reference Python: torch + funasr, never this package) -------------
def worker_official(a: argparse.Namespace) -> dict:
    import logging

    import funasr
    import funasr.models.fun_asr_nano.model as nano_module
    import soundfile
    import torch
    from funasr import AutoModel

    logging.getLogger().setLevel(logging.ERROR)
    cuda = a.official_device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:
        torch.set_num_threads(a.threads)
    res: dict = {"side": "official", "mode": f"official-{a.official_dtype}", "device": a.official_device,
                 "funasr": funasr.__version__, "torch": torch.__version__, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    am = AutoModel(model=a.model, device=a.official_device, disable_update=True, disable_pbar=True,
                   frontend_conf={"dither": 0.0}, ncpu=a.threads, log_level="ERROR")
    sync()
    res["load_s"] = time.perf_counter() - t0
    res["load_kind"] = "torch.load + build"
    model = am.model
    t: dict = {}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            sync()
            t[key] = t.get(key, 0.0) + time.perf_counter() - t0
            return out

        setattr(owner, name, wrapper)

    timed(nano_module, "load_audio_text_image_video", "audio_decode_s")
    timed(nano_module, "extract_fbank", "features_s")
    def hooks(module, key):  # hooks must return None (a pre-hook's return value would replace the inputs)
        def before(m, args):
            sync()
            t["_" + key] = time.perf_counter()

        def after(m, args, out):
            sync()
            t[key] = t.get(key, 0.0) + time.perf_counter() - t.pop("_" + key)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    hooks(model.audio_encoder, "encoder_s")
    hooks(model.audio_adaptor, "adaptor_s")

    def first_logits(m, args, out):
        if "_gen0" in t and "prefill_s" not in t:
            sync()
            t["prefill_s"] = time.perf_counter() - t["_gen0"]

    model.llm.lm_head.register_forward_hook(first_logits)
    generate = model.llm.generate

    def gen(*args, **kwargs):
        sync()
        t["_gen0"] = time.perf_counter()
        out = generate(*args, **kwargs)
        sync()
        t["generate_s"] = time.perf_counter() - t.pop("_gen0")
        t["new_tokens"] = int(out.shape[-1])
        t["prompt_tokens"] = int(kwargs["inputs_embeds"].shape[1])
        return out

    model.llm.generate = gen
    opts = {"max_length": a.max_new_tokens, "llm_dtype": a.official_dtype}
    if a.ignore_eos:
        opts["llm_kwargs"] = {"min_new_tokens": a.max_new_tokens}

    def run(samples) -> dict:
        t.clear()
        t0 = time.perf_counter()
        am.generate(input=samples, **opts)
        sync()
        out = {k: v for k, v in t.items() if not k.startswith("_")}
        out["total_s"] = time.perf_counter() - t0
        out["decode_s"] = out["generate_s"] - out["prefill_s"]
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clips = []
    for path in a.clips:
        for _ in range(a.warmup):  # warm-up (also the first-call bf16 splice quirk, spec §12)
            run(path)
        runs = [run(path) for _ in range(a.repeats)]
        med = _median_stages(runs)
        _with_rates(med, soundfile.info(path).duration)
        clips.append({"clip": Path(path).name, "stages": med, "runs": runs})
    res["clips"] = clips
    if cuda:
        res["peak_batch1_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["rss_batch1_mb"] = _rss_mb()[0]

    peak = torch.cuda.max_memory_allocated() if cuda else 0  # the running peak (the counter is reset a batch size)
    if a.batch:
        res["batch"] = []
        for n in a.batch:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            segs = [a.clips[i % len(a.clips)] for i in range(n)]
            for _ in range(a.warmup):
                am.generate(input=segs, batch_size=n, **opts)
            walls = []
            for _ in range(max(1, a.repeats)):
                t.clear()
                sync()
                t0 = time.perf_counter()
                am.generate(input=segs, batch_size=n, **opts)
                sync()
                walls.append(time.perf_counter() - t0)
            audio_s = sum(soundfile.info(s).duration for s in segs)
            res["batch"].append({"segments": n, "audio_s": audio_s, "wall_s": min(walls), "rtfx": audio_s / min(walls),
                                 "new_tokens": t.get("new_tokens", 0) * n})
            if cuda:
                res["batch"][-1]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                peak = max(peak, torch.cuda.max_memory_allocated())

    res["rss_mb"], res["rss_peak_mb"] = _rss_mb()
    if cuda:
        res["peak_mb"] = max(peak, torch.cuda.max_memory_allocated()) / 2**20
    return res


# --- orchestration and reporting -------------------------------------------------------------------------
def _save(results: list[dict], a: argparse.Namespace) -> None:
    if a.json:
        a.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))


def _spawn(python: str, argv: list[str], out: Path, env: dict | None = None) -> dict | None:
    cmd = [python, str(Path(__file__).resolve()), *argv, "--_out", str(out)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0 or not out.is_file():
        print(f"  ! run failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def report(results: list[dict], a: argparse.Namespace) -> str:
    ours = [r for r in results if r["side"] == "ours"]
    official = [r for r in results if r["side"] == "official"]
    base = official[0] if official else None
    lines = []
    names = [r["mode"] for r in ours] + [r["mode"] for r in official]
    for ci, clip in enumerate(ours[0]["clips"] if ours else official[0]["clips"]):
        first = (ours or official)[0]["clips"][ci]["stages"]
        lines.append(f"\n### {clip['clip']} ({first['duration_s']:.1f} s, {int(first['new_tokens'])} new tokens, "
                     f"prompt {int(first['prompt_tokens'])} tokens), median of {a.repeats * a.rounds}"
                     + (f" ({a.repeats} in each of {a.rounds} rounds)" if a.rounds > 1 else ""))
        hdr = "| stage | " + " | ".join(names) + " |"
        lines += [hdr, "|" + "---|" * (len(names) + 1)]
        for stage in STAGES:
            cells = []
            for r in ours + official:
                v = r["clips"][ci]["stages"].get(stage)
                cell = _fmt_s(v)
                if base is not None and r["side"] == "ours" and v:
                    b = base["clips"][ci]["stages"].get(stage)
                    cell += f" ({b / v:.1f}x)" if b else ""
                cells.append(cell)
            lines.append(f"| {stage[:-2].replace('_', ' ')} | " + " | ".join(cells) + " |")
        for key, fmt in (("prefill_tok_s", "{:.0f}"), ("decode_tok_s", "{:.1f}"), ("rtf", "{:.3f}")):
            cells = [fmt.format(r["clips"][ci]["stages"][key]) for r in ours + official]
            lines.append(f"| {key.replace('_', ' ').replace(' s', '/s')} | " + " | ".join(cells) + " |")
        if base is not None and a.rounds > 1:  # each round's total ratio: how much the machine's drift moves it
            base_totals = base["clips"][ci].get("round_totals", [])
            cells = []
            for r in ours:
                totals = r["clips"][ci].get("round_totals", [])
                cells.append(" ".join(f"{b / o:.2f}x" for b, o in zip(base_totals, totals, strict=False)))
            lines.append("| total ratio, per round | " + " | ".join(cells + ["-"] * len(official)) + " |")
    if base is not None:
        lines.append(f"\n(x) = {base['mode']} time / ours, measured in this run; "
                     f"official: funasr {base.get('funasr')} torch {base.get('torch')} on {base['device']}")
    lines.append("\n| mode | device | load | cached load | warm-up | weights | peak (batch 1) | peak (all) | "
                 "RSS (batch 1) | top-1 agree | logit cos (mean/min) | greedy = fp32 |")
    lines.append("|" + "---|" * 12)
    for r in ours + official:
        ag = [c.get("agreement", {}) for c in r.get("clips", [])]
        ag = [g for g in ag if "top1_agreement" in g]
        top1 = f"{statistics.mean(g['top1_agreement'] for g in ag):.3f}" if ag else ("ref" if r["mode"] == "fp32" else "-")
        cos = (f"{statistics.mean(g['logit_cosine_mean'] for g in ag):.5f}/{min(g['logit_cosine_min'] for g in ag):.5f}"
               if ag else "-")
        greedy = " ".join(f"{g['greedy_prefix_equal']}/{g['greedy_len']}" for g in ag) if ag else "-"
        mem = lambda k, r=r: f"{r[k]:.0f} MB" if r.get(k) else "-"  # noqa: E731
        lines.append(f"| {r['mode']} | {r['device']} | {_fmt_s(r['load_s'])} ({r.get('load_kind', '')}) | "
                     f"{_fmt_s(r.get('load_cached_s'))} | {_fmt_s(r.get('warmup_s'))} | {mem('weights_mb')} | "
                     f"{mem('peak_batch1_mb')} | {mem('peak_mb')} | {mem('rss_batch1_mb')} | {top1} | {cos} | {greedy} |")
    batched = [r for r in results if r.get("batch")]
    if batched:
        lines.append("\n| batched | segments | audio | wall | RTFx | decode tok/s (all rows) | decode steps/s | peak |")
        lines.append("|" + "---|" * 8)
        for r in batched:
            for b in r["batch"]:
                peak = f"{b['peak_mb']:.0f} MB" if b.get("peak_mb") is not None else "-"
                lines.append(f"| {r['mode']} | {b['segments']} | {b['audio_s']:.0f} s | {_fmt_s(b['wall_s'])} | "
                             f"{b['rtfx']:.0f} | {b.get('decode_tok_s', 0):.0f} | {b.get('decode_steps_s', 0):.1f} | "
                             f"{peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("FUNASR_NANO_MODEL"), help="official dir, converted dir or hub id")
    ap.add_argument("--clips", nargs="+", default=[str(TESTDATA / c) for c in DEFAULT_CLIPS])
    ap.add_argument("--modes", nargs="*", default=["fp32", "bf16", "q8", "q4"], choices=sorted(MODES))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per clip / batch size before timing")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                    help="decode exactly --max-new-tokens (default: on for random-weight checkpoints)")
    ap.add_argument("--batch", type=int, nargs="*", default=[], help="batched throughput over N segments")
    ap.add_argument("--load-twice", action="store_true", help="also time a second (cached) load in each mode")
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "cpu", "cuda"],
                    help="the runners (asr.RuntimeOptions.backend): mlx is the reference every other is measured against")
    ap.add_argument("--one-launch", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA: the one-launch decode steps where the device runs them (--no-one-launch: the "
                         "multi-kernel steps)")
    ap.add_argument("--encoder-kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="CUDA: the encoder's attention and FSMN kernels (--no-encoder-kernels: MLX's operations)")
    ap.add_argument("--inflight-layers", type=int, default=None,
                    help="asr.RuntimeOptions.inflight_layers (default: the option's default)")
    ap.add_argument("--official", action="store_true", help="also run the official funasr code (side by side)")
    ap.add_argument("--official-python", default=str(ROOT / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--official-device", default="cpu")
    ap.add_argument("--official-dtypes", nargs="*", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--official-first", action="store_true", help="run the official side before ours")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every mode and the official side this many times, alternating which side goes first "
                         "(a machine whose speed drifts then moves both sides alike); medians over all rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (official side)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--from-json", type=Path, help="only print the tables of an earlier --json file")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--_worker", choices=["ours", "official"], help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--official-dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--agreement-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        for flag in ("--repeats", "--rounds"):
            if flag in saved["argv"]:
                setattr(a, flag[2:], int(saved["argv"][saved["argv"].index(flag) + 1]))
        print(report(saved["results"], a))
        return 0
    if not a.model:
        ap.error("--model is required (or set FUNASR_NANO_MODEL)")
    if a.ignore_eos is None:
        a.ignore_eos = _is_random_checkpoint(a.model)
    missing = [c for c in a.clips if not Path(c).is_file()]
    if missing:
        ap.error(f"--clips: no such file: {', '.join(missing)} (give audio file paths)")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")

    if a._worker:
        res = worker_ours(a) if a._worker == "ours" else worker_official(a)
        a._out.write_text(json.dumps(res, indent=1))
        return 0

    common = ["--model", a.model, "--clips", *a.clips, "--max-new-tokens", str(a.max_new_tokens),
              "--repeats", str(a.repeats), "--warmup", str(a.warmup), "--ignore-eos" if a.ignore_eos else "--no-ignore-eos",
              "--threads", str(a.threads)]
    if a.batch:
        common += ["--batch", *map(str, a.batch)]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def run_official(rnd: int):
            for dt in a.official_dtypes if a.official else []:
                r = _spawn(a.official_python, [*common, "--_worker", "official", "--official-device",
                                               a.official_device, "--official-dtype", dt],
                           tmp / f"official-{dt}-{rnd}.json")
                if r:
                    results.append({**r, "round": rnd})
                    _save(results, a)

        def run_ours(rnd: int):
            modes = sorted(a.modes, key=lambda m: m != "fp32")  # fp32 first: it is the agreement reference
            for mode in modes if rnd % 2 == 0 else modes[::-1]:
                extra = ["--load-twice"] if a.load_twice and rnd == 0 else []
                extra += ["--backend", a.backend, "--one-launch" if a.one_launch else "--no-one-launch",
                          "--encoder-kernels" if a.encoder_kernels else "--no-encoder-kernels"]
                if a.inflight_layers is not None:
                    extra += ["--inflight-layers", str(a.inflight_layers)]
                if rnd == 0:  # agreement once, in the round that runs fp32 first
                    extra += ["--agreement-dir", str(tmp)]
                r = _spawn(sys.executable, [*common, *extra, "--_worker", "ours", "--mode", mode],
                           tmp / f"ours-{mode}-{rnd}.json")
                if r:
                    results.append({**r, "round": rnd})
                    _save(results, a)

        for rnd in range(a.rounds):
            if a.official_first == (rnd % 2 == 0):
                run_official(rnd)
                run_ours(rnd)
            else:
                run_ours(rnd)
                run_official(rnd)
    if not results:
        return 1
    if a.rounds > 1:
        groups: dict[tuple, list[dict]] = {}
        for r in results:
            groups.setdefault((r["side"], r["mode"]), []).append(r)
        results = [_merge_rounds(g) for g in groups.values()]
    text = report(results, a)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    _save(results, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
