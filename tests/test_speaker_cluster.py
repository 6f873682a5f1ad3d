"""asr.speaker.cluster gives the labels of the OFFICIAL funasr `ClusterBackend`, array for array.

The embedding matrices are built here from fixed seeds (NumPy's legacy RandomState, whose streams are frozen):
random ones of several sizes (the eigengap's own choice and given speaker counts), synthetic speakers of unequal
sizes and noise levels, two near speakers that the cosine merge joins, a speaker count that cuts a degenerate
eigenspace, 2100 rows with a count (the many-segment k-means) and 2048 rows without (UMAP + HDBSCAN).

The official labels come from tools/cluster_reference.py run in `.venv-ref` (one subprocess for all cases, started
before the port's own work so that both use the two cores), or, where there is no reference venv (or it fails), from
tests/fixtures/speaker_cluster/labels.json, made by the same script (see the README there). FUNASR_CLUSTER_REFERENCE
=fixture forces the fixture; FUNASR_REQUIRE_GOLDENS=1 makes a failing reference venv an error.

Both sides run with one thread (OpenMP, numba, BLAS): the official UMAP runs its gradient descent on every numba
thread without a seed, which no code, the official included, repeats; with one thread and NumPy's global RNG seeded
as `AutoModel` does, it is reproducible.

    python tests/test_speaker_cluster.py --write-fixtures     # in .venv, with .venv-ref present
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REF_PY = ROOT / ".venv-ref" / "bin" / "python"
TOOL = ROOT / "tools" / "cluster_reference.py"
FIXTURE = ROOT / "tests" / "fixtures" / "speaker_cluster" / "labels.json"

if __name__ != "__main__":
    pytest.importorskip("scipy", reason="speaker clustering needs SciPy (the `speakers` extra)")

sys.path.insert(0, str(ROOT))
from asr.errors import InvalidOptionError  # noqa: E402
from asr.speaker import cluster as C  # noqa: E402

DIM = 192  # CAM++ embeddings


# --- the cases ---------------------------------------------------------------------------------------------


def _synthetic(seed: int, sizes, noise: float, *, close: float | None = None, dim: int = DIM):
    """Speakers = random unit directions (speaker 1 at cosine `close` to speaker 0 if given) plus Gaussian noise
    of norm ~`noise`; rows shuffled. Returns float32 rows and the true speaker of each."""
    rs = np.random.RandomState(seed)
    centers = rs.randn(len(sizes), dim)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    if close is not None:
        other = centers[1] - (centers[1] @ centers[0]) * centers[0]
        centers[1] = close * centers[0] + np.sqrt(1 - close**2) * other / np.linalg.norm(other)
    truth = rs.permutation(np.concatenate([np.full(n, i) for i, n in enumerate(sizes)]))
    X = centers[truth] + noise * rs.randn(len(truth), dim) / np.sqrt(dim)
    return X.astype(np.float32), truth


def _random(seed: int, n: int, kind: str = "gauss", dim: int = DIM) -> np.ndarray:
    rs = np.random.RandomState(seed)
    if kind == "t3":
        return rs.standard_t(3, size=(n, dim)).astype(np.float32)
    if kind == "relu":
        return np.maximum(rs.randn(n, dim), 0).astype(np.float32)
    return rs.randn(n, dim).astype(np.float32)


@functools.cache
def cases() -> dict[str, dict]:
    """name -> {"X", "oracle_num", "seed", "merge_thr", "truth" (or None), "umap" (needs the UMAP branch)}."""
    out: dict[str, dict] = {}

    def add(name, X, *, oracle_num=None, seed=0, merge_thr=0.78, truth=None):
        out[name] = dict(
            X=X,
            oracle_num=oracle_num,
            seed=seed,
            merge_thr=merge_thr,
            truth=truth,
            umap=len(X) >= C.SPECTRAL_MAX_SEGMENTS and oracle_num is None,
        )

    add("short_12", _random(1, 12))  # < 20 rows: one speaker, no clustering
    # random: the eigengap's choice (1 speaker for wide Gaussians; more for 4-dim ones and heavy tails)
    add("rand_g4_20", _random(20, 20, dim=4))
    add("rand_g4_45", _random(45, 45, dim=4), seed=3)
    add("rand_g4_90", _random(90, 90, dim=4))
    add("rand_g4_90_thr05", _random(90, 90, dim=4), merge_thr=0.5)  # merges on random data
    add("rand_t3_20", _random(21, 20, "t3", dim=64))
    add("rand_g192_200", _random(200, 200))
    add("rand_relu_1000", _random(1000, 1000, "relu"))
    # random with a given speaker count: k-means on unstructured spectral embeddings (ties are likeliest here)
    add("rand_g192_60_k2", _random(60, 60), oracle_num=2)
    add("rand_g64_150_k3", _random(150, 150, dim=64), oracle_num=3, seed=7)
    add("rand_g192_300_k4", _random(300, 300), oracle_num=4)  # 2 chunks of 256 rows in Lloyd
    add("rand_g16_700_k6", _random(700, 700, dim=16), oracle_num=6, seed=1)
    # synthetic speakers, unequal sizes, noise levels
    for name, seed, sizes, noise in [
        ("syn2", 101, (60, 25), 0.5),
        ("syn3", 102, (80, 40, 15), 0.7),
        ("syn4", 103, (120, 60, 30, 12), 0.9),
        ("syn4_big", 104, (400, 200, 90, 40), 1.0),
        ("syn3_equal", 105, (30, 30, 30), 1.5),  # equal groups: eigen-basis and k-means++ ties
        ("syn2_noisy", 106, (150, 70), 1.3),
        ("syn5", 107, (500, 250, 120, 60, 30), 1.1),  # 4 chunks of 256 rows in Lloyd
    ]:
        X, truth = _synthetic(seed, sizes, noise)
        add(name, X, truth=truth)
    X, truth = _synthetic(7, (50, 40, 30), 0.3, close=0.85)  # spectral finds 3, the merge (0.78) leaves 2
    add("merge_close", X, truth=np.where(truth == 1, 0, truth))
    X, truth = _synthetic(8, (50, 40, 30), 0.8)
    add("oracle_cut", X, oracle_num=2)  # 2 of a 3-fold zero eigenvalue
    add("oracle_true", X, oracle_num=3, truth=truth)
    X, truth = _synthetic(12, (1100, 700, 300), 1.0)
    add("kmeans_2100_k3", X, oracle_num=3, truth=truth)  # >= 2048 rows with a count: k-means, 10 inits
    X, truth = _synthetic(11, (1000, 600, 350, 98), 0.8)
    add("umap_2048", X, truth=truth)  # >= 2048 rows without: UMAP + HDBSCAN, then the merge
    return out


def _sha(X: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(X, dtype=np.float32).tobytes()).hexdigest()


def _write_npz(path: Path) -> None:
    meta = {
        n: {"oracle_num": c["oracle_num"], "seed": c["seed"], "merge_thr": c["merge_thr"]}
        for n, c in cases().items()
    }
    np.savez(path, __meta__=np.array(json.dumps(meta)), **{n: c["X"] for n, c in cases().items()})


def _run_reference(npz: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REF_PY), str(TOOL), str(npz), str(out), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


class Reference:
    """The official labels: a reference-venv run started now and awaited on first use, else the fixture."""

    def __init__(self, tmp: Path):
        self.source = ""
        self._proc = self._out = None
        self._cases: dict | None = None
        mode = os.environ.get("FUNASR_CLUSTER_REFERENCE", "auto")
        if mode != "fixture" and REF_PY.exists():
            npz, self._out = tmp / "cases.npz", tmp / "labels.json"
            _write_npz(npz)
            self._proc = _run_reference(npz, self._out)

    def labels(self) -> dict:
        if self._cases is None:
            self._cases = self._load()
        return self._cases

    def _load(self) -> dict:
        problem = ""
        if self._proc is not None:
            try:
                log, _ = self._proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                log = "timed out after 600 s"
            if self._proc.returncode == 0:
                self.source = f"the official ClusterBackend in {REF_PY.parent.parent.name}"
                return json.loads(self._out.read_text())["cases"]
            problem = f"{TOOL.name} failed in {REF_PY.parent.parent}: {log[-2000:]}"
            if os.environ.get("FUNASR_REQUIRE_GOLDENS") == "1":
                pytest.fail(problem)
        if not FIXTURE.exists():
            pytest.skip(f"no official labels: {problem or 'no reference venv (.venv-ref)'} and no {FIXTURE}")
        data = json.loads(FIXTURE.read_text())
        self.source = f"{FIXTURE.relative_to(ROOT)} ({problem or 'no reference venv'})"
        return data["cases"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("speaker_cluster"))


@pytest.fixture(scope="module", autouse=True)
def _start_reference_early(reference):
    """Autouse: the reference subprocess starts before the first test, the port's work runs meanwhile."""
    return reference


