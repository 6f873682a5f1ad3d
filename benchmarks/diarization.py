"""What speakers= adds to a long file's transcription: the same audio with and without diarization, alternating.

Builds --minutes of conversation from the test clips (short pauses between them), loads the ASR model and a CAM++
speaker model (--speaker-model, or a full-size random one in the official layout written by
tools/speaker_checkpoint.py: the same shapes and cost as the real one), then times transcribe() without and with
speakers="auto" (--rounds times each, alternating) and reports the wall times, the diarization stage
(timings.speakers_s) and the ratio.

    python -m benchmarks.diarization --model DIR [--speaker-model DIR] [--minutes 5] [--rounds 2] \
        [--speaker-backends cpu mlx]

--speaker-backends times "with" once per CAM++ runner (asr.loading.speaker: cpu = NumPy + BLAS, mlx = the
reference network on MLX's device, mlx-compiled = the same under mx.compile); default: the one load_model chooses.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"


def conversation(minutes: float) -> np.ndarray:
    import soundfile as sf

    clips = [sf.read(p, dtype="float32")[0] for p in sorted(AUDIO.glob("*/*.wav"))
             if p.parent.name not in ("long", "original")]  # each read once
    rng = np.random.default_rng(0)
    parts, n = [], 0
    while n < minutes * 60 * 16000:
        x = clips[int(rng.integers(len(clips)))]
        pause = np.zeros(int(rng.uniform(0.2, 1.2) * 16000), np.float32)
        parts += [x, pause]
        n += len(x) + len(pause)
    return np.concatenate(parts)[: int(minutes * 60 * 16000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--speaker-model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--speaker-backends", nargs="+", choices=("cpu", "mlx", "mlx-compiled"))
    ap.add_argument("--speaker-batches", nargs="+", type=int,
                    help="windows a CAM++ batch: time 'with' once per value (default: what load_campplus chose)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import asr  # noqa: I001  (first: picks the BLAS before MLX loads)

    speaker = a.speaker_model
    if speaker is None:
        from tools.speaker_checkpoint import write_checkpoint

        speaker = str(write_checkpoint(Path(tempfile.mkdtemp(prefix="campplus-")) / "campplus", size="full", seed=0))
    model = asr.load_model(a.model, dtype=a.dtype, speaker_model=speaker)
    model.warmup()
    samples = conversation(a.minutes)
    from asr.loading.speaker import load_campplus

    def label(m) -> str:
        return m.backend + ("-compiled" if m.compiled else "")

    runners = {label(model.speaker_model): model.speaker_model}
    for b in a.speaker_backends or []:
        if b not in runners:
            runners[b] = load_campplus(speaker, backend=b.split("-")[0], compiled=b.endswith("-compiled"))
    if a.speaker_backends:
        runners = {b: runners[b] for b in a.speaker_backends}
    for runner in runners.values():  # warm each speaker path
        model.speaker_model = runner
        model.transcribe(samples[: 30 * 16000], speakers="auto", max_new_tokens=4)
    rows = []
    batches = a.speaker_batches or [None]
    for _ in range(a.rounds):
        row = {}
        runs = [("without", None, None, None)] + [
            (f"with {b}" + (f" batch {n}" if n else ""), "auto", r, n) for b, r in runners.items() for n in batches]
        for name, speakers, runner, n in runs:
            if runner is not None:
                model.speaker_model = runner
                if n:
                    runner.batch = n
            t0 = time.perf_counter()
            r = model.transcribe(samples, speakers=speakers, max_new_tokens=a.max_new_tokens)
            row[name] = {"wall_s": round(time.perf_counter() - t0, 2), "speakers_s": round(r.timings.speakers_s, 2),
                         "segments": len(r.segments), "speakers": len({s.speaker for s in r.segments})}
            if runner is not None:
                row[name]["added"] = round(row[name]["wall_s"] / row["without"]["wall_s"] - 1, 4)
                row[name]["ms_per_audio_s"] = round(1000 * r.timings.speakers_s / (len(samples) / 16000), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    import statistics

    summary = {"without_median_s": statistics.median(r["without"]["wall_s"] for r in rows)}
    for name in rows[0]:
        if name != "without":
            summary[name] = {
                "median_s": statistics.median(r[name]["wall_s"] for r in rows),
                "added_by_medians": round(statistics.median(r[name]["wall_s"] for r in rows)
                                          / summary["without_median_s"] - 1, 4),
                "median_added_per_round": statistics.median(r[name]["added"] for r in rows),
                "diarization_median_s": statistics.median(r[name]["speakers_s"] for r in rows)}
    print(json.dumps({"summary": summary}), flush=True)
    out = {"minutes": a.minutes, "runtime": model.runtime.info.model_dump(), "rounds": rows, "summary": summary}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
