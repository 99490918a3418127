"""Numba CPU kernels for k-means (Lloyd's algorithm), dense and CSR.

One pass assigns every row to its nearest centre and folds the change straight into the
per-cluster weighted sums, without an N x K array:

    label_i = argmin_k ||c_k||^2 - 2 x_i . c_k          (ties to the lowest k, as Lloyd's)
    S_k += w_i x_i,  W_k += w_i   for the new label;   S_k -= w_i x_i, W_k -= w_i for the old one

Hamerly's bounds (Hamerly, 2010) skip every row whose label cannot change: u_i >= ||x_i - c_a||
and l_i <= min_{k != a} ||x_i - c_k|| follow the centres' moves (u += p_a, l -= max_{k != a} p_k);
a row is skipped, without reading it, while u_i < max(l_i, s_a) with s_a half the distance from
c_a to its nearest other centre. Bounds are widened by a rounding margin, so a skipped row's
label is the label the full computation gives: the result is Lloyd's. Only rows whose label
changes touch the sums, so a skipped row costs its three bound words.

A pass runs over fixed blocks of rows (prange), each with its own partial sums, reduced in block
order: the result does not depend on the number of threads. No BLAS call runs inside the loop.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

_FASTMATH = {"reassoc", "contract", "arcp"}
_inline = njit(fastmath=_FASTMATH, cache=True, nogil=True, inline="always")
_par = njit(fastmath=_FASTMATH, cache=True, nogil=True, parallel=True)

BLOCK_ROWS = 2048  # rows per block; fixed, so results ignore the thread count


@njit(cache=True)
def n_blocks(n_rows):
    return max(1, (n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS)


@_inline
def _dense_scores(X, i, C, c_norms, scores):
    """scores[k] = ||c_k||^2 - 2 x_i . c_k for every k."""
    K, D = C.shape
    for k in range(K):
        acc = X.dtype.type(0)
        for d in range(D):
            acc += X[i, d] * C[k, d]
        scores[k] = c_norms[k] - 2.0 * acc


@_inline
def _sparse_scores(data, indices, indptr, i, CT, c_norms, scores):
    """The same for a CSR row, along the transposed centres CT (D, K): one axpy per non-zero."""
    K = CT.shape[1]
    for k in range(K):
        scores[k] = 0.0
    for j in range(indptr[i], indptr[i + 1]):
        v = data[j]
        col = indices[j]
        for k in range(K):
            scores[k] += v * CT[col, k]
    for k in range(K):
        scores[k] = c_norms[k] - 2.0 * scores[k]


@_inline
def _dense_sq_distance(X, i, C, k):
    """||x_i - c_k||^2 summed directly (exactly 0 when x_i == c_k)."""
    acc = 0.0
    for d in range(X.shape[1]):
        t = np.float64(X[i, d]) - C[k, d]
        acc += t * t
    return acc


@_inline
def _sparse_sq_distance(data, indices, indptr, i, C, k, x_norm, c_norm):
    acc = 0.0
    for j in range(indptr[i], indptr[i + 1]):
        acc += data[j] * C[k, indices[j]]
    return max(x_norm - 2.0 * acc + c_norm, 0.0)


@_inline
def _add_row(X, data, indices, indptr, sparse, i, w, sums, k):
    if sparse:
        for j in range(indptr[i], indptr[i + 1]):
            sums[k, indices[j]] += w * data[j]
    else:
        for d in range(X.shape[1]):
            sums[k, d] += w * X[i, d]


@_par
def lloyd_pass(X, data, indices, indptr, sparse, weights, x_norms, C, CT, c_norms, half_sep,
               moves, eps, labels, upper, lower, sums, counts, changed):
    """One assignment pass with Hamerly's bounds; updates labels/upper/lower in place and writes
    per-block changes of the weighted sums (sums (B, K, D), counts (B, K), changed (B,)).

    moves[k] is how far centre k moved since the bounds were last valid (0 on a fresh pass);
    labels[i] < 0 marks a row without bounds (computed in full, its sums added from scratch).
    eps is the relative rounding margin of a squared distance."""
    N = labels.shape[0]
    K = C.shape[0]
    B = sums.shape[0]
    # the largest and second largest move, for l -= max_{k != a} p_k
    k1 = 0
    for k in range(K):
        if moves[k] > moves[k1]:
            k1 = k
    m1 = moves[k1]
    m2 = 0.0
    for k in range(K):
        if k != k1 and moves[k] > m2:
            m2 = moves[k]
    c_max = 0.0
    for k in range(K):
        c_max = max(c_max, c_norms[k])
    for b in prange(B):
        scores = np.empty(K, dtype=np.float64)
        n_changed = 0
        for k in range(K):
            counts[b, k] = 0.0
            for d in range(sums.shape[2]):
                sums[b, k, d] = 0.0
        for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
            a = labels[i]
            if a >= 0:
                u = upper[i] + moves[a]
                low = lower[i] - (m2 if a == k1 else m1)
                bound = max(low, half_sep[a])
                if u < bound:
                    upper[i] = u
                    lower[i] = low
                    continue
                # tighten the upper bound with the exact distance to the own centre
                if sparse:
                    d2 = _sparse_sq_distance(data, indices, indptr, i, C, a, x_norms[i], c_norms[a])
                else:
                    d2 = _dense_sq_distance(X, i, C, a)
                u = np.sqrt(d2 * (1.0 + eps) + eps * (x_norms[i] + c_norms[a]))
                if u < bound:
                    upper[i] = u
                    lower[i] = low
                    continue
            if sparse:
                _sparse_scores(data, indices, indptr, i, CT, c_norms, scores)
            else:
                _dense_scores(X, i, C, c_norms, scores)
            best = 0
            for k in range(1, K):
                if scores[k] < scores[best]:
                    best = k
            second = np.inf
            for k in range(K):
                if k != best and scores[k] < second:
                    second = scores[k]
            margin = eps * (x_norms[i] + c_max)
            upper[i] = np.sqrt(max(x_norms[i] + scores[best], 0.0) + margin)
            lower[i] = np.sqrt(max(x_norms[i] + second - margin, 0.0)) if K > 1 else np.inf
            if best != a:
                w = weights[i]
                labels[i] = best
                n_changed += 1
                _add_row(X, data, indices, indptr, sparse, i, w, sums[b], best)
                counts[b, best] += w
                if a >= 0:
                    _add_row(X, data, indices, indptr, sparse, i, -w, sums[b], a)
                    counts[b, a] -= w
        changed[b] = n_changed


@_par
def own_sq_distances(X, data, indices, indptr, sparse, x_norms, C, c_norms, labels, out):
    """out[i] = ||x_i - c_{labels[i]}||^2 (direct for dense rows)."""
    N = labels.shape[0]
    for b in prange(n_blocks(N)):
        for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
            a = labels[i]
            if sparse:
                out[i] = _sparse_sq_distance(data, indices, indptr, i, C, a, x_norms[i], c_norms[a])
            else:
                out[i] = _dense_sq_distance(X, i, C, a)


@_par
def all_sq_distances(X, data, indices, indptr, sparse, x_norms, C, c_norms, out):
    """out[i, k] = ||x_i - c_k||^2 (direct for dense rows, so a row equal to c_k gives exactly 0)."""
    N, K = out.shape
    for b in prange(n_blocks(N)):
        for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
            for k in range(K):
                if sparse:
                    out[i, k] = _sparse_sq_distance(data, indices, indptr, i, C, k, x_norms[i], c_norms[k])
                else:
                    out[i, k] = _dense_sq_distance(X, i, C, k)


@_par
def row_sq_norms(X, data, indptr, sparse, out):
    """out[i] = ||x_i||^2 in float64."""
    N = out.shape[0]
    for b in prange(n_blocks(N)):
        for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
            acc = 0.0
            if sparse:
                for j in range(indptr[i], indptr[i + 1]):
                    acc += np.float64(data[j]) * data[j]
            else:
                for d in range(X.shape[1]):
                    acc += np.float64(X[i, d]) * X[i, d]
            out[i] = acc


class Rows:
    """A dense C-contiguous array or a CSR matrix (anything with data/indices/indptr) as the
    kernels take it, with the rows' squared norms."""

    def __init__(self, X):
        self.sparse = hasattr(X, "indptr")
        if self.sparse:
            self.dtype = X.data.dtype
            self.X = np.empty((0, 1), dtype=self.dtype)
            self.data, self.indices, self.indptr = X.data, X.indices, X.indptr
        else:
            self.dtype = X.dtype
            self.X = X
            self.data = np.empty(0, dtype=self.dtype)
            self.indices = self.indptr = np.zeros(1, dtype=np.int32)
        self.n_rows, self.n_features = X.shape
        self.norms = np.empty(self.n_rows)
        row_sq_norms(self.X, self.data, self.indptr, self.sparse, self.norms)

    @property
    def shape(self):
        return (self.n_rows, self.n_features)

    def args(self):
        return self.X, self.data, self.indices, self.indptr, self.sparse

    def centres(self, C):
        """(C, CT, ||c_k||^2) in the kernels' layout: C and CT (D, K) in the rows' dtype."""
        Cd = np.ascontiguousarray(C, dtype=self.dtype)
        return Cd, np.ascontiguousarray(Cd.T), (np.asarray(Cd, dtype=np.float64) ** 2).sum(axis=1)

    def sq_distances(self, C):
        """(N, K) squared distances to the centres C."""
        Cd, _, c_norms = self.centres(C)
        out = np.empty((self.n_rows, Cd.shape[0]))
        all_sq_distances(*self.args(), self.norms, Cd, c_norms, out)
        return out

    def own_sq_distances(self, C, labels):
        Cd, _, c_norms = self.centres(C)
        out = np.empty(self.n_rows)
        own_sq_distances(*self.args(), self.norms, Cd, c_norms, labels, out)
        return out

    def rows(self, index):
        """Dense float64 copies of the rows at `index`."""
        if not self.sparse:
            return np.asarray(self.X[index], dtype=np.float64)
        out = np.zeros((len(index), self.n_features))
        for r, i in enumerate(index):
            lo, hi = self.indptr[i], self.indptr[i + 1]
            out[r, self.indices[lo:hi]] = self.data[lo:hi]
        return out