def _needs_umap(name: str) -> None:
    if cases()[name]["umap"]:
        pytest.importorskip(
            "umap", reason="the UMAP + HDBSCAN branch needs umap-learn (the `speakers` extra)"
        )
        pytest.importorskip("sklearn.cluster", reason="HDBSCAN needs scikit-learn (the `speakers` extra)")


@functools.cache
def port_labels(name: str) -> np.ndarray:
    c = cases()[name]
    opts = C.ClusterOptions(merge_thr=c["merge_thr"])
    return C.cluster(c["X"], num_speakers=c["oracle_num"], options=opts, random_state=c["seed"])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


# --- tests ---------------------------------------------------------------------------------------------------

WITH_TRUTH = [n for n, c in cases().items() if c["truth"] is not None]


@pytest.mark.parametrize("name", WITH_TRUTH)
def test_recovers_known_speakers(name):
    _needs_umap(name)
    labels = port_labels(name)
    assert _same_partition(labels, cases()[name]["truth"]), np.unique(labels, return_counts=True)


def test_merge_case_merges():
    c = cases()["merge_close"]
    unmerged = C.cluster(c["X"], options=C.ClusterOptions(merge_thr=None), random_state=c["seed"])
    assert unmerged.max() + 1 == 3 and port_labels("merge_close").max() + 1 == 2


