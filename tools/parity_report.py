"""Per-clip, per-stage agreement with the official code's goldens, and wall times of both sides.

    .venv/bin/python -m tools.parity_report [GOLDENS_DIR]      # default .cache/goldens/tiny

GOLDENS_DIR comes from tools/make_goldens.sh (SIZE=full for the 830M-parameter shape). Prints a table and
writes GOLDENS_DIR/parity_report.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

# isort: off
import asr  # (preloads OpenBLAS before mlx is imported)
import mlx.core as mx
# isort: on
from asr.audio.features import fbank, lfr
from asr.model.llm import teacher_forced_logits

TESTDATA = Path(__file__).resolve().parents[1] / "tests" / "data"
OPTS = ("language", "hotwords", "itn")


def _cmp(ours: np.ndarray, ref: np.ndarray) -> dict:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return {"max_abs": float(np.abs(a - b).max()), "cos": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def main(goldens: Path) -> dict:
    manifest = json.loads((goldens / "manifest.json").read_text())
    t0 = time.perf_counter()
    model = asr.load_model(str(goldens / "model"), dtype="float32")
    load_s = time.perf_counter() - t0
    rows = []
    for e in manifest["entries"]:
        d = dict(np.load(goldens / f"{e['name']}.npz"))
        opts = {k: v for k, v in (e.get("options") or {}).items() if k in OPTS}
        n = int(d["fake_token_len"])
        ids = model.prompt_ids(**opts)
        row = {"name": e["name"], "options": opts}
        row["fbank"] = _cmp(np.array(fbank(mx.array(d["waveform"]))), d["fbank"])
        row["lfr_exact"] = bool(np.array_equal(np.array(lfr(mx.array(d["fbank"]))), d["lfr"]))
        row["encoder"] = _cmp(np.array(model.encode(mx.array(d["lfr"]))), d["encoder_out"])
        row["adaptor"] = _cmp(np.array(model.adapt(mx.array(d["encoder_out"]))), d["adaptor_out"])
        row["prompt_ids_equal"] = ids.prefix + [0] * n + ids.suffix == d["prompt_ids"].tolist()
        row["embeds"] = _cmp(np.array(model.prompt_embeddings(mx.array(d["adaptor_out"][:n]), ids)[0]),
                             d["inputs_embeds"])
        tf = np.array(teacher_forced_logits(model.net.llm, mx.array(d["inputs_embeds"])[None], d["greedy_ids"].tolist()))
        row["logits"] = _cmp(tf, d["tf_logits"])
        row["logits"]["min_step_cos"] = float(min(_cmp(tf[i], d["tf_logits"][i])["cos"] for i in range(len(tf))))
        t1 = time.perf_counter()
        r = model.transcribe(str(TESTDATA / e["clip"]), max_new_tokens=len(d["greedy_ids"]), vad=False,
                             repetition_guard=False, **opts)
        row["ours_wall_s"] = time.perf_counter() - t1
        ref_ids = d["greedy_ids"].tolist()
        row["tokens_match"] = sum(a == b for a, b in zip(r.token_ids, ref_ids, strict=False))
        row["tokens_total"] = len(ref_ids)
        row["identical"] = r.token_ids == ref_ids
        row["official_wall_s"] = (e.get("wall_s") or {}).get("total")
        rows.append(row)
        print(f"{e['name']:28} tokens {row['tokens_match']:2}/{row['tokens_total']}  fbank {row['fbank']['max_abs']:.1e}  "
              f"enc {row['encoder']['max_abs']:.1e}/{row['encoder']['cos']:.9f}  ada {row['adaptor']['max_abs']:.1e}  "
              f"emb {row['embeds']['max_abs']:.1e}  logits {row['logits']['max_abs']:.1e}/{row['logits']['min_step_cos']:.9f}  "
              f"ours {row['ours_wall_s']:.2f} s  official {row['official_wall_s']} s", flush=True)
    report = {"goldens": str(goldens), "checkpoint": manifest.get("checkpoint"), "load_s": load_s,
              "official_load_s": (manifest.get("load") or {}).get("wall_s"), "entries": rows}
    (goldens / "parity_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache/goldens/tiny"))
