"""Golden CTC outputs (ctc_text, timestamps, ctc_timestamps) from the OFFICIAL funasr code, and tokenizer goldens.

Subcommands (`align`, `viterbi`, `tokenizer` run in the reference venv `.venv-ref`; `checkpoint`, `fixture` in either):

- `align`: load a CTC checkpoint (tools/checkpoint.py `--ctc` layout) with `funasr.AutoModel`, call `generate()` on a
  few clips exactly as a user would (after one warm-up call), and record the official result fields `text`,
  `ctc_text`, `timestamps` and `ctc_timestamps`. Thin recording wrappers (each calls the original and returns its
  result unchanged) observe the CTC log-probs (`model.ctc.log_softmax`) and the token ids given to / returned by
  `forced_align`.
- `viterbi`: the official tools/utils.py::forced_align on tiny random inputs (many exact ties, infeasible cases).
- `tokenizer`: encode/decode a corpus with the official `SenseVoiceTokenizer` (tiktoken).
- `checkpoint`: a tiny random CTC checkpoint; `fixture`: several `align` outputs merged into one small JSON.

torchaudio: the official `forced_align` calls `torchaudio.functional.forced_align`, and no CPU torchaudio build for
torch 2.13 is installable here (the index only has 2.11.0, a CUDA build). Since torchaudio 2.9 its extension is built
on torch's stable C ABI, so that wheel runs on CPU torch 2.13 once its CUDA libraries resolve: `--cuda-stubs` compiles
(gcc) and preloads no-op stand-ins for libcudart.so.13 / libc10_cuda.so / libtorch_cuda.so (only the CPU kernel is
ever called). torchaudio is installed OUTSIDE the venv and is visible to funasr only inside forced_align: everything
else (fbank backend, audio loading) runs as in the plain reference venv (kaldi-native-fbank, soundfile).

Regenerating the fixtures of tests/test_ctc.py (from the repo root):

    .venv-ref/bin/pip install --no-deps --target /tmp/torchaudio-2.11 torchaudio==2.11.0
    TA="--torchaudio /tmp/torchaudio-2.11 --cuda-stubs"
    .venv/bin/python -m tools.reference_ctc checkpoint .cache/ctc/plain
    .venv/bin/python -m tools.reference_ctc checkpoint .cache/ctc/boost --blank-boost 8.8
    .venv-ref/bin/python tools/reference_ctc.py align --model .cache/ctc/plain --out .cache/ctc/plain_golden.json $TA
    .venv-ref/bin/python tools/reference_ctc.py align --model .cache/ctc/boost --out .cache/ctc/boost_golden.json $TA
    .venv/bin/python -m tools.reference_ctc fixture tests/fixtures/ctc_parity.json .cache/ctc/{plain,boost}_golden.json
    .venv-ref/bin/python tools/reference_ctc.py viterbi --out tests/fixtures/ctc_viterbi.json $TA
    .venv-ref/bin/python tools/reference_ctc.py tokenizer --out tests/fixtures/ctc_tokenizer.json \
        --vocab tests/data/tokenizer/funasr_nano_ctc_candidate/multilingual_zh_ja_yue_char_del.tiktoken

`checkpoint` = tools.checkpoint.write_checkpoint(size="tiny", ctc=True); with --blank-boost B, B is added to the
blank's ctc_lo bias so that most frames are blank as in a trained model (a short CTC text that alignment can place;
with plain random weights nearly every frame is a different token). `align --logprobs-dir D` also saves the
official CTC log-probs [L, V] per clip as .npy.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_CLIPS = [
    "audio/zh/example_zh.wav",
    "audio/zh/aishell1_BAC009S0724W0121.wav",
    "audio/en/jfk.wav",
    "audio/ja/example_ja.wav",
]
BLANK = 60514

# ------------------------------------------------------------------------------------------------------------------
# CUDA stand-ins so that the CUDA build of torchaudio loads on CPU torch

_STUB_CUDART = r"""
static char handle[64];
void **__cudaRegisterFatBinary(void *p) { (void)p; return (void **)handle; }
void __cudaRegisterFatBinaryEnd(void **h) { (void)h; }
void __cudaUnregisterFatBinary(void **h) { (void)h; }
void __cudaRegisterFunction(void) {}
void __cudaRegisterVar(void) {}
int __cudaGetKernel(void) { return 1; }
int __cudaLaunchKernel(void) { return 1; }
int __cudaPopCallConfiguration(void) { return 1; }
unsigned __cudaPushCallConfiguration(void) { return 1; }
const char *cudaGetErrorName(int e) { (void)e; return "cuda stub"; }
int cudaGetLastError(void) { return 0; }
int cudaMemcpy2DAsync(void) { return 1; }
int cudaMemcpyAsync(void) { return 1; }
int cudaMemset(void) { return 1; }
int cudaMemsetAsync(void) { return 1; }
int cudaSetDevice(void) { return 1; }
int cudaStreamSynchronize(void) { return 1; }
"""
_STUB_TORCH_CUDA = r"""
int aoti_torch_get_current_cuda_stream(void) { return 1; }
int torch_c10_cuda_check_msg(void) { return 1; }
void torch_c10_cuda_free_error_msg(void) {}
int torch_cuda_stream_synchronize(void) { return 1; }
int torch_get_cuda_stream_from_pool(void) { return 1; }
int torch_set_current_cuda_stream(void) { return 1; }
"""
_STUB_C10_CUDA = "void funasr_nano_mlx_c10_cuda_stub(void) {}\n"


def preload_cuda_stubs(build_dir: Path) -> None:
    """Compile and dlopen(RTLD_GLOBAL) the stand-ins; the loader then matches torchaudio's NEEDED entries by soname."""
    build_dir.mkdir(parents=True, exist_ok=True)
    libs = [("libcudart.so.13", _STUB_CUDART, "libcudart.so.13"), ("libc10_cuda.so", _STUB_C10_CUDA, None),
            ("libtorch_cuda.so", _STUB_TORCH_CUDA, None)]
    for name, src, version_node in libs:
        so = build_dir / name
        if not so.exists():
            c = build_dir / (name.split(".")[0] + ".c")
            c.write_text(src)
            cmd = ["gcc", "-shared", "-fPIC", "-o", str(so), f"-Wl,-soname,{name}", str(c)]
            if version_node:
                vs = build_dir / (name.split(".")[0] + ".map")
                vs.write_text(f"{version_node} {{ global: *; }};\n")
                cmd.insert(-1, f"-Wl,--version-script={vs}")
            subprocess.run(cmd, check=True)
        ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)


