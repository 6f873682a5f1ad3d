"""`funasr-nano batch` on a folder of many short clips: files decoded together against one file at a time.

Builds a folder of --copies copies of the short test clips (or takes --folder), loads the model once, then runs
asr.batch.run_batch twice into fresh output folders, alternating: with --batch-size (short files share decode
batches) and with batch size 1 (each file alone, as `funasr-nano transcribe` does). Reports wall time and RTFx of
each and their ratio; --rounds alternates the two more times.

    python -m benchmarks.batch --model DIR [--copies 2] [--batch-size 16] [--max-new-tokens 32] [--rounds 1]
                               [--ray-replicas 1 2]

With --ray-replicas, the same folder also goes through `funasr-nano batch --ray`'s code on a local Ray cluster
(ray.init on this machine, one CPU slot per replica), once per replica count: wall time includes starting the
cluster and loading the model in every replica.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--folder", type=Path, help="audio folder (default: copies of the short test clips)")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ray-replicas", type=int, nargs="*", default=[],
                    help="also run on a local Ray cluster with each of these replica counts (one CPU slot each)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import asr  # noqa: I001  (first: picks the BLAS before MLX loads)
    from asr.batch import BatchOptions, discover, run_batch

    logging.getLogger("asr.batch").setLevel(logging.ERROR)  # random weights: every file hits max_new_tokens

    work = Path(tempfile.mkdtemp(prefix="funasr-batch-bench-"))
    try:
        folder = a.folder
        if folder is None:
            folder = work / "clips"
            folder.mkdir()
            clips = [p for p in sorted(AUDIO.glob("*/*.wav")) if p.parent.name not in ("long", "original")]
            for k in range(a.copies):
                for p in clips:
                    shutil.copy(p, folder / f"{k}-{p.parent.name}-{p.name}")
        items = discover([folder])
        model = asr.load_model(a.model, dtype=a.dtype)
        model.warmup(batch_size=a.batch_size)
        out: dict = {"files": len(items), "runtime": model.runtime.info.model_dump(), "rounds": []}
        for r in range(a.rounds):
            row = {}
            for name, bs in (("together", a.batch_size), ("one_at_a_time", 1)):
                s = run_batch(model, items, work / f"out-{r}-{name}",
                              BatchOptions(formats=("txt",), batch_size=bs, max_new_tokens=a.max_new_tokens,
                                           progress=False))
                assert s.failed == 0, s.failures
                row[name] = {"wall_s": round(s.wall_s, 2), "audio_s": round(s.audio_s, 1), "rtfx": round(s.rtfx, 2)}
            row["speedup"] = round(row["one_at_a_time"]["wall_s"] / row["together"]["wall_s"], 2)
            out["rounds"].append(row)
            print(json.dumps(row), flush=True)
        if a.ray_replicas:
            from asr.batch_ray import run_batch_ray

            out["ray"] = []
            for n in a.ray_replicas:
                s = run_batch_ray(items, work / f"out-ray-{n}", BatchOptions(
                    formats=("txt",), batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, progress=False),
                    model_kwargs={"path_or_repo": a.model, "dtype": a.dtype}, replicas=n, cpus_per_replica=1)
                assert s.failed == 0, s.failures
                row = {"replicas": n, "wall_s": round(s.wall_s, 2), "rtfx": round(s.rtfx, 2)}
                out["ray"].append(row)
                print(json.dumps(row), flush=True)
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