class LloydState:
    """Labels, Hamerly bounds and the running weighted sums of one k-means run over Rows."""

    def __init__(self, rows, weights, n_clusters):
        self.rows = rows
        self.weights = weights
        N, K, D = rows.n_rows, n_clusters, rows.n_features
        self.labels = np.full(N, -1, dtype=np.int32)
        self.upper = np.zeros(N)
        self.lower = np.zeros(N)
        self.sums = np.zeros((K, D))
        self.counts = np.zeros(K)
        B = n_blocks(N)
        self._sums = np.empty((B, K, D))
        self._counts = np.empty((B, K))
        self._changed = np.empty(B, dtype=np.int64)
        self.eps = 8.0 * np.finfo(rows.dtype).eps * np.sqrt(D)

    def assign(self, C, moves):
        """Assign every row to its nearest centre in C (moves: each centre's move since the last
        call); returns the number of rows whose label changed. Sums and counts follow."""
        Cd, CT, c_norms = self.rows.centres(C)
        half_sep = _half_separations(np.asarray(C, dtype=np.float64), self.eps)
        lloyd_pass(*self.rows.args(), self.weights, self.rows.norms, Cd, CT, c_norms, half_sep,
                   np.asarray(moves, dtype=np.float64), self.eps, self.labels, self.upper, self.lower,
                   self._sums, self._counts, self._changed)
        for b in range(self._sums.shape[0]):  # block order: the same sums for any thread count
            self.sums += self._sums[b]
            self.counts += self._counts[b]
        return int(self._changed.sum())


def _half_separations(C, eps):
    """s_k = half the distance from c_k to its nearest other centre, rounded down."""
    if C.shape[0] == 1:
        return np.full(1, np.inf)
    norms = (C**2).sum(axis=1)
    total = norms[:, None] + norms[None, :]
    gaps = np.maximum(total - 2.0 * C @ C.T - eps * total, 0.0)
    np.fill_diagonal(gaps, np.inf)
    return 0.5 * np.sqrt(gaps.min(axis=1))
