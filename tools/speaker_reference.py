"""Golden outputs of the OFFICIAL funasr CAM++ code (run in the reference venv `.venv-ref`, never in the main one).

The model is loaded and called as a user does: `funasr.AutoModel(model=DIR)` (configuration.json ->
file_path_metas -> config.yaml `model: CAMPPlus` + init_param, funasr's load_pretrained_model), then
`generate(input=clip)` -> CAMPPlus.inference (load_audio_text_image_video, utils.extract_feature, forward). The
intermediate tensors are only *observed*: forward hooks on the official modules, and thin recording wrappers around
the two official functions CAMPPlus.inference calls (each calls the original and returns its result unchanged).

    .venv-ref/bin/python tools/speaker_reference.py --model DIR --out OUT_DIR [--clips A.wav ...] [--threads 2]

DIR is an official-layout directory (tools/speaker_checkpoint.py writes random-weight ones). Per clip
OUT_DIR/<stem>.npz holds, batch axis dropped, in the official layout:
  waveform [N] f32              the samples the official loader produced
  features [T, 80] f32          extract_feature's output (kaldi fbank, povey window, minus its mean over time)
  head.layer1, head.layer2      FCM stages [32, F', T]
  head                          FCM output [32*F/8, T]
  xvector.tdnn, xvector.block1..3, xvector.transit1..3, xvector.out_nonlinear    [C, T/2]
  xvector.stats [2C]            mean and std over time
  xvector.dense [E]             the embedding, as the last hook saw it
  embedding [E]                 generate()'s result["spk_embedding"][0]
and OUT_DIR/manifest.json lists the clips, shapes, timings, versions and the checkpoint's hash and load check.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
from official_hooks import sha256, to_numpy, version_of, wrap  # tools/, this script's folder

TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_CLIPS = [  # short WAVs (no resampling), 4-11 s, five languages
    "audio/zh/aishell1_BAC009S0724W0121.wav",
    "audio/zh/example_zh.wav",
    "audio/en/jfk.wav",
    "audio/ja/example_ja.wav",
    "audio/fr/fleurs_fr_fr_test_005.wav",
    "audio/de/fleurs_de_de_test_004.wav",
]
STAGES = (
    "head.layer1", "head.layer2", "head",
    "xvector.tdnn", "xvector.block1", "xvector.transit1", "xvector.block2", "xvector.transit2",
    "xvector.block3", "xvector.transit3", "xvector.out_nonlinear", "xvector.stats", "xvector.dense",
)




class Recorder:
    """Observes one official generate() call: hooks + recording wrappers, reset per call."""

    def __init__(self, am):
        import funasr.models.campplus.model as campplus_module

        self.am = am
        self.model = am.model
        self.rec: dict = {}
        self.t: dict = {}

        def on_load(_args, _kwargs, out, dt):
            wav = out[0] if isinstance(out, (list, tuple)) else out
            self.rec["waveform"] = to_numpy(wav).astype(np.float32)
            self.t["load_audio"] = dt

        def on_features(_args, _kwargs, out, dt):
            feats, lengths, _times = out
            if feats.shape[0] != 1 or int(lengths[0]) != feats.shape[1]:
                raise SystemExit("expected a batch of one unpadded utterance")
            self.rec["features"] = to_numpy(feats[0])
            self.t["features"] = dt

        # CAMPPlus.inference calls these two through its module's globals
        wrap(campplus_module, "load_audio_text_image_video", after=on_load)
        wrap(campplus_module, "extract_feature", after=on_features)

        def hook(name):
            def fn(mod, args, out):
                self.rec[name] = to_numpy(out[0])
            return fn

        modules = dict(self.model.named_modules())
        for name in STAGES:
            modules[name].register_forward_hook(hook(name))

        def pre(mod, args):
            self.t["_net0"] = time.perf_counter()

        def post(mod, args, out):
            self.t["network"] = time.perf_counter() - self.t.pop("_net0")

        # CAMPPlus.inference calls self.forward (not the module), so the network is timed head-in to xvector-out
        self.model.head.register_forward_pre_hook(pre)
        self.model.xvector.register_forward_hook(post)

    def run(self, audio: str) -> tuple[dict, dict]:
        self.rec, self.t = {}, {}
        t0 = time.perf_counter()
        result = self.am.generate(input=audio)
        self.t["total"] = time.perf_counter() - t0
        self.rec["embedding"] = to_numpy(result[0]["spk_embedding"][0])
        return self.rec, self.t


def check_loaded_weights(model, init_param: str) -> dict:
    """Every checkpoint tensor must have landed in the module unchanged, in the module's own key order (FunASR's
    loader skips shape mismatches with a log line only)."""
    import torch

    state = torch.load(init_param, map_location="cpu", weights_only=True)
    params = model.state_dict()
    bad = [k for k, v in state.items() if k not in params or params[k].shape != v.shape or not torch.equal(params[k], v)]
    if bad or set(params) != set(state):
        raise SystemExit(f"checkpoint tensors not loaded as stored: {bad[:5]} ({len(bad)} total); module keys not in "
                         f"the checkpoint: {sorted(set(params) - set(state))[:5]}")
    return {"checkpoint_tensors": len(state), "same_key_order": list(state) == list(params),
            "bare_state_dict": True, "training": model.training}


def versions() -> dict:
    import funasr
    import funasr.utils.fbank as fbank_module
    import torch

    return {
        "python": platform.python_version(), "funasr": funasr.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "kaldi_native_fbank": version_of("kaldi_native_fbank"),
        "fbank_backend": "torchaudio" if fbank_module._HAS_TORCHAUDIO else "kaldi-native-fbank",
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Dump CAM++ golden tensors from the official funasr code.")
    ap.add_argument("--model", required=True, type=Path, help="CAM++ directory (tools/speaker_checkpoint.py layout)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--clips", nargs="*", default=None, help=f"audio files (default: {len(DEFAULT_CLIPS)} clips)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torchaudio", choices=["block", "allow"], default="block",
                    help="block (default): hide an installed torchaudio, so the official code takes the path of the "
                    "pinned reference environment (soundfile decoding, kaldi-native-fbank)")
    args = ap.parse_args(argv)
    if args.torchaudio == "block":
        sys.modules["torchaudio"] = None  # `import torchaudio` now raises ImportError, as where it is absent

    import torch
    from funasr import AutoModel

    logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(0)
    clips = [Path(c) for c in args.clips] if args.clips else [TESTDATA / c for c in DEFAULT_CLIPS]
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    am = AutoModel(model=str(args.model), device="cpu", disable_update=True, disable_pbar=True, ncpu=args.threads,
                   log_level="WARNING")
    load_s = time.perf_counter() - t0
    if type(am.model).__name__ != "CAMPPlus":
        raise SystemExit(f"AutoModel built {type(am.model).__name__}, not CAMPPlus")
    load_check = check_loaded_weights(am.model, am.kwargs["init_param"])
    recorder = Recorder(am)
    recorder.run(str(clips[0]))  # warm-up (first-call allocations), not recorded

    entries = []
    for clip in clips:
        rec, times = recorder.run(str(clip))
        if not np.array_equal(rec["embedding"], rec["xvector.dense"]):
            raise SystemExit(f"{clip}: generate()'s embedding differs from the last module's output")
        missing = [s for s in ("waveform", "features", *STAGES) if s not in rec]
        if missing:
            raise SystemExit(f"{clip}: stages not observed: {missing}")
        name = clip.stem
        np.savez(args.out / f"{name}.npz", **rec)
        seconds = len(rec["waveform"]) / 16000
        entries.append({
            "name": name, "clip": str(clip.relative_to(TESTDATA)) if clip.is_relative_to(TESTDATA) else str(clip),
            "clip_sha256": sha256(clip), "num_samples": len(rec["waveform"]), "seconds": round(seconds, 3),
            "frames": int(rec["features"].shape[0]),
            "shapes": {k: list(v.shape) for k, v in rec.items()},
            "embedding_norm": float(np.linalg.norm(rec["embedding"])),
            "wall_s": {k: round(v, 4) for k, v in times.items() if not k.startswith("_")},
            "network_s_per_audio_s": round(times["network"] / seconds, 5),
        })
        print(f"{name:36s} {seconds:6.2f} s  T={entries[-1]['frames']:5d}  network {times['network'] * 1000:7.1f} ms "
              f"|emb|={entries[-1]['embedding_norm']:.3f}", flush=True)

    info_path = args.model / "checkpoint_info.json"
    manifest = {
        "generated_by": "tools/speaker_reference.py",
        "model_dir": str(args.model.resolve()),
        "checkpoint": json.loads(info_path.read_text()) if info_path.exists() else None,
        "weights_sha256": sha256(Path(am.kwargs["init_param"])),
        "model_conf": {k: am.kwargs.get("model_conf", {}).get(k) for k in
                       ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels", "config_str")},
        "load": {"wall_s": round(load_s, 3), **load_check},
        "stages": list(STAGES),
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "entries": entries,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    print(f"wrote {len(entries)} entries to {args.out}")


if __name__ == "__main__":
    main()