def test_official_dtypes_and_branches():
    assert port_labels("short_12").tolist() == [0] * 12 and port_labels("short_12").dtype == np.int64
    assert port_labels("syn3").dtype == np.int32  # sklearn's k-means labels
    assert C.cluster(cases()["short_12"]["X"], num_speakers=3).max() == 0  # < 20 rows ignores the count


def test_global_rng_by_default():
    X = cases()["rand_g192_60_k2"]["X"]
    np.random.seed(5)
    a = C.cluster(X, num_speakers=2)  # draws from NumPy's global RNG, as the official code
    assert np.array_equal(a, C.cluster(X, num_speakers=2, random_state=5))


def test_rejects_bad_input():
    X = cases()["syn2"]["X"]
    with pytest.raises(InvalidOptionError):
        C.cluster(X[0])
    with pytest.raises(InvalidOptionError):
        C.cluster(np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X))
    with pytest.raises(InvalidOptionError):
        C.cluster(X, num_speakers=0)
    with pytest.raises(InvalidOptionError):
        C.cluster(X, num_speakers=len(X) + 1)
    with pytest.raises(InvalidOptionError):
        C.ClusterOptions(merge_thr=1.5)


def test_kmeans_port_matches_sklearn():
    """The k-means port against scikit-learn's k_means itself (where installed), float32 and float64."""
    k_means = pytest.importorskip("sklearn.cluster._kmeans").k_means
    for seed, (n, d, k) in enumerate([(50, 3, 2), (300, 8, 5), (600, 4, 7), (90, 20, 9)]):
        X = np.random.RandomState(seed).rand(n, d)
        for dtype in (np.float32, np.float64):
            Xd = X.astype(dtype)
            for n_init in (1, 3):
                _, expected, _ = k_means(Xd, k, random_state=seed, n_init=n_init)
                got = C.kmeans(Xd, k, random_state=seed, n_init=n_init)
                assert np.array_equal(got, expected), (n, d, k, dtype, n_init)


@pytest.mark.parametrize("name", list(cases()))
def test_labels_equal_official(name, reference):
    _needs_umap(name)
    ref = reference.labels()
    assert name in ref, f"{name} is missing from {reference.source}: regenerate the fixture"
    expected = ref[name]
    assert expected["sha256"] == _sha(cases()[name]["X"]), (
        f"{name}: the embeddings differ from those {reference.source} was made from: regenerate the fixture"
    )
    got = port_labels(name)
    assert got.tolist() == expected["labels"], (
        f"{name}: {int(np.sum(got != np.asarray(expected['labels'])))} of {len(got)} labels differ from "
        f"{reference.source}"
    )
    assert str(got.dtype) == expected["dtype"]


def _first_appearance(labels: np.ndarray) -> list[int]:
    order: dict[int, int] = {}
    return [order.setdefault(int(v), len(order)) for v in labels]


SHORTCUT = C.ClusterOptions(all_eigenpairs=False)


