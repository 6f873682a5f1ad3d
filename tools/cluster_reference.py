"""Speaker labels from the OFFICIAL funasr `ClusterBackend` (run in the reference venv `.venv-ref`).

    .venv-ref/bin/python tools/cluster_reference.py IN.npz OUT.json [--threads N] [--numpy-input]

IN.npz holds one N x D embedding matrix per case (any array name not starting with "__") and, optionally,
``__meta__``: a JSON string {case: {"oracle_num": int | null, "seed": int | null, "merge_thr": float}}.

Each case is clustered the way the official pipeline does it (funasr/auto/auto_model.py; bin/_server_app.py):
`ClusterBackend(**cb_kwargs)` with the default cb_kwargs (merge_thr=0.78), called on a float32 *torch* tensor
(`spk_embedding.cpu()`) with ``oracle_num=preset_spk_num`` (None unless given). `AutoModel.__init__` seeds
NumPy's global RNG with 0 (`set_all_random_seed`), which the spectral branch's k-means and UMAP then draw from:
the tool seeds it with the case's "seed" (default 0) right before each call, so each case sees the state a
first clustering after `AutoModel(...)` sees.

--threads N sets OMP_NUM_THREADS (scikit-learn's Lloyd step), NUMBA_NUM_THREADS (UMAP's SGD) and the BLAS thread
counts before anything is imported; without it the libraries use every core, as in the pipeline.

OUT.json: {"cases": {case: {"labels": [...], "dtype": "int32", "sha256": <of the float32 input bytes>,
"oracle_num": ..., "seed": ..., "merge_thr": ...}}, "versions": {...}, "threads": N | null}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inp", help="npz of embedding matrices")
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument(
        "--threads", type=int, default=None, help="pin OpenMP/numba/BLAS threads (default: all cores)"
    )
    ap.add_argument("--numpy-input", action="store_true", help="pass a NumPy array instead of a torch tensor")
    args = ap.parse_args(argv)
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import funasr
    import numpy as np
    import scipy
    import sklearn
    import torch
    import umap
    from funasr.models.campplus.cluster_backend import ClusterBackend

    data = np.load(args.inp, allow_pickle=False)
    meta = json.loads(str(data["__meta__"])) if "__meta__" in data.files else {}
    cases = {}
    for name in data.files:
        if name.startswith("__"):
            continue
        X = np.ascontiguousarray(data[name], dtype=np.float32)
        m = meta.get(name, {})
        oracle_num = m.get("oracle_num")
        seed = m.get("seed", 0)
        merge_thr = m.get("merge_thr", 0.78)
        cb = ClusterBackend(merge_thr=merge_thr).to("cpu")
        x = X.copy() if args.numpy_input else torch.from_numpy(X.copy())
        if seed is not None:
            np.random.seed(seed)
        t0 = time.perf_counter()
        labels = np.asarray(cb(x, oracle_num=oracle_num))
        cases[name] = {
            "labels": labels.tolist(),
            "dtype": str(labels.dtype),
            "sha256": hashlib.sha256(X.tobytes()).hexdigest(),
            "shape": list(X.shape),
            "oracle_num": oracle_num,
            "seed": seed,
            "merge_thr": merge_thr,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    versions = {
        "funasr": funasr.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "umap-learn": getattr(umap, "__version__", "?"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    with open(args.out, "w") as f:
        json.dump({"cases": cases, "versions": versions, "threads": args.threads}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