def load_forced_align(torchaudio_dir: str | None, stubs: bool):
    """Import torchaudio.functional.forced_align from `torchaudio_dir`, then hide torchaudio from funasr again."""
    if stubs:
        preload_cuda_stubs(Path(os.environ.get("CTC_STUB_DIR", "/tmp/funasr_nano_mlx_cuda_stubs")))
    if torchaudio_dir:
        sys.path.insert(0, torchaudio_dir)
    try:
        import torchaudio
        import torchaudio.functional as taf

        version = torchaudio.__version__
        fn = taf.forced_align
    finally:
        if torchaudio_dir:
            sys.path.remove(torchaudio_dir)
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]  # importlib.util.find_spec("torchaudio") is None again
    return fn, version


# ------------------------------------------------------------------------------------------------------------------
# align


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _items(items: list[dict]) -> list[dict]:
    return [{"token": it["token"], "start_time": it["start_time"], "end_time": it["end_time"], "score": it["score"]}
            for it in items]


def align(args) -> None:
    import importlib

    import torch
    from funasr import AutoModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    forced_align_fn, ta_version = load_forced_align(args.torchaudio, args.cuda_stubs)
    am = AutoModel(model=str(args.model), device="cpu", disable_update=True, disable_pbar=True,
                   frontend_conf={"dither": 0.0}, ncpu=args.threads, log_level="WARNING")
    model = am.model
    if model.ctc_decoder is None:
        raise SystemExit(f"{args.model}: the official code did not enable the CTC branch (no CTC tensors?)")

    import funasr.utils.fbank as fbank_module

    utils_module = importlib.import_module("funasr.models.fun_asr_nano.tools.utils")
    nano_module = importlib.import_module("funasr.models.fun_asr_nano.model")
    ta_ns = types.SimpleNamespace(functional=types.SimpleNamespace(forced_align=forced_align_fn))
    utils_module.require_torchaudio = lambda feature="": ta_ns  # the official forced_align, given our torchaudio

    rec: dict = {}
    orig_log_softmax = model.ctc.log_softmax

    def log_softmax(hs_pad):
        out = orig_log_softmax(hs_pad)
        rec["log_probs"] = out[0].detach().float().numpy().copy()
        return out

    model.ctc.log_softmax = log_softmax
    orig_forced_align = nano_module.forced_align

    def forced_align(log_probs, targets, blank=0):
        out = orig_forced_align(log_probs, targets, blank)
        rec.setdefault("align_calls", []).append({"targets": [int(t) for t in targets.tolist()],
                                                  "token_ids": [int(it["token"]) for it in out],
                                                  "frames": [[int(it["start_time"]), int(it["end_time"])]
                                                             for it in out]})
        return out

    nano_module.forced_align = forced_align

    clips = [Path(c) for c in args.clips] if args.clips else [TESTDATA / c for c in DEFAULT_CLIPS]
    am.generate(input=str(clips[0]), max_length=args.max_new_tokens)  # warm-up (bf16 splice quirk, spec §12)
    entries = []
    for clip in clips:
        rec.clear()
        t0 = time.perf_counter()
        res = am.generate(input=str(clip), max_length=args.max_new_tokens)[0]
        wall = time.perf_counter() - t0
        lp = rec["log_probs"]
        calls = rec.get("align_calls", [])
        if len(calls) != 2:
            raise SystemExit(f"{clip}: expected 2 forced_align calls, saw {len(calls)}")
        ctc_call, llm_call = calls  # the official order: ctc_text first, then text
        argmax = lp.argmax(-1)
        top2 = np.sort(np.partition(lp, -2, axis=-1)[:, -2:], axis=-1)
        name = clip.stem
        if args.logprobs_dir:
            Path(args.logprobs_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.logprobs_dir) / f"{name}.npy", lp)
        entries.append({
            "name": name,
            "clip": str(clip.relative_to(TESTDATA)) if clip.is_relative_to(TESTDATA) else str(clip),
            "clip_sha256": _sha256(clip),
            "frames": int(lp.shape[0]),
            "text": res["text"],
            "ctc_text": res["ctc_text"],
            "timestamps": _items(res["timestamps"]),
            "ctc_timestamps": _items(res["ctc_timestamps"]),
            "text_target_ids": llm_call["targets"],
            "text_align_ids": llm_call["token_ids"],
            "ctc_target_ids": ctc_call["targets"],
            "ctc_align_ids": ctc_call["token_ids"],
            "argmax": argmax.tolist(),
            "logp_max": [round(float(v), 5) for v in top2[:, 1]],
            "argmax_margin_min": float((top2[:, 1] - top2[:, 0]).min()),
            "nonblank_frames": int((argmax != BLANK).sum()),
            "wall_s": round(wall, 3),
        })
        print(f"{name:36s} L={lp.shape[0]:4d} non-blank={entries[-1]['nonblank_frames']:4d} "
              f"ts={len(res['timestamps']):3d} ctc_ts={len(res['ctc_timestamps']):3d} ctc_text={res['ctc_text'][:30]!r}",
              flush=True)

    info_path = args.model / "checkpoint_info.json"
    out = {
        "generated_by": "tools/reference_ctc.py align",
        "checkpoint": json.loads(info_path.read_text()) if info_path.exists() else None,
        "model_pt_sha256": _sha256(args.model / "model.pt"),
        "vocab_sha256": _sha256(args.model / "multilingual.tiktoken"),
        "blank": int(model.blank_id),
        "max_new_tokens": args.max_new_tokens,
        "versions": {"torch": torch.__version__, "torchaudio": ta_version,
                     "funasr": importlib.import_module("funasr").__version__,
                     "fbank_backend": "torchaudio" if fbank_module._HAS_TORCHAUDIO else "kaldi-native-fbank"},
        "entries": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


# ------------------------------------------------------------------------------------------------------------------
# tokenizer goldens

TOKENIZER_CORPUS = [
    "",
    " ",
    "hello world",
    "Hello, World! It's a test; we're done. They'll've gone?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n and  double  spaces",
    "开放时间早上9点至下午5点。",
    "欢迎大家来体验达摩院推出的语音识别模型",
    "こんにちは、世界。カタカナとひらがな、漢字。",
    "안녕하세요 세계",
    "Ça va? Über straße, niño, façade — «quotes» …",
    "Привет, мир! Ελληνικά. العربية. עברית. हिन्दी",
    "numbers 1234567890 3.14159 1,000,000 2nd 42%",
    "emoji 😀👍🏽 and symbols ©®™ ✓ ∑∫",
    "<|nospeech|>",
    "<|zh|><|en|>text<|HAPPY|><|Speech|><|0.00|><|endoftext|>",
    "a<|SPECIAL_TOKEN_1|>b <|notimestamps|>",
    "mixed中文English日本語123",
    "/sil words /sil",
    "\u3000full width space\u3000and\u00a0nbsp",
    "zero\u200bwidth",
    "'s 't 're 've 'm 'll 'd 'S 'T",
    "!!!???...,,,",
    "   \n\n   ",
]


def tokenizer_goldens(args) -> None:
    from funasr.models.sense_voice.whisper_lib.tokenizer import get_tokenizer

    tok = get_tokenizer(multilingual=True, num_languages=8749, vocab_path=str(args.vocab))
    corpus = list(TOKENIZER_CORPUS)
    manifest = TESTDATA / "manifest.jsonl"
    if manifest.exists():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            ref = json.loads(line).get("reference")
            if ref:
                corpus.append(ref)
    encode = [{"text": s, "ids": tok.encode(s)} for s in corpus]
    rng = np.random.default_rng(0)
    n_vocab = tok.encoding.n_vocab
    decode = []
    for _ in range(40):  # random id lists, specials and timestamps included (decode drops ids >= <|0.00|>)
        ids = rng.integers(0, n_vocab, size=int(rng.integers(1, 12))).tolist()
        decode.append({"ids": ids, "text": tok.decode(ids)})
    for ids in ([0], [n_vocab - 1], [tok.timestamp_begin - 1], [tok.no_speech], [tok.eot, tok.sot], [58835]):
        decode.append({"ids": ids, "text": tok.decode(ids)})
    single = {str(i): tok.decode([i]) for i in sorted(set(rng.integers(0, n_vocab, size=200).tolist()))}
    specials = sorted(tok.encoding._special_tokens.items(), key=lambda kv: kv[1])
    out = {
        "generated_by": "tools/reference_ctc.py tokenizer (funasr SenseVoiceTokenizer over tiktoken)",
        "vocab_sha256": _sha256(args.vocab),
        "n_vocab": n_vocab,
        "timestamp_begin": tok.timestamp_begin,
        "no_speech": tok.no_speech,
        "special_first": specials[:3],
        "special_count": len(specials),
        "special_names_sha256": hashlib.sha256("\n".join(k for k, _ in specials).encode()).hexdigest(),
        "encode": encode,
        "decode": decode,
        "decode_single": single,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(encode)} encode, {len(decode)} decode cases")


# ------------------------------------------------------------------------------------------------------------------
# forced-alignment goldens on tiny inputs (tie-breaking, edge cases)


def viterbi_goldens(args) -> None:
    """The official tools/utils.py::forced_align (torchaudio inside) on tiny random inputs, ties included."""
    import importlib

    import torch

    forced_align_fn, ta_version = load_forced_align(args.torchaudio, args.cuda_stubs)
    utils_module = importlib.import_module("funasr.models.fun_asr_nano.tools.utils")
    ta_ns = types.SimpleNamespace(functional=types.SimpleNamespace(forced_align=forced_align_fn))
    utils_module.require_torchaudio = lambda feature="": ta_ns
    rng = np.random.default_rng(args.seed)
    cases = []
    for k in range(args.n):
        V = int(rng.integers(2, 6))
        blank = int(rng.integers(0, V)) if k % 3 else V - 1
        L = int(rng.integers(0, 6))
        labels = [v for v in range(V) if v != blank]
        targets = [int(rng.choice(labels)) for _ in range(L)]
        if k % 17 == 5 and L:
            targets[0] = blank  # a blank among the targets
        repeats = sum(a == b for a, b in zip(targets[1:], targets[:-1], strict=False))
        T = max(1, L + repeats + int(rng.integers(-1, 5)))
        if k % 2:  # integer-valued: many exact ties
            lp = -rng.integers(0, 3, size=(T, V)).astype(np.float32)
        else:
            lp = torch.from_numpy(rng.standard_normal((T, V)).astype(np.float32) * 2).log_softmax(-1).numpy()
            lp = np.round(lp, 4).astype(np.float32)  # 4 decimals in the JSON read back as these very float32s
        items = utils_module.forced_align(torch.from_numpy(lp), torch.tensor(targets, dtype=torch.int64), blank)
        path = None
        if items or L:
            try:
                path = forced_align_fn(torch.from_numpy(lp)[None], torch.tensor([targets], dtype=torch.int64),
                                       blank=blank)[0][0].tolist()
            except Exception:
                path = None
        cases.append({"log_probs": np.round(lp.astype(np.float64), 4).tolist(), "targets": targets, "blank": blank, "path": path,
                      "items": [[it["token"], it["start_time"], it["end_time"], it["score"]] for it in items]})
    out = {"generated_by": "tools/reference_ctc.py viterbi (funasr tools/utils.py::forced_align)",
           "torchaudio": ta_version, "seed": args.seed, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(cases)} cases, {sum(c['path'] is not None for c in cases)} aligned")


# ------------------------------------------------------------------------------------------------------------------
# fixture: several `align` outputs in one small JSON for tests/test_ctc.py


def make_fixture(args) -> None:
    runs = []
    for path in args.runs:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        ck = run.get("checkpoint") or {}
        run["checkpoint"] = {k: ck.get(k) for k in ("size", "seed", "ctc", "ctc_blank_bias_boost")}
        for e in run["entries"]:
            e["logp_max"] = [round(v, 4) for v in e["logp_max"]]
            e.pop("wall_s", None)
            e.pop("argmax", None)  # implied by ctc_text; logp_max keeps a numeric check
        runs.append(run)
    args.out.write_text(json.dumps({"runs": runs}, ensure_ascii=False, separators=(",", ":")) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


# ------------------------------------------------------------------------------------------------------------------
# checkpoint (MAIN venv)


def write_ctc_checkpoint(out_dir: Path, seed: int = 0, blank_boost: float = 0.0) -> Path:
    """tools.checkpoint.write_checkpoint(size="tiny", ctc=True), optionally with the blank's ctc_lo bias raised."""
    from tools.checkpoint import random_state_dict, write_checkpoint

    out = write_checkpoint(out_dir, size="tiny", seed=seed, ctc=True)
    if blank_boost:
        from tools.torch_zip_writer import save_state_dict

        state = random_state_dict("tiny", seed, ctc=True)
        dtype, bias = state["ctc.ctc_lo.bias"]
        bias = bias.copy()
        bias[BLANK] += np.float32(blank_boost)
        state["ctc.ctc_lo.bias"] = (dtype, bias)
        save_state_dict(out / "model.pt", state)
        info = json.loads((out / "checkpoint_info.json").read_text())
        info["ctc_blank_bias_boost"] = blank_boost
        (out / "checkpoint_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Golden CTC outputs of the official funasr code.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("align")
    a.add_argument("--model", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--clips", nargs="*", default=None)
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--torchaudio", default=None, help="directory holding a torchaudio install (pip --target)")
    a.add_argument("--cuda-stubs", action="store_true", help="preload CUDA stand-ins (CUDA torchaudio wheel on CPU)")
    a.add_argument("--logprobs-dir", default=None, help="also save the CTC log-probs [L, V] as .npy")
    a.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("tokenizer")
    t.add_argument("--vocab", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    v = sub.add_parser("viterbi")
    v.add_argument("--out", required=True, type=Path)
    v.add_argument("--n", type=int, default=200)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--torchaudio", default=None)
    v.add_argument("--cuda-stubs", action="store_true")
    f = sub.add_parser("fixture")
    f.add_argument("out", type=Path)
    f.add_argument("runs", nargs="+")
    c = sub.add_parser("checkpoint")
    c.add_argument("out_dir", type=Path)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--blank-boost", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.cmd == "align":
        align(args)
    elif args.cmd == "fixture":
        make_fixture(args)
    elif args.cmd == "viterbi":
        viterbi_goldens(args)
    elif args.cmd == "tokenizer":
        tokenizer_goldens(args)
    else:
        path = write_ctc_checkpoint(args.out_dir, args.seed, args.blank_boost)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