@pytest.mark.parametrize("name", [n for n, c in cases().items() if not c["umap"] and 20 <= len(c["X"]) < 2048])
def test_first_eigenpairs_give_the_official_speakers(name, reference):
    """What the diarization uses (only the eigenpairs the spectral branch reads): the official partition, the same
    numbering once renumbered by first appearance (as the turns are)."""
    c = cases()[name]
    opts = C.ClusterOptions(merge_thr=c["merge_thr"], all_eigenpairs=False)
    got = C.cluster(c["X"], num_speakers=c["oracle_num"], options=opts, random_state=c["seed"])
    expected = reference.labels()[name]["labels"]
    assert _first_appearance(got) == _first_appearance(np.asarray(expected))


def _laplacian_of(X: np.ndarray) -> np.ndarray:
    A = C.p_pruning(C.cosine_similarity(np.asarray(X, dtype=np.float32)), 0.022)
    return C.laplacian(0.5 * (A + A.T))


def test_first_eigenpairs_fall_back_where_the_choice_is_ambiguous():
    # a count of 2 cuts the 3-fold zero eigenvalue of three separate groups: every eigenpair, as the official code
    c = cases()["oracle_cut"]
    k, vecs, full = C.spectral_embedding(_laplacian_of(c["X"]), 2, SHORTCUT)
    assert (k, vecs.shape[1], full) == (2, 2, True)
    # the true count, and the eigengap's own choice: the shortcut
    for n_spk in (3, None):
        k, vecs, full = C.spectral_embedding(_laplacian_of(c["X"]), n_spk, SHORTCUT)
        assert (k, vecs.shape[1], full) == (3, 3, False)
    # all_eigenpairs (the default) always decomposes everything
    assert C.spectral_embedding(_laplacian_of(c["X"]), 3, C.ClusterOptions())[2] is True


def test_first_eigenpairs_same_partition_on_random_conversations():
    """30 synthetic matrices (1-6 speakers of random or equal sizes, noise 0.2-1.6, with and without a count): the
    shortcut gives the partition of the full decomposition, numbered alike after renumbering by first appearance;
    the shortcut is taken in most of them (else this would test nothing)."""
    rs = np.random.RandomState(5)
    shortcuts = 0
    for i in range(30):
        n_spk = int(rs.randint(1, 7))
        sizes = rs.randint(5, 200, size=n_spk) if i % 3 else np.full(n_spk, int(rs.randint(10, 100)))
        X, _ = _synthetic(1000 + i, tuple(int(s) for s in sizes), float(rs.uniform(0.2, 1.6)))
        k = None if i % 2 else min(int(rs.randint(1, 8)), len(X))
        full = C.cluster(X, num_speakers=k, random_state=i)
        fast = C.cluster(X, num_speakers=k, options=SHORTCUT, random_state=i)
        assert _first_appearance(fast) == _first_appearance(full), (i, X.shape, k)
        shortcuts += not C.spectral_embedding(_laplacian_of(X), k, SHORTCUT)[2]
    assert shortcuts >= 20, shortcuts


def test_blas_threads_during_clustering_and_restored_after():
    from threadpoolctl import threadpool_info

    before = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    c = cases()["syn3"]
    one = C.cluster(c["X"], options=C.ClusterOptions(blas_threads=1), random_state=0)
    untouched = C.cluster(c["X"], options=C.ClusterOptions(blas_threads=None), random_state=0)
    assert one.tolist() == untouched.tolist() == port_labels("syn3").tolist()
    assert [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"] == before
    with pytest.raises(InvalidOptionError, match="blas_threads"):
        C.ClusterOptions(blas_threads=0)


# --- fixture generation ------------------------------------------------------------------------------------


def _write_fixtures() -> None:
    import tempfile

    if not REF_PY.exists():
        sys.exit(f"needs the reference venv {REF_PY.parent.parent} (tools/setup_reference_env.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = Path(tmp) / "cases.npz", Path(tmp) / "labels.json"
        _write_npz(npz)
        t0 = time.perf_counter()
        proc = _run_reference(npz, out)
        log, _ = proc.communicate()
        if proc.returncode:
            sys.exit(log)
        data = json.loads(out.read_text())
    for case in data["cases"].values():
        case.pop("seconds", None)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    FIXTURE.write_text(text + "\n")
    print(f"wrote {FIXTURE} ({len(text)} bytes, {time.perf_counter() - t0:.0f} s): {data['versions']}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-fixtures"]:
        _write_fixtures()
    else:
        sys.exit(__doc__)
