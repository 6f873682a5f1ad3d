"""Where diarization's time goes: CAM++ stage by stage for one batch of windows, and the clustering's steps.

    python -m benchmarks.speaker_stages [--speaker-model DIR] [--batch 256] [--windows 800] [--repeats 5] \
        [--other-batches 128 512] [--profile]

CAM++ (the MLX network on MLX's default device: Metal, CUDA or the CPU): the features of `--batch` 1.5 s windows of
real speech (the test clips), each stage of asr.speaker.campplus.STAGES with an eval after it, the whole network
without evals between stages, and the same under mx.compile (fixed shapes). Clustering (host CPU, NumPy/SciPy) of
`--windows` embeddings of those windows: each step of the spectral branch, the full `eigh` against the one that
computes only the eigenpairs the branch reads. Medians of `--repeats` after a warm-up; milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"


def _windows(n: int, length: int = 24000) -> np.ndarray:
    import soundfile as sf

    clips = [sf.read(p, dtype="float32")[0] for p in sorted(AUDIO.glob("*/*.wav"))
             if p.parent.name not in ("long", "original")]
    speech = np.concatenate(clips)
    starts = (np.arange(n) * 12000) % (len(speech) - length)
    return np.stack([speech[s: s + length] for s in starts])


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speaker-model")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--windows", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--other-batches", nargs="*", type=int, default=[],
                    help="also time the whole network (plain and compiled) for these batch sizes")
    ap.add_argument("--profile", action="store_true", help="print where the clustering's time goes (cProfile)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import mlx.core as mx

    from asr.loading.speaker import load_campplus
    from asr.speaker import cluster as C
    from asr.speaker.campplus import STAGES

    speaker = a.speaker_model
    if speaker is None:
        from tools.speaker_checkpoint import write_checkpoint

        speaker = str(write_checkpoint(Path(tempfile.mkdtemp(prefix="campplus-")) / "campplus", size="full", seed=0))
    sm = load_campplus(speaker, backend="mlx")
    net = sm.net
    out: dict = {"device": str(mx.default_device()), "batch": a.batch}
    wins = _windows(a.batch)

    def feats():
        f = sm.features(wins)
        mx.eval(f)
        return f

    out["features_ms"] = _median_ms(feats, a.repeats)
    f = feats()
    stages = {}
    for name in STAGES:  # each stage fed the previous one's (evaluated) output
        prev = f
        for s in STAGES[: STAGES.index(name)]:
            prev = net.run_stage(s, prev)
        mx.eval(prev)
        stages[name] = _median_ms(lambda n=name, p=prev: mx.eval(net.run_stage(n, p)), a.repeats)
    out["stages_ms"] = stages
    out["stages_sum_ms"] = round(sum(stages.values()), 2)
    ref = net.embed(f)
    mx.eval(ref)
    sizes = {}
    for b in a.other_batches + [a.batch]:  # the whole network per batch size, plain and under mx.compile
        fb = f if b == a.batch else sm.features(_windows(b))
        compiled = mx.compile(net.embed)
        t0 = time.perf_counter()
        got = compiled(fb)
        mx.eval(got)
        first = round(1000 * (time.perf_counter() - t0), 1)
        plain = net.embed(fb)
        sizes[b] = {"embed_ms": _median_ms(lambda fb=fb: mx.eval(net.embed(fb)), a.repeats),
                    "compiled_ms": _median_ms(lambda fb=fb, c=compiled: mx.eval(c(fb)), a.repeats),
                    "compiled_first_call_ms": first,
                    "compiled_max_abs_diff": float(mx.max(mx.abs(plain - got))),
                    "max_abs": float(mx.max(mx.abs(plain)))}
    out["whole_network"] = sizes

    # the diarization's call: --windows windows through SpeakerModel.embed_windows, plain and compiled runners
    import dataclasses

    from asr.backends.mlx.campplus import CompiledCAMPPlus

    many = list(_windows(a.windows))
    runs = {}
    for label, runner in (("plain", net), ("compiled", CompiledCAMPPlus(net))):
        m = dataclasses.replace(sm, runner=runner, batch=a.batch)
        t0 = time.perf_counter()
        e = m.embed_windows(many)
        runs[label] = {"first_call_ms": round(1000 * (time.perf_counter() - t0), 1),
                       "ms": _median_ms(lambda m=m: m.embed_windows(many), a.repeats), "emb": e}
    diff = float(np.max(np.abs(runs["plain"]["emb"] - runs["compiled"]["emb"])))
    out["embed_windows"] = {k: {kk: vv for kk, vv in v.items() if kk != "emb"} for k, v in runs.items()}
    out["embed_windows"]["compiled_max_abs_diff"] = diff

    # clustering of --windows embeddings (the batch's embeddings repeated with a little noise)
    emb = np.asarray(ref, dtype=np.float32)
    reps = -(-a.windows // len(emb))
    X = np.tile(emb, (reps, 1))[: a.windows]
    X = (X + 0.05 * np.random.default_rng(0).standard_normal(X.shape).astype(np.float32) * np.abs(X).mean())
    import scipy.linalg as sl

    A = C.cosine_similarity(X)
    P = C.p_pruning(A.copy(), 0.022)
    L = C.laplacian(0.5 * (P + P.T))
    steps = {
        "cosine": _median_ms(lambda: C.cosine_similarity(X), a.repeats),
        "p_pruning": _median_ms(lambda: C.p_pruning(A.copy(), 0.022), a.repeats),
        "eigh_full": _median_ms(lambda: sl.eigh(L), a.repeats),
        "eigh_first_17": _median_ms(lambda: sl.eigh(L, subset_by_index=[0, 16]), a.repeats),
        "cluster_total": _median_ms(lambda: C.cluster(X, random_state=0), a.repeats),
        "cluster_diarization": _median_ms(lambda: C.cluster(X, options=C.DIARIZATION, random_state=0), a.repeats),
    }
    try:  # the host BLAS's thread count (numpy's and scipy's OpenBLAS) for the diarization's clustering
        from threadpoolctl import threadpool_limits

        for n in (1, 4):
            with threadpool_limits(limits=n):
                steps[f"cluster_diarization_blas{n}"] = _median_ms(
                    lambda: C.cluster(X, options=C.DIARIZATION, random_state=0), a.repeats)
    except ImportError:
        pass
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(C.cluster, X, random_state=0)
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    out["clustering_ms"] = steps
    out["clustering_windows"] = a.windows
    print(json.dumps(out, indent=1), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
