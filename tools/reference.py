"""Golden outputs from the OFFICIAL funasr code (run in the reference venv `.venv-ref`, never in the main one).

The model is loaded and called exactly as a user would (`funasr.AutoModel(...).generate(...)`); intermediate
tensors are only *observed*, through forward hooks on the official modules and thin recording wrappers around
the official functions (each wrapper calls the original and returns its result unchanged).

    .venv-ref/bin/python tools/reference.py --model DIR --out OUT_DIR [--max-new-tokens 32] [--clips A.wav ...]

Per entry (a clip, or a clip + option case) OUT_DIR/<name>.npz holds:
  waveform [N] f32       16 kHz samples the reference used (after its own decode + resample)
  waveform_native, native_sr   what the decoder returned before resampling (only when it resampled, e.g. MP3)
  fbank [T,80] f32       kaldi fbank before LFR (the reference scales the waveform by 32768 first)
  lfr [L,560] f32        LFR frames (= encoder input)
  encoder_out [L,De], adaptor_out [L,D]   full L rows
  fake_token_len, fbank_beg, speech_len   audio token count n = ceil(L/8), splice start, L
  prompt_ids [P] i64     the whole source ids, audio placeholders included (zeros)
  inputs_embeds [P,D]    spliced LLM input (steady state, fp32; see the warm-up note below)
  greedy_ids [N] i64     ids returned by the official llm.generate (max_new_tokens=N; eos included if hit)
  eos_index              position of the first <|im_end|> in greedy_ids, -1 if none
  tf_logits [N,V] f32    teacher-forced logits on the reference's own greedy ids (row 0 = last prompt position)
  step_logits_max_abs_diff   max |tf_logits - logits seen during generate| (cache vs no-cache numerics)
  tf_margin [N] f32      top1 - top2 of each tf_logits row (how robust each greedy choice is)
  text                   the official result text
and OUT_DIR/manifest.json lists entries, options, stage wall times, versions and the checkpoint info.

Warm-up: the first generate() after loading splices bf16-rounded audio embeddings (the LLM is still bf16 until
inference_llm casts it to fp32), so one untimed call is made before any recorded one (spec §12).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
from official_hooks import sha256, to_numpy, version_of, wrap  # tools/, this script's folder

TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_CLIPS = [
    "audio/zh/example_zh.wav",
    "audio/zh/funasr_asr_example_zh.wav",
    "audio/zh/aishell1_BAC009S0724W0121.wav",
    "audio/en/jfk.wav",
    "audio/en/example_en.wav",
    "audio/ja/example_ja.wav",
    "audio/original/example_zh_48k.mp3",
]
OPTION_CLIP = "audio/zh/example_zh.wav"
OPTION_CASES = {  # entry suffix -> generate() kwargs (FunASRNano.get_prompt)
    "lang_en": {"language": "英文"},
    "itn_false": {"itn": False},
    "hotwords": {"hotwords": ["开放时间", "Americans"]},
}
EOS_ID = 151645




class Recorder:
    """Observes one official generate() call: hooks + recording wrappers, reset per call."""

    def __init__(self, am):
        import funasr.frontends.wav_frontend as wav_frontend
        import funasr.models.fun_asr_nano.model as nano_module
        import funasr.utils.fbank as fbank_module
        import funasr.utils.load_utils as load_utils
        import librosa
        import soundfile

        self.am = am
        self.model = am.model
        self.rec: dict = {}
        self.t: dict = {}
        self.step_logits: list = []

        # audio loading: FunASRNano.data_load_speech -> load_audio_text_image_video (torchaudio / soundfile /
        # ffmpeg CLI, then torchaudio or librosa resampling)
        def on_load(a, k, out, dt):
            self.rec["waveform"] = to_numpy(out).astype(np.float32)
            self.t["load_audio"] = dt

        def on_sf_read(a, k, out, dt):
            data, sr = out
            self.rec.setdefault("decoders", []).append(f"soundfile.read(sr={sr})")
            self.rec["native"] = (np.asarray(data, dtype=np.float32), int(sr))

        def on_ffmpeg(a, k, out, dt):
            self.rec.setdefault("decoders", []).append("ffmpeg CLI (s16le, resampled by ffmpeg)")

        def on_resample(a, k, out, dt):
            self.rec.setdefault("decoders", []).append(
                f"librosa.resample(orig_sr={k.get('orig_sr')}, target_sr={k.get('target_sr')}, "
                f"res_type={k.get('res_type', 'soxr_hq (default)')})"
            )

        wrap(nano_module, "load_audio_text_image_video", after=on_load)
        wrap(soundfile, "read", after=on_sf_read)
        wrap(load_utils, "_load_audio_ffmpeg", after=on_ffmpeg)
        wrap(librosa, "resample", after=on_resample)

        # frontend: WavFrontend.forward -> funasr.utils.fbank.fbank (torchaudio or kaldi-native-fbank) -> apply_lfr
        def on_fbank(a, k, out, dt):
            self.rec["fbank"] = to_numpy(out)
            self.t["fbank"] = dt

        def on_lfr(a, k, out, dt):
            self.rec["lfr"] = to_numpy(out)

        def on_extract(a, k, out, dt):
            self.t["frontend"] = dt

        wrap(fbank_module, "fbank", after=on_fbank)
        wrap(wav_frontend, "apply_lfr", after=on_lfr)
        wrap(nano_module, "extract_fbank", after=on_extract)

        # encoder / adaptor (the encoder scales its input in place: copy it in the pre-hook)
        def enc_pre(mod, args):
            self.rec["encoder_in"] = to_numpy(args[0][0]).copy()
            self.rec["speech_len"] = int(args[1][0])
            self.t["_enc0"] = time.perf_counter()

        def enc_post(mod, args, out):
            self.t["encoder"] = time.perf_counter() - self.t.pop("_enc0")
            self.rec["encoder_out"] = to_numpy(out[0][0])

        def ad_pre(mod, args):
            self.t["_ad0"] = time.perf_counter()

        def ad_post(mod, args, out):
            self.t["adaptor"] = time.perf_counter() - self.t.pop("_ad0")
            self.rec["adaptor_out"] = to_numpy(out[0][0])

        self.model.audio_encoder.register_forward_pre_hook(enc_pre)
        self.model.audio_encoder.register_forward_hook(enc_post)
        self.model.audio_adaptor.register_forward_pre_hook(ad_pre)
        self.model.audio_adaptor.register_forward_hook(ad_post)

        # prompt + splice: FunASRNano.inference_prepare returns (inputs_embeds, contents, batch, source_ids, meta)
        def on_prepare(a, k, out, dt):
            inputs_embeds, _contents, batch, source_ids, _meta = out
            self.rec["inputs_embeds"] = to_numpy(inputs_embeds[0]).copy()
            self.rec["inputs_embeds_dtype"] = str(inputs_embeds.dtype)
            self.rec["prompt_ids"] = to_numpy(source_ids[0]).astype(np.int64)
            self.rec["fbank_beg"] = int(batch["fbank_beg"][0, 0])
            self.rec["fake_token_len"] = int(batch["fake_token_len"][0, 0])
            self.t["prepare_total"] = dt

        wrap(self.model, "inference_prepare", after=on_prepare)

        # LLM: generate() (prefill = until the first lm_head call returns) and per-step logits
        def lm_head_post(mod, args, out):
            if "_gen0" in self.t and "prefill" not in self.t:
                self.t["prefill"] = time.perf_counter() - self.t["_gen0"]
            self.step_logits.append(out[0, -1].detach().float().clone())

        self.model.llm.lm_head.register_forward_hook(lm_head_post)

        def gen_before(a, k):
            self.step_logits.clear()
            self.rec["llm_dtype"] = str(next(self.model.llm.parameters()).dtype)
            self.t["_gen0"] = time.perf_counter()

        def gen_after(a, k, out, dt):
            self.t.pop("_gen0", None)
            self.t["generate"] = dt
            self.t["decode"] = dt - self.t.get("prefill", 0.0)
            self.rec["greedy_ids"] = to_numpy(out[0]).astype(np.int64)
            self.rec["generate_kwargs"] = {
                key: (val if isinstance(val, (int, float, str, bool, type(None))) else repr(val))
                for key, val in k.items() if key not in ("inputs_embeds", "attention_mask")
            }

        wrap(self.model.llm, "generate", before=gen_before, after=gen_after)

    def run(self, audio: str, max_new_tokens: int, options: dict) -> tuple[dict, dict, str]:
        self.rec, self.t = {}, {}
        t0 = time.perf_counter()
        result = self.am.generate(input=audio, max_length=max_new_tokens, **options)
        self.t["total"] = time.perf_counter() - t0
        return self.rec, self.t, result[0]["text"]

    def teacher_forced(self, inputs_embeds: np.ndarray, greedy_ids: np.ndarray):
        """Logits of the official (now fp32) LLM on [prompt | greedy ids], one forward pass without cache."""
        import torch

        llm = self.model.llm
        dtype = next(llm.parameters()).dtype
        prompt = torch.from_numpy(inputs_embeds)[None].to(dtype)
        with torch.no_grad():
            ids = torch.from_numpy(greedy_ids[:-1])[None]
            seq = torch.cat([prompt, llm.get_input_embeddings()(ids).to(dtype)], dim=1)
            mask = torch.ones(seq.shape[:2], dtype=torch.long)
            logits = llm(inputs_embeds=seq, attention_mask=mask, use_cache=False).logits[0].float()
        n, p = len(greedy_ids), prompt.shape[1]
        tf = logits[p - 1 : p - 1 + n]
        step = torch.stack(self.step_logits[:n]) if self.step_logits else None
        step_diff = float((tf - step).abs().max()) if step is not None and step.shape == tf.shape else float("nan")
        return tf.numpy(), step_diff


def _has_torchaudio() -> bool:
    try:
        import torchaudio  # noqa: F401
    except Exception:
        return False
    return True


def check_loaded_weights(model, init_param: str) -> dict:
    """Every checkpoint tensor must have landed in the module unchanged (FunASR's loader skips mismatches)."""
    import torch

    state = torch.load(init_param, map_location="cpu")["state_dict"]
    params = model.state_dict()
    bad = [k for k, v in state.items() if k not in params or params[k].shape != v.shape
           or not torch.equal(params[k].float(), v.float())]
    not_loaded = sorted(set(params) - set(state))
    if bad:
        raise SystemExit(f"checkpoint tensors not loaded as stored: {bad[:5]} ({len(bad)} total)")
    return {"checkpoint_tensors": len(state), "module_tensors": len(params),
            "module_tensors_not_in_checkpoint": len(not_loaded), "ctc_enabled": model.ctc_decoder is not None}


def versions() -> dict:
    import funasr
    import funasr.utils.fbank as fbank_module
    import librosa
    import soundfile
    import torch
    import transformers

    return {
        "python": platform.python_version(), "funasr": funasr.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__, "librosa": librosa.__version__,
        "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__,
        "kaldi_native_fbank": version_of("kaldi_native_fbank"),
        "fbank_backend": "torchaudio" if fbank_module._HAS_TORCHAUDIO else "kaldi-native-fbank",
        "torch_threads": torch.get_num_threads(),
    }


def save_entry(out_dir: Path, name: str, rec: dict, tf_logits: np.ndarray, step_diff: float, text: str) -> dict:
    greedy = rec["greedy_ids"]
    eos = np.flatnonzero(greedy == EOS_ID)
    top2 = np.sort(np.partition(tf_logits, -2, axis=-1)[:, -2:], axis=-1)
    arrays = {
        "waveform": rec["waveform"], "fbank": rec["fbank"], "lfr": rec["lfr"],
        "encoder_out": rec["encoder_out"], "adaptor_out": rec["adaptor_out"],
        "fake_token_len": np.int64(rec["fake_token_len"]), "fbank_beg": np.int64(rec["fbank_beg"]),
        "speech_len": np.int64(rec["speech_len"]), "prompt_ids": rec["prompt_ids"],
        "inputs_embeds": rec["inputs_embeds"], "greedy_ids": greedy,
        "eos_index": np.int64(eos[0] if eos.size else -1), "tf_logits": tf_logits.astype(np.float32),
        "tf_margin": (top2[:, 1] - top2[:, 0]).astype(np.float32),
        "step_logits_max_abs_diff": np.float32(step_diff), "text": np.str_(text),
    }
    if "native" in rec and len(rec["native"][0]) != len(rec["waveform"]):
        arrays["waveform_native"], arrays["native_sr"] = rec["native"][0], np.int64(rec["native"][1])
    if not np.array_equal(rec["encoder_in"], rec["lfr"]):
        raise SystemExit(f"{name}: encoder input differs from the recorded LFR frames")
    np.savez(out_dir / f"{name}.npz", **arrays)
    return {
        "fake_token_len": rec["fake_token_len"], "fbank_beg": rec["fbank_beg"], "speech_len": rec["speech_len"],
        "num_samples": len(rec["waveform"]), "fbank_frames": len(rec["fbank"]), "prompt_len": len(rec["prompt_ids"]),
        "prompt_ids": rec["prompt_ids"].tolist(), "greedy_ids": greedy.tolist(), "eos_index": int(arrays["eos_index"]), "text": text,
        "tf_argmax_matches_greedy": bool((tf_logits.argmax(-1) == greedy).all()),
        "tf_margin": [round(float(m), 5) for m in arrays["tf_margin"]], "step_logits_max_abs_diff": step_diff,
        "inputs_embeds_dtype": rec["inputs_embeds_dtype"], "llm_dtype": rec["llm_dtype"],
        "decoders": rec.get("decoders", []),
    }


TOKEN_FIELDS = ("name", "clip", "options", "speech_len", "fake_token_len", "fbank_beg", "prompt_ids", "greedy_ids",
                "eos_index", "text", "tf_margin")


def token_fixture(manifest: dict) -> str:
    """Commit-size summary (tests/fixtures/golden_tiny_tokens.json): ids and texts, no tensors; one line per list."""
    ck = manifest["checkpoint"] or {}
    doc = {
        "generated_by": "tools/make_goldens.sh (tools/reference.py, official funasr code)",
        "checkpoint": {"size": ck.get("size"), "seed": ck.get("seed"), "ctc": ck.get("ctc"),
                       "model_pt_sha256": manifest["model_pt_sha256"]},
        "max_new_tokens": manifest["options"]["max_new_tokens"],
        "versions": {k: manifest["versions"][k] for k in ("funasr", "torch", "transformers", "fbank_backend")},
        "entries": [{k: e[k] for k in TOKEN_FIELDS} for e in manifest["entries"]],
    }
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    # keep each id list on one line
    return re.sub(r"\[\s+([-0-9., \n]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Dump golden tensors from the official funasr code.")
    ap.add_argument("--model", required=True, type=Path, help="model directory (tools/checkpoint.py layout)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--clips", nargs="*", default=None, help=f"audio files (default: {len(DEFAULT_CLIPS)} clips)")
    ap.add_argument("--no-options", action="store_true", help="skip the language / itn / hotwords cases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torchaudio", choices=["block", "allow"], default="block",
                    help="block (default): hide an installed torchaudio, so the official loader takes the path of "
                    "the pinned reference environment (soundfile/ffmpeg + librosa soxr_hq resampling, "
                    "kaldi-native-fbank), whatever else the machine has; torchaudio resamples differently")
    args = ap.parse_args(argv)
    if args.torchaudio == "block":
        sys.modules["torchaudio"] = None  # `import torchaudio` now raises ImportError, as where it is absent

    import torch
    from funasr import AutoModel

    logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(0)
    clips = [Path(c) for c in args.clips] if args.clips else [TESTDATA / c for c in DEFAULT_CLIPS]
    entries: list[tuple[str, Path, dict]] = [(c.stem, c, {}) for c in clips]
    if not args.no_options:
        opt_clip = TESTDATA / OPTION_CLIP if not args.clips else clips[0]
        entries += [(f"{opt_clip.stem}.{suffix}", opt_clip, opts) for suffix, opts in OPTION_CASES.items()]
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    am = AutoModel(model=str(args.model), device="cpu", disable_update=True, disable_pbar=True,
                   frontend_conf={"dither": 0.0}, ncpu=args.threads, log_level="WARNING")
    load_s = time.perf_counter() - t0
    load_check = check_loaded_weights(am.model, am.kwargs["init_param"])
    if am.model.ctc_decoder is not None and not _has_torchaudio():
        raise SystemExit("this checkpoint has CTC tensors: the official inference then calls forced_align, which "
                         "needs torchaudio (not installable next to torch 2.13); use a checkpoint without --ctc")
    recorder = Recorder(am)

    t0 = time.perf_counter()
    _rec, _t, warm_text = recorder.run(str(entries[0][1]), args.max_new_tokens, entries[0][2])
    warmup = {"clip": str(entries[0][1]), "inputs_embeds_dtype": _rec["inputs_embeds_dtype"],
              "llm_dtype_at_generate": _rec["llm_dtype"], "wall_s": time.perf_counter() - t0}

    manifest_entries = []
    for name, clip, opts in entries:
        rec, times, text = recorder.run(str(clip), args.max_new_tokens, opts)
        tf_logits, step_diff = recorder.teacher_forced(rec["inputs_embeds"], rec["greedy_ids"])
        meta = save_entry(args.out, name, rec, tf_logits, step_diff, text)
        meta.update(name=name, clip=str(clip.relative_to(TESTDATA)) if clip.is_relative_to(TESTDATA) else str(clip),
                    clip_sha256=sha256(clip), options=opts,
                    wall_s={k: round(v, 4) for k, v in times.items() if not k.startswith("_")})
        manifest_entries.append(meta)
        print(f"{name:44s} L={meta['speech_len']:4d} n={meta['fake_token_len']:3d} P={meta['prompt_len']:4d} "
              f"eos@{meta['eos_index']:3d} total={times['total']:.2f}s  {text[:40]!r}", flush=True)

    info_path = args.model / "checkpoint_info.json"
    manifest = {
        "generated_by": "tools/reference.py",
        "model_dir": str(args.model.resolve()),
        "checkpoint": json.loads(info_path.read_text()) if info_path.exists() else None,
        "model_pt_sha256": sha256(args.model / "model.pt"),
        "options": {"max_new_tokens": args.max_new_tokens, "device": "cpu", "frontend_conf": {"dither": 0.0},
                    "llm_dtype": am.kwargs.get("llm_dtype", "fp32 (inference_llm default)"),
                    "threads": args.threads, "warmup_calls": 1},
        "load": {"wall_s": round(load_s, 3), **load_check},
        "warmup": warmup,
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "entries": manifest_entries,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    (args.out / "golden_tokens.json").write_text(token_fixture(manifest), encoding="utf-8")
    print(f"wrote {len(manifest_entries)} entries to {args.out}")


if __name__ == "__main__":
    main()
