"""Speaker clustering that returns the labels of FunASR's official `ClusterBackend`.

    labels = cluster(embeddings)                    # one row per speech chunk -> one speaker id per row
    labels = cluster(embeddings, num_speakers=3)    # `preset_spk_num` of the official pipeline

The official code is `funasr/models/campplus/cluster_backend.py` (from 3D-Speaker). `ClusterBackend.forward`:

* fewer than 20 rows: every row is speaker 0;
* fewer than 2048 rows: `SpectralCluster` -- cosine similarities, p-value pruning (each row keeps its
  ``max(pval * N, 6)`` largest similarities), symmetrised, unnormalised Laplacian, `scipy.linalg.eigh`, the number
  of speakers from the largest eigengap among the first 16 eigenvalues (or `oracle_num`), then scikit-learn's
  `k_means` (k-means++, one init, Lloyd) on the first k eigenvectors;
* 2048 rows or more with `oracle_num`: `KMeansCluster` -- k-means on the L2-normalised rows (random_state=0,
  ten inits);
* 2048 rows or more without: `UmapHdbscan` -- UMAP (20 neighbours, min_dist 0, 60 dimensions, cosine) then
  HDBSCAN (min_samples 10, min_cluster_size 10, a single cluster allowed; -1 marks noise);
* without `oracle_num`, speakers whose mean embeddings have a cosine similarity >= `merge_thr` (0.78) are merged,
  the closest pair first, and the later ids shift down.

What is ported and what is borrowed:

* everything up to the eigendecomposition is the same NumPy operations on the same dtype (float32 in the
  pipeline, which passes a float32 torch tensor): bit-identical;
* the eigendecomposition is `scipy.linalg.eigh`, as in the official code (LAPACK ``syevr``). NumPy's `eigh`
  (``syevd``) is not used on purpose: where eigenvalues coincide (well separated groups are exactly that: one zero
  eigenvalue per connected component) the two return different bases of the same eigenspace, and k-means on
  equally sized groups, or an oracle count that cuts such an eigenspace, then gives other labels;
* scikit-learn's `k_means` is ported line for line (`_kmeans_plusplus`, the float64-upcast distances it uses,
  `_kmeans_single_lloyd` with its 256-row chunks, per-thread partial sums and the BLAS on one thread (its
  products are small: with a BLAS on many threads they wait on the threads' start more than they multiply; 800
  rows on the 2-core VM: 35 ms on one thread, 49-70 ms on two), empty-cluster relocation, the
  tolerance and strict-convergence tests, best-of-n_init): it draws the same random numbers from the same
  `RandomState` in the same order, so it picks the same seeds and makes the same assignments. Like the official
  spectral branch, ``random_state=None`` draws from NumPy's global RNG (`AutoModel` seeds it with 0);
* UMAP + HDBSCAN (the branch for 2048+ chunks without a speaker count) come from umap-learn and scikit-learn,
  called exactly as the official code does: a port of UMAP would be thousands of lines that could only be
  checked against umap-learn anyway. With SciPy they form the optional ``speakers`` extra; each is imported only
  when its branch runs (SciPy for fewer than 2048 chunks, scikit-learn and umap-learn from 2048 on).

Limits: the official results themselves depend on the platform below the last bit (OpenBLAS kernels, OpenMP
thread count in scikit-learn's Lloyd step, FMA contraction in its compiled distance loop), so "identical" means
identical wherever no two candidate distances are within a rounding error of each other. UMAP without a seed
runs its stochastic gradient descent on all numba threads and is not reproducible even in the official code;
with a `random_state` it runs single-threaded and repeats the official run made with that seed on one thread.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import InvalidOptionError
from ..options import MAX_SPEAKERS, usable_cores

__all__ = ["DIARIZATION", "ClusterBackend", "ClusterOptions", "cluster", "merge_by_cos", "spectral_embedding"]

MIN_SEGMENTS = 20  # fewer rows: a single speaker (official `X.shape[0] < 20`)
SPECTRAL_MAX_SEGMENTS = 2048  # from here on: k-means (speaker count given) or UMAP + HDBSCAN
_KMEANS_CHUNK = 256  # sklearn.cluster._k_means_common.CHUNK_SIZE


@dataclass(frozen=True)
class ClusterOptions:
    """The official defaults (`ClusterBackend(merge_thr=0.78)`, `SpectralCluster()`, `UmapHdbscan()`).

    merge_thr: merge speakers whose centroids' cosine similarity is >= this (None: never merge); the official
        pipeline passes `spk_kwargs["cb_kwargs"]`, empty by default, so 0.78.
    min_num_spks / max_num_spks / pval: the spectral branch's eigengap range and p-value pruning ratio.
    n_neighbors / n_components / min_samples / min_cluster_size / metric: UMAP and HDBSCAN.
    kmeans_threads: the OpenMP thread count whose partial sums the k-means port reproduces (scikit-learn uses
        every core; this only moves centroids by rounding errors, practically never a label).
    all_eigenpairs: decompose the whole Laplacian as the official code does (`eigh(L)`: ~0.1 s for 800 rows).
        False computes only the eigenpairs the branch reads (the first max_num_spks + 1, or k): ~7x faster and the
        same partition into speakers (see `spectral_embedding`), though k-means may number the speakers in another
        order where rounding-level ties meet; the diarization renumbers by first appearance, so it uses False
        (`DIARIZATION`).
    blas_threads: the BLAS's threads while clustering (at most the cores this process may use; restored after;
        None leaves them): its products are small, and on a 16-core GPU host the diarization's clustering of 800 rows
        took 159 ms with the BLAS on 16 threads, 42 ms on 1 and 35 ms on 4 (benchmarks/speaker_stages.py). Labels
        do not depend on it.
    """

    merge_thr: float | None = 0.78
    min_num_spks: int = 1
    max_num_spks: int = MAX_SPEAKERS
    pval: float = 0.022
    n_neighbors: int = 20
    n_components: int = 60
    min_samples: int = 10
    min_cluster_size: int = 10
    metric: str = "cosine"
    kmeans_threads: int = 1
    all_eigenpairs: bool = True
    blas_threads: int | None = 4

    def __post_init__(self) -> None:
        if self.merge_thr is not None and not 0 < self.merge_thr <= 1:
            raise InvalidOptionError(f"merge_thr must be in (0, 1] or None, got {self.merge_thr!r}")
        if not 1 <= self.min_num_spks <= self.max_num_spks:
            raise InvalidOptionError(
                f"need 1 <= min_num_spks <= max_num_spks, got {self.min_num_spks} and {self.max_num_spks}"
            )
        if not 0 < self.pval < 1:
            raise InvalidOptionError(f"pval must be in (0, 1), got {self.pval!r}")
        if self.kmeans_threads < 1:
            raise InvalidOptionError(f"kmeans_threads must be >= 1, got {self.kmeans_threads!r}")
        if self.blas_threads is not None and self.blas_threads < 1:
            raise InvalidOptionError(f"blas_threads must be >= 1 or None, got {self.blas_threads!r}")


# what the diarization uses: only the eigenpairs the spectral branch reads (it renumbers speakers by first
# appearance, so a k-means numbering in another order changes nothing there)
DIARIZATION = ClusterOptions(all_eigenpairs=False)


def cluster(
    embeddings: np.ndarray,
    *,
    num_speakers: int | None = None,
    options: ClusterOptions | None = None,
    random_state: int | np.random.RandomState | None = None,
) -> np.ndarray:
    """Speaker id per row of ``embeddings`` (N x D), as `ClusterBackend()(embeddings, oracle_num=num_speakers)`.

    The result has the official dtype: int64 for fewer than 20 rows and for HDBSCAN (where -1 marks noise),
    int32 from k-means. ``random_state=None`` draws from NumPy's global RNG like the official code; an int or a
    `RandomState` makes the result reproducible.
    """
    return ClusterBackend(options=options)(embeddings, oracle_num=num_speakers, random_state=random_state)


class ClusterBackend:
    """Mirror of `funasr.models.campplus.cluster_backend.ClusterBackend` (no torch)."""

    def __init__(self, merge_thr: float | None = 0.78, *, options: ClusterOptions | None = None):
        if options is None:
            options = ClusterOptions(merge_thr=merge_thr)
        self.options = options

    def __call__(
        self,
        X: np.ndarray,
        oracle_num: int | None = None,
        *,
        random_state: int | np.random.RandomState | None = None,
    ) -> np.ndarray:
        opts = self.options
        X = _as_float_matrix(X)
        n = X.shape[0]
        k = oracle_num
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise InvalidOptionError(f"num_speakers must be a positive integer, got {k!r}")
            k = int(k)
            if n >= MIN_SEGMENTS and k > n:
                raise InvalidOptionError(f"num_speakers={k} exceeds the number of embeddings ({n})")
        if n < MIN_SEGMENTS:
            return np.zeros(n, dtype=np.int64)
        if n < SPECTRAL_MAX_SEGMENTS:
            _scipy_linalg()  # loaded before the BLAS libraries are looked up, so its own is limited too
        pools = ThreadpoolController()  # one look-up of the loaded BLAS libraries for the whole call
        if opts.blas_threads is None:
            return self._cluster(X, k, random_state, pools)
        with pools.limit(limits=min(opts.blas_threads, usable_cores()), user_api="blas"):
            return self._cluster(X, k, random_state, pools)

    def _cluster(self, X: np.ndarray, k: int | None, random_state: int | np.random.RandomState | None,
                 pools: ThreadpoolController) -> np.ndarray:
        opts = self.options
        n = X.shape[0]
        rng = _check_random_state(random_state)
        if n < SPECTRAL_MAX_SEGMENTS:
            labels = spectral_cluster(X, k, opts, rng, pools)
        elif k is not None:
            labels = kmeans_cluster(X, k, opts, rng, pools)
        else:
            labels = umap_hdbscan_cluster(X, opts, random_state)
        if k is None and opts.merge_thr is not None:
            labels = merge_by_cos(labels, X, opts.merge_thr)
        return labels


# --- spectral branch (SpectralCluster) ---------------------------------------------------------------------


def spectral_cluster(
    X: np.ndarray, k: int | None, opts: ClusterOptions, rng: np.random.RandomState,
    pools: ThreadpoolController | None = None,
) -> np.ndarray:
    A = cosine_similarity(X)
    A = p_pruning(A, opts.pval)
    A = 0.5 * (A + A.T)
    L = laplacian(A)
    k, emb, _ = spectral_embedding(L, k, opts)
    return kmeans(emb, k, random_state=rng, n_init=1, n_threads=opts.kmeans_threads, pools=pools)


# eigenvalues closer than this (relative to the largest one computed) count as equal: float32 `syevr` run on all
# of L or on its first eigenpairs agrees to ~1e-6 of that (measured: 2e-6 on 800 rows)
_EIG_TOL = 1e-4


def spectral_embedding(L: np.ndarray, k: int | None, opts: ClusterOptions) -> tuple[int, np.ndarray, bool]:
    """(k, the first k eigenvectors of the Laplacian, whether all eigenpairs were computed).

    The official code computes every eigenpair (`scipy.linalg.eigh(L)`), then reads the first max_num_spks + 1
    eigenvalues (the eigengap's choice of k) and the first k eigenvectors. Only those are computed here unless
    `opts.all_eigenpairs`; LAPACK then returns another basis of the same k-dimensional eigenspace (signs, rotations
    within repeated eigenvalues), and k-means (k-means++ seeding, Lloyd) on the rows depends only on the distances
    between rows, which no orthogonal change of basis alters: the same labels up to rounding (where rows of one
    speaker are nearly identical, k-means++ may seed from another of them: the same partition, the speakers
    numbered in another order; measured on 150 random synthetic cases: 10 such, no other difference). That holds
    when the first k eigenvectors span a well-defined space and the eigengap's choice is clear, so the whole
    Laplacian is decomposed after all when eigenvalue k - 1 and eigenvalue k coincide (a count that cuts a repeated eigenvalue: the official
    result then depends on LAPACK's arbitrary basis) or when the two largest gaps tie."""
    n = L.shape[0]
    eigh = _scipy_linalg().eigh
    last = min(n - 1, opts.max_num_spks if k is None else max(k, opts.max_num_spks))
    if not opts.all_eigenpairs and last < n - 1:
        lambdas, vecs = eigh(L, subset_by_index=[0, last])
        tol = _EIG_TOL * max(1.0, float(np.max(np.abs(lambdas))))
        k_sub = k if k is not None else _eigengap_k(lambdas, opts)
        clear = k_sub >= len(lambdas) or float(lambdas[k_sub]) - float(lambdas[k_sub - 1]) > tol
        if k is None:
            gaps = np.sort(np.diff(lambdas[opts.min_num_spks - 1: opts.max_num_spks + 1].astype(np.float64)))
            clear = clear and (len(gaps) < 2 or gaps[-1] - gaps[-2] > tol)
        if clear:
            return k_sub, vecs[:, :k_sub], False
    lambdas, vecs = eigh(L)
    k = k if k is not None else _eigengap_k(lambdas, opts)
    return k, vecs[:, :k], True


def _eigengap_k(lambdas: np.ndarray, opts: ClusterOptions) -> int:
    vals = lambdas[opts.min_num_spks - 1 : opts.max_num_spks + 1]
    gaps = [float(vals[i + 1]) - float(vals[i]) for i in range(len(vals) - 1)]
    return int(np.argmax(gaps)) + opts.min_num_spks


def _scipy_linalg():
    try:
        import scipy.linalg
    except ImportError as e:
        raise InvalidOptionError(
            "speaker clustering needs SciPy (the eigendecomposition the official code uses): "
            f"pip install 'funasr-nano-mlx[speakers]' ({e})"
        ) from e
    return scipy.linalg


def cosine_similarity(X: np.ndarray) -> np.ndarray:
    """sklearn.metrics.pairwise.cosine_similarity(X, X): rows scaled by their norms, then Xn @ Xn.T."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0  # _handle_zeros_in_scale
    Xn = X / norms[:, None]
    return Xn @ Xn.T  # the same operands as sklearn's, so NumPy takes the same (syrk) path


def p_pruning(A: np.ndarray, pval: float) -> np.ndarray:
    """Zero each row's smallest similarities, keeping the largest ``max(pval * N, 6)`` (in place)."""
    n = A.shape[0]
    if n * pval < 6:
        pval = 6.0 / n
    n_elems = int((1 - pval) * n)
    for i in range(n):
        A[i, np.argsort(A[i, :])[0:n_elems]] = 0
    return A


def laplacian(M: np.ndarray) -> np.ndarray:
    M[np.diag_indices(M.shape[0])] = 0
    D = np.diag(np.sum(np.abs(M), axis=1))
    return D - M


# --- many segments with a speaker count (KMeansCluster) ----------------------------------------------------


def kmeans_cluster(X: np.ndarray, k: int, opts: ClusterOptions, rng: np.random.RandomState,
                   pools: ThreadpoolController | None = None) -> np.ndarray:
    """KMeansCluster: k-means (random_state=0, n_init=10) on the L2-normalised rows. ``rng`` is unused: the
    official fixes the seed."""
    del rng
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    return kmeans(X / norms[:, None], k, random_state=0, n_init=10, n_threads=opts.kmeans_threads, pools=pools)


# --- many segments without a speaker count (UmapHdbscan) ---------------------------------------------------


def umap_hdbscan_cluster(
    X: np.ndarray, opts: ClusterOptions, random_state: int | np.random.RandomState | None
) -> np.ndarray:
    try:
        import umap.umap_ as umap
        from sklearn.cluster import HDBSCAN
    except ImportError as e:
        raise InvalidOptionError(
            f"clustering {X.shape[0]} speech chunks (>= {SPECTRAL_MAX_SEGMENTS}) without a speaker count uses UMAP and "
            f"HDBSCAN, which need the `speakers` extra: pip install 'funasr-nano-mlx[speakers]' "
            f"(scikit-learn, umap-learn); or give the number of speakers ({e})"
        ) from e
    if isinstance(random_state, (int, np.integer)):
        random_state = np.random.RandomState(int(random_state))
    # a RandomState makes UMAP single-threaded and reproducible (it says so in a UserWarning); None keeps the
    # official call: NumPy's global RNG and every numba thread
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden to 1 by setting random_state")
        umap_X = umap.UMAP(
            n_neighbors=opts.n_neighbors,
            min_dist=0.0,
            n_components=min(opts.n_components, X.shape[0] - 2),
            metric=opts.metric,
            random_state=random_state,
        ).fit_transform(X)
        warnings.filterwarnings(
            "ignore", message="The default value of `copy` will change", category=FutureWarning
        )
        return HDBSCAN(
            min_samples=opts.min_samples,
            min_cluster_size=opts.min_cluster_size,
            allow_single_cluster=True,
        ).fit_predict(umap_X)


# --- cosine merge ------------------------------------------------------------------------------------------


def merge_by_cos(labels: np.ndarray, embs: np.ndarray, cos_thr: float) -> np.ndarray:
    """Merge the closest pair of speaker centroids while their cosine similarity is >= cos_thr (in place).

    HDBSCAN's noise (-1) stays -1. Where only noise is left the official code fails an assertion; here the
    labels come back unchanged."""
    if not 0 < cos_thr <= 1:
        raise InvalidOptionError(f"merge_thr must be in (0, 1], got {cos_thr!r}")
    while True:
        spk_num = labels.max() + 1
        if spk_num <= 1:
            break
        centers = np.stack([embs[labels == i].mean(0) for i in range(spk_num)], axis=0)
        centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)
        affinity = np.triu(np.matmul(centers, centers.T), 1)
        keep, drop = np.unravel_index(np.argmax(affinity), affinity.shape)
        if affinity[keep, drop] < cos_thr:
            break
        labels[labels == drop] = keep
        labels[labels > drop] -= 1
    return labels


# --- scikit-learn's k_means, ported ------------------------------------------------------------------------


def kmeans(
    X: np.ndarray,
    n_clusters: int,
    *,
    random_state: int | np.random.RandomState | None = None,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_threads: int = 1,
    pools: ThreadpoolController | None = None,
) -> np.ndarray:
    """Labels of `sklearn.cluster.k_means(X, n_clusters, init="k-means++", n_init=n_init, random_state=...)`
    (Lloyd). Float32 stays float32 as in scikit-learn; anything else runs in float64. `pools`: the threadpoolctl
    handle to put the BLAS on one thread with during Lloyd (default: a new one)."""
    X = np.array(
        X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64, order="C", copy=True
    )
    n = X.shape[0]
    if n < n_clusters:
        raise InvalidOptionError(f"n_samples={n} should be >= n_clusters={n_clusters}")
    tol = np.mean(np.var(X, axis=0)) * tol if tol else 0
    rng = _check_random_state(random_state)
    sample_weight = np.ones(n, dtype=X.dtype)
    X -= X.mean(axis=0)
    x_squared_norms = np.einsum("ij,ij->i", X, X)
    best_inertia = best_labels = None
    pools = pools or ThreadpoolController()
    for _ in range(n_init):
        centers = _kmeans_plusplus(X, n_clusters, x_squared_norms, sample_weight, rng)
        with pools.limit(limits=1, user_api="blas"):  # as scikit-learn's Lloyd (below)
            labels, inertia = _lloyd(X, sample_weight, centers, max_iter, tol, n_threads)
        if best_inertia is None or (inertia < best_inertia and not _same_clustering(labels, best_labels)):
            best_labels, best_inertia = labels, inertia
    return best_labels


def _check_random_state(seed: int | np.random.RandomState | None) -> np.random.RandomState:
    if seed is None:
        return np.random.mtrand._rand  # NumPy's global RNG, as sklearn.utils.check_random_state(None)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.RandomState(int(seed))
    if isinstance(seed, np.random.RandomState):
        return seed
    raise InvalidOptionError(
        f"random_state must be None, an int or a numpy RandomState, got {type(seed).__name__}"
    )


def _sq_distances(X: np.ndarray, Y: np.ndarray, y_squared_norms: np.ndarray) -> np.ndarray:
    """sklearn.metrics.pairwise._euclidean_distances(X, Y, Y_norm_squared=..., squared=True)."""
    if X.dtype == np.float32:
        d = _sq_distances_upcast(X, Y)
    else:
        d = -2 * (X @ Y.T)
        d += np.einsum("ij,ij->i", X, X)[:, None]
        d += y_squared_norms.reshape(1, -1)
    np.maximum(d, 0, out=d)
    return d


def _sq_distances_upcast(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """sklearn's _euclidean_distances_upcast: float32 inputs, float64 products in memory-bounded blocks."""
    nx, ny, nf = X.shape[0], Y.shape[0], X.shape[1]
    distances = np.empty((nx, ny), dtype=np.float32)
    maxmem = max(((nx + ny) * nf + nx * ny) / 10, 10 * 2**17)
    tmp = 2 * nf
    batch = max(int((-tmp + math.sqrt(tmp**2 + 4 * maxmem)) / 2), 1)
    for xs in _batches(nx, batch):
        Xc = X[xs, :].astype(np.float64)
        XXc = np.einsum("ij,ij->i", Xc, Xc)[:, None]
        for ys in _batches(ny, batch):
            Yc = Y[ys, :].astype(np.float64)
            d = -2 * (Xc @ Yc.T)
            d += XXc
            d += np.einsum("ij,ij->i", Yc, Yc)[None, :]
            distances[xs, ys] = d.astype(np.float32, copy=False)
    return distances


def _batches(n: int, size: int) -> list[slice]:
    out = [slice(start, start + size) for start in range(0, size * (n // size), size)]
    if n % size:
        out.append(slice(size * (n // size), n))
    return out


def _kmeans_plusplus(
    X: np.ndarray, n_clusters: int, x_squared_norms: np.ndarray, sample_weight: np.ndarray, rng
) -> np.ndarray:
    """sklearn.cluster._kmeans._kmeans_plusplus (greedy, 2 + log(k) local trials)."""
    n_samples, n_features = X.shape
    centers = np.empty((n_clusters, n_features), dtype=X.dtype)
    n_local_trials = 2 + int(np.log(n_clusters))
    center_id = rng.choice(n_samples, p=sample_weight / sample_weight.sum())
    centers[0] = X[center_id]
    closest_dist_sq = _sq_distances(centers[0, np.newaxis], X, x_squared_norms)
    current_pot = closest_dist_sq @ sample_weight
    for c in range(1, n_clusters):
        rand_vals = rng.uniform(size=n_local_trials) * current_pot
        candidate_ids = np.searchsorted(np.cumsum(sample_weight * closest_dist_sq), rand_vals)
        np.clip(candidate_ids, None, closest_dist_sq.size - 1, out=candidate_ids)
        distance_to_candidates = _sq_distances(X[candidate_ids], X, x_squared_norms)
        np.minimum(closest_dist_sq, distance_to_candidates, out=distance_to_candidates)
        candidates_pot = distance_to_candidates @ sample_weight.reshape(-1, 1)
        best = np.argmin(candidates_pot)
        current_pot = candidates_pot[best]
        closest_dist_sq = distance_to_candidates[best]
        centers[c] = X[candidate_ids[best]]
    return centers


def _thread_ranges(n_items: int, n_threads: int) -> list[tuple[int, int]]:
    """OpenMP schedule(static): thread t gets one contiguous block, the first n % T blocks one item longer."""
    q, r = divmod(n_items, n_threads)
    out, start = [], 0
    for t in range(n_threads):
        size = q + (1 if t < r else 0)
        out.append((start, start + size))
        start += size
    return out


def _assign(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The E step of lloyd_iter_chunked_dense: ||c||^2 - 2 x.c per 256-row chunk (sgemm/dgemm), first argmin."""
    c_norms = np.einsum("ij,ij->i", centers, centers)
    labels = np.empty(X.shape[0], dtype=np.int32)
    two = X.dtype.type(2)
    for start in range(0, X.shape[0], _KMEANS_CHUNK):
        Xc = X[start : start + _KMEANS_CHUNK]
        d = c_norms[None, :] - two * (Xc @ centers.T)
        labels[start : start + len(Xc)] = np.argmin(d, axis=1)
    return labels


def _chunk_bounds(n: int) -> tuple[int, list[tuple[int, int]]]:
    chunk = _KMEANS_CHUNK if n > _KMEANS_CHUNK else n
    n_chunks = n // chunk + (n % chunk != 0)
    return n_chunks, [(i * chunk, min((i + 1) * chunk, n)) for i in range(n_chunks)]


def _lloyd_iter(X, sample_weight, centers_old, n_threads):
    """One lloyd_iter_chunked_dense with update_centers=True: labels, new centers, center shifts."""
    n, nf = X.shape
    k = centers_old.shape[0]
    labels = _assign(X, centers_old)
    n_chunks, bounds = _chunk_bounds(n)
    centers_new = np.zeros((k, nf), dtype=X.dtype)
    weight = np.zeros(k, dtype=X.dtype)
    weighted = X * sample_weight[:, None]
    for c0, c1 in _thread_ranges(n_chunks, min(n_threads, n_chunks)):
        lo, hi = bounds[c0][0], bounds[c1 - 1][1]
        part = np.zeros((k, nf), dtype=X.dtype)
        wpart = np.zeros(k, dtype=X.dtype)
        np.add.at(part, labels[lo:hi], weighted[lo:hi])  # sequential, in sample order, like the C loop
        np.add.at(wpart, labels[lo:hi], sample_weight[lo:hi])
        weight += wpart
        centers_new += part
    _relocate_empty_clusters(X, sample_weight, centers_old, centers_new, weight, labels)
    _average_centers(centers_new, weight)
    shift = np.sqrt(_unrolled_sq_dist(centers_new, centers_old))
    return labels, centers_new, shift


def _relocate_empty_clusters(X, sample_weight, centers_old, centers_new, weight, labels) -> None:
    empty = np.where(np.equal(weight, 0))[0].astype(np.int32)
    n_empty = empty.shape[0]
    if n_empty == 0:
        return
    distances = ((np.asarray(X) - np.asarray(centers_old)[labels]) ** 2).sum(axis=1)
    far = np.argpartition(distances, -n_empty)[: -n_empty - 1 : -1].astype(np.int32)
    if np.max(distances) == 0:
        return
    for idx in range(n_empty):
        new_id, far_idx = empty[idx], far[idx]
        w = sample_weight[far_idx]
        old_id = labels[far_idx]
        centers_new[old_id] -= X[far_idx] * w
        centers_new[new_id] = X[far_idx] * w
        weight[new_id] = w
        weight[old_id] -= w


def _average_centers(centers: np.ndarray, weight: np.ndarray) -> None:
    argmax_weight = int(np.argmax(weight))
    for j in range(centers.shape[0]):
        if weight[j] > 0:
            centers[j] *= centers.dtype.type(1.0 / float(weight[j]))  # `floating alpha = 1.0 / w` in Cython
        else:
            centers[j] = centers[argmax_weight]


def _unrolled_sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise _euclidean_dense_dense(squared=True): sums of four squares added to the running total."""
    sq = (a - b) * (a - b)
    nf = sq.shape[1]
    result = np.zeros(sq.shape[0], dtype=sq.dtype)
    for i in range(0, nf - nf % 4, 4):
        result += ((sq[:, i] + sq[:, i + 1]) + sq[:, i + 2]) + sq[:, i + 3]
    for i in range(nf - nf % 4, nf):
        result += sq[:, i]
    return result


def _inertia(X, sample_weight, centers, labels, n_threads) -> float:
    per_sample = _unrolled_sq_dist(X, centers[labels]) * sample_weight
    total = X.dtype.type(0)
    for lo, hi in _thread_ranges(X.shape[0], n_threads):
        if hi > lo:
            total += np.add.accumulate(per_sample[lo:hi])[-1]  # a sequential sum per OpenMP thread
    return total


def _lloyd(X, sample_weight, centers, max_iter, tol, n_threads):
    """sklearn.cluster._kmeans._kmeans_single_lloyd."""
    labels_old = np.full(X.shape[0], -1, dtype=np.int32)
    strict_convergence = False
    labels = labels_old
    for _ in range(max_iter):
        labels, centers_new, shift = _lloyd_iter(X, sample_weight, centers, n_threads)
        centers = centers_new
        if np.array_equal(labels, labels_old):
            strict_convergence = True
            break
        if (shift**2).sum() <= tol:
            break
        labels_old = labels
    if not strict_convergence:
        labels = _assign(X, centers)
    return labels, _inertia(X, sample_weight, centers, labels, n_threads)


def _same_clustering(labels1: np.ndarray, labels2: np.ndarray) -> bool:
    mapping: dict[int, int] = {}
    for a, b in zip(labels1.tolist(), labels2.tolist(), strict=True):
        if mapping.setdefault(a, b) != b:
            return False
    return True


def _as_float_matrix(X) -> np.ndarray:
    if hasattr(X, "detach"):  # a torch tensor, as the official pipeline passes
        X = X.detach().cpu().numpy()
    X = np.asarray(X)
    if X.ndim != 2:
        raise InvalidOptionError(
            f"speaker embeddings must be a 2-D array (chunks x dims), got shape {X.shape}"
        )
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise InvalidOptionError("speaker embeddings contain NaN or infinity")
    return X
