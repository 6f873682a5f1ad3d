"""Peak memory and wall time of `transcribe` on long audio, one fresh process per file.

Builds synthetic 16 kHz WAV files of the given lengths in minutes: one fixed minute of real speech clips from
tests/data separated by silences of 0.4-6 s with faint noise, repeated (written minute by minute: the hour
is never held in memory, and every length has the same speech density and segment mix). It writes the
tiny random checkpoint (tools/checkpoint.py), then runs `FunASRNano.transcribe` on each file - and on the 69 s
VoxPopuli clip, alone and looped for an hour (dense speech: every batch holds segments of up to 30 s) - in a
fresh subprocess and reports the process's peak resident memory (VmHWM from
/proc/self/status) after loading the model and after transcribing, with the wall times.

    python -m benchmarks.long_audio_rss [--minutes 1 60] [--looped-minutes 60] [--max-new-tokens 8] [--work DIR]
                                   [--json OUT]

Files up to asr.audio.io.STREAM_ABOVE_S (600 s) with a trustworthy duration are decoded in memory; longer ones take the two-pass block
streaming path, whose peak must not grow with duration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data"
VOXPOPULI = TESTDATA / "audio" / "long" / "voxpopuli_en_test_000.wav"
SR = 16000


def speech_clips() -> list[Path]:
    """The 16 kHz WAV clips of the test data (every language folder; not the 48 kHz MP3 original)."""
    clips = sorted(p for p in (TESTDATA / "audio").glob("*/*.wav") if p.parent.name != "original")
    if not clips:
        raise SystemExit(f"no test clips under {TESTDATA / 'audio'}")
    return clips


def minute_pattern(seed: int = 0) -> tuple[np.ndarray, int]:
    """60 s of speech clips (the short test clips, in a seeded random order) separated by 0.4-6 s of silence
    with faint noise (-66 dBFS RMS); it starts and ends with silence. Returns (samples, clips used)."""
    rng = np.random.default_rng(seed)
    clips = [p for p in speech_clips() if p != VOXPOPULI]
    total, parts, n, used = 60 * SR, [], 0, 0
    for k in rng.permutation(len(clips)):
        gap = int(rng.uniform(0.4, 6.0) * SR)
        x, sr = sf.read(clips[k], dtype="float32")
        assert sr == SR and x.ndim == 1, clips[k]
        if n + gap + len(x) + SR // 2 > total:
            continue
        parts += [np.zeros(gap, np.float32), x]
        n, used = n + gap + len(x), used + 1
    parts.append(np.zeros(total - n, np.float32))
    pattern = np.concatenate(parts)
    return pattern + (5e-4 * rng.standard_normal(total)).astype(np.float32), used


def write_long_wav(path: Path, minutes: int, seed: int = 0) -> dict:
    """`minutes` x the same 1-minute pattern, streamed to a PCM-16 WAV (one minute in memory at a time):
    every length has the same speech density and segment mix, so only the duration changes."""
    pattern, used = minute_pattern(seed)
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, subtype="PCM_16") as out:
        for _ in range(minutes):
            out.write(pattern)
    return {"seconds": minutes * 60.0, "clips": used * minutes}


def write_looped_voxpopuli(path: Path, minutes: int, seed: int = 0) -> dict:
    """The 69 s VoxPopuli clip + 1 s of faint noise, repeated for at least `minutes`: near-continuous speech,
    so every batch holds segments of up to 30 s (the worst case for memory, as in the clip alone)."""
    rng = np.random.default_rng(seed)
    x, sr = sf.read(VOXPOPULI, dtype="float32")
    assert sr == SR and x.ndim == 1
    unit = np.concatenate([x, (5e-4 * rng.standard_normal(SR)).astype(np.float32)])
    repeats = -(-minutes * 60 * SR // len(unit))
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, subtype="PCM_16") as out:
        for _ in range(repeats):
            out.write(unit)
    return {"seconds": repeats * len(unit) / SR, "clips": repeats}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(args: argparse.Namespace) -> None:
    """One measurement: load the model, transcribe one file, print a JSON line."""
    import asr  # first: BLAS preload before mlx

    t0 = time.perf_counter()
    model = asr.load_model(args.checkpoint, dtype=args.dtype)
    model.vad  # noqa: B018 - load the VAD too, so "after load" covers every weight
    load_s = time.perf_counter() - t0
    hwm_load = _status_kib("VmHWM")
    marks: list[tuple[float, int]] = []  # (fraction of the audio transcribed, VmHWM KiB) at each progress report

    def progress(done: float, total: float, _message: str) -> None:
        marks.append((done / total if total else 1.0, _status_kib("VmHWM")))

    t0 = time.perf_counter()
    r = model.transcribe(args.child, max_new_tokens=args.max_new_tokens, progress=progress)
    wall = time.perf_counter() - t0
    import mlx.core as mx

    def hwm_at(fraction: float) -> float:  # the peak so far when `fraction` of the audio was done
        return round(next((kib for f, kib in marks if f >= fraction), _status_kib("VmHWM")) / 1024, 1)

    print(json.dumps({
        "file": args.child, "audio_s": round(r.timings.audio_duration_s, 1), "segments": len(r.segments),
        "tokens": len(r.token_ids), "load_s": round(load_s, 2), "transcribe_s": round(wall, 2),
        "rtf": round(wall / r.timings.audio_duration_s, 4),
        "vad_and_read_s": round(r.timings.audio_decode_s, 2),
        "hwm_after_load_mib": round(hwm_load / 1024, 1), "hwm_mib": round(_status_kib("VmHWM") / 1024, 1),
        "hwm_at_25pct_mib": hwm_at(0.25), "hwm_at_50pct_mib": hwm_at(0.5),
        "rss_end_mib": round(_status_kib("VmRSS") / 1024, 1),
        "mlx_peak_mib": round(mx.get_peak_memory() / 2**20, 1), "mlx_cache_mib": round(mx.get_cache_memory() / 2**20, 1),
    }))


def measure(path: Path, checkpoint: Path, env: dict, max_new_tokens: int, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.long_audio_rss", "--child", str(path), "--checkpoint", str(checkpoint),
           "--max-new-tokens", str(max_new_tokens), "--dtype", dtype]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"measurement of {path} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, nargs="+", default=[1, 60], help="synthetic file lengths")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--work", type=Path, help="folder for the checkpoint and the files (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-voxpopuli", action="store_true", help="skip the 69 s VoxPopuli clip")
    ap.add_argument("--looped-minutes", type=int, default=60,
                    help="also the VoxPopuli clip looped for this long (dense speech, 30 s segments); 0: skip")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="long-audio-rss-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FUNASR_NANO_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
        checkpoint = work / "Fun-ASR-Nano-tiny"
        if not (checkpoint / "config.yaml").is_file():
            from tools.checkpoint import write_checkpoint

            write_checkpoint(checkpoint, size="tiny", seed=0)
        cases: list[tuple[str, Path, dict]] = []
        if not args.no_voxpopuli:
            cases.append(("voxpopuli 69 s", VOXPOPULI, {"seconds": 69.24, "clips": 1}))
        for minutes in args.minutes:
            path = work / f"synthetic-{minutes:g}min.wav"
            t0 = time.perf_counter()
            made = write_long_wav(path, minutes)
            made["write_s"] = round(time.perf_counter() - t0, 1)
            cases.append((f"synthetic {minutes:g} min", path, made))
        if args.looped_minutes:
            path = work / f"voxpopuli-looped-{args.looped_minutes}min.wav"
            t0 = time.perf_counter()
            made = write_looped_voxpopuli(path, args.looped_minutes)
            made["write_s"] = round(time.perf_counter() - t0, 1)
            cases.append((f"voxpopuli x{made['clips']}", path, made))
        measure(VOXPOPULI, checkpoint, env, 2, args.dtype)  # converts the checkpoint once (not measured)
        results = []
        for name, path, made in cases:
            r = measure(path, checkpoint, env, args.max_new_tokens, args.dtype)
            r.update(case=name, built=made)
            results.append(r)
            print(f"{name:>20}: {r['audio_s']:8.1f} s audio, {r['segments']:4d} segments | peak RSS (VmHWM) "
                  f"{r['hwm_mib']:6.1f} MiB (after load {r['hwm_after_load_mib']:.1f}, at 25 % "
                  f"{r['hwm_at_25pct_mib']:.1f}, at 50 % {r['hwm_at_50pct_mib']:.1f}), end RSS {r['rss_end_mib']:.1f}, "
                  f"MLX peak {r['mlx_peak_mib']:.1f}, MLX cache {r['mlx_cache_mib']:.1f} MiB | transcribe "
                  f"{r['transcribe_s']:.1f} s (RTF {r['rtf']:.4f}), process {r['process_s']:.1f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
