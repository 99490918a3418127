"""Numba CPU kernels for Gaussian mixtures.

One pass over a chunk of rows turns it into additive sufficient statistics:

    log p(x_i, k) = log pi_k - D/2 log(2 pi) + log det P_k - 1/2 ||P_k^T (x_i - mu_k)||^2
    log p(x_i)    = logsumexp_k log p(x_i, k)           r_ik = exp(log p(x_i, k) - log p(x_i))
    n_k = sum_i r_ik    s_k = sum_i r_ik (x_i - c_k)    S_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T

with P_k the Cholesky factor of the precision and c_k a shift that keeps the moments centred:
c_k = mu_k for the full type, and for the others the mixture mean c (the tied second moment does
not depend on r; diag and spherical moments about one c come out of a single matrix product).
Hard mode replaces r_ik by the one-hot argmax (K-means). A block of rows is reduced serially
and blocks are summed in index order, so the result does not depend on the number of threads.

Every covariance type shares one layout, so one driver serves all four:
    prec    full (K,D,D) upper-triangular   tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
    second  full (K,D,D)                    tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
Rows are processed in sub-chunks whose products (centred rows by P_k, weighted rows by rows, and
the diag/spherical expansion below) are single-threaded BLAS calls inside the parallel loop over
blocks: the caller limits BLAS to one thread (see `blas_single_thread`), so there is one level of
parallelism. Arithmetic is in the data's dtype; statistics accumulate in float64 across sub-chunks.
"""

import os

# OpenMP workers that busy-wait between parallel regions steal the cores from everything that
# runs next (BLAS, other processes); on a busy machine that made small kernel calls 100x slower.
# Read once when Numba first loads its OpenMP layer; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

FULL, TIED, DIAG, SPHERICAL = 0, 1, 2, 3
BLOCK_ROWS = 4096  # rows reduced serially into one partial; fixed, so results ignore threads
SUB_ROWS = 256  # rows per sub-chunk: its small products run near BLAS speed and stay in cache

# Reassociation lets reductions vectorise; NaN/inf semantics are kept (no 'nnan'/'ninf').
_FASTMATH = {"reassoc", "contract", "arcp"}
_jit = njit(fastmath=_FASTMATH, cache=True, nogil=True)


_controller = None


def blas_single_thread():
    """Context manager limiting every loaded BLAS to one thread, for the kernels below that call
    BLAS from inside their parallel loop."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


# ----------------------------------------------------------------------------- full and tied
@_jit
def _centre_rows(X, r0, C, m, d):
    """d[:C] = X[r0:r0+C] - m"""
    for i in range(C):
        for p in range(X.shape[1]):
            d[i, p] = X[r0 + i, p] - m[p]


@_jit
def _sq_norms_minus(y, C, b, q):
    """q[i] = ||y_i - b||^2"""
    for i in range(C):
        acc = 0.0
        for p in range(y.shape[1]):
            v = y[i, p] - b[p]
            acc += v * v
        q[i] = acc


@_jit
def _log_prob_matrix(kind, X, r0, C, means, prec, log_norm, centre, b, logp, d, y, q):
    K = means.shape[0]
    zero = np.zeros(X.shape[1], dtype=X.dtype)
    if kind == TIED:
        # y_i = P^T (x_i - c) once; then P^T (x_i - mu_k) = y_i - b_k with b_k = P^T (mu_k - c).
        _centre_rows(X, r0, C, centre, d)
        np.dot(d[:C], prec[0], y[:C])
        for k in range(K):
            _sq_norms_minus(y, C, b[k], q)
            for i in range(C):
                logp[i, k] = log_norm[k] - 0.5 * q[i]
        return
    for k in range(K):
        _centre_rows(X, r0, C, means[k], d)
        np.dot(d[:C], prec[k], y[:C])
        _sq_norms_minus(y, C, zero, q)
        for i in range(C):
            logp[i, k] = log_norm[k] - 0.5 * q[i]


@_jit
def _accumulate_matrix(kind, X, r0, C, resp, means, centre, n, s, second, d, z, prod):
    K, D = means.shape
    if kind == TIED:  # second moment about c does not depend on r
        _centre_rows(X, r0, C, centre, d)
        np.dot(d[:C].T, d[:C], prod)
        second[0] += prod
    for k in range(K):
        tot = 0.0
        for i in range(C):
            tot += resp[i, k]
        if tot == 0.0:
            continue  # exact zero weight adds nothing
        if kind == FULL:
            _centre_rows(X, r0, C, means[k], d)
        for i in range(C):
            w = resp[i, k]
            n[k] += w
            for p in range(D):
                z[i, p] = w * d[i, p]
                s[k, p] += z[i, p]
        if kind == FULL:
            np.dot(z[:C].T, d[:C], prod)
            second[k] += prod


# ------------------------------------------------------------------------- diag and spherical
# With a = x - c (c the mixture mean) and m_k = mu_k - c, a diagonal Mahalanobis distance is
#   sum_p prec_kp (a_p - m_kp)^2 = [a^2, a] . [prec_k, -2 prec_k m_k] + sum_p prec_kp m_kp^2,
# so one (C x 2D) @ (2D x K) product gives every row's distances, and one (K x C) @ (C x 2D)
# product gives the weighted sums of a and a^2 (moments about c).
@_jit
def _vector_weights(kind, means, prec, centre):
    """(W (2D, K), offsets (K,)) of the expansion above; prec2 = squared precision Cholesky."""
    K, D = means.shape
    W = np.empty((2 * D, K), dtype=means.dtype)
    off = np.zeros(K)
    for k in range(K):
        for p in range(D):
            a = prec[k, 0, p] if kind == DIAG else prec[k, 0, 0]
            p2 = a * a
            m = means[k, p] - centre[p]
            W[p, k] = p2
            W[D + p, k] = -2.0 * p2 * m
            off[k] += p2 * m * m
    return W, off


@_jit
def _squares_and_rows(X, r0, C, centre, aa):
    """aa[i] = [(x_i - c)^2, x_i - c]"""
    D = X.shape[1]
    for i in range(C):
        for p in range(D):
            a = X[r0 + i, p] - centre[p]
            aa[i, p] = a * a
            aa[i, D + p] = a


@_jit
def _log_prob_vector(X, r0, C, W, off, log_norm, centre, logp, aa, dist):
    _squares_and_rows(X, r0, C, centre, aa)
    np.dot(aa[:C], W, dist[:C])
    for i in range(C):
        for k in range(W.shape[1]):
            logp[i, k] = log_norm[k] - 0.5 * (dist[i, k] + off[k])


@_jit
def _accumulate_vector(kind, C, resp, n, s, second, aa, rd, mom):
    K = n.shape[0]
    D = s.shape[1]
    for i in range(C):
        for k in range(K):
            rd[i, k] = resp[i, k]
            n[k] += resp[i, k]
    np.dot(rd[:C].T, aa[:C], mom)
    for k in range(K):
        for p in range(D):
            s[k, p] += mom[k, D + p]
            if kind == DIAG:
                second[k, 0, p] += mom[k, p]
            else:
                second[k, 0, 0] += mom[k, p]


# ----------------------------------------------------------------------------- shared
@_jit
def _normalise(logp, C, hard, resp, row_ll):
    """Responsibilities (soft: exp(logp - logsumexp); hard: one-hot argmax) and each row's
    log p(x) (hard: max_k log p(x, k))."""
    K = logp.shape[1]
    for i in range(C):
        best = 0
        mx = logp[i, 0]
        for k in range(1, K):
            if logp[i, k] > mx:
                mx = logp[i, k]
                best = k
        if hard:
            for k in range(K):
                resp[i, k] = 0.0
            resp[i, best] = 1.0
            row_ll[i] = mx
        else:
            tot = 0.0
            for k in range(K):
                resp[i, k] = np.exp(logp[i, k] - mx)
                tot += resp[i, k]
            inv = 1.0 / tot
            for k in range(K):
                resp[i, k] *= inv
            row_ll[i] = mx + np.log(tot)


@_jit
def _tied_offsets(kind, means, prec, centre):
    """b_k = P^T (mu_k - c) for the tied type (unused otherwise)."""
    K, D = means.shape
    b = np.zeros((K, D), dtype=means.dtype)
    if kind == TIED:
        for k in range(K):
            for j in range(D):
                acc = 0.0
                for p in range(j + 1):
                    acc += prec[0, p, j] * (means[k, p] - centre[p])
                b[k, j] = acc
    return b


@_jit
def _sub_chunk_log_prob(kind, X, r0, C, means, prec, log_norm, centre, b, W, off, logp, d, y, q, aa, dist):
    if kind == FULL or kind == TIED:
        _log_prob_matrix(kind, X, r0, C, means, prec, log_norm, centre, b, logp, d, y, q)
    else:
        _log_prob_vector(X, r0, C, W, off, log_norm, centre, logp, aa, dist)


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def suff_stats(kind, X, means, prec, log_norm, centre, hard, resp_in, block_rows=BLOCK_ROWS):
    """Sufficient statistics of the rows of X under the current parameters.

    Returns (n (K,), s (K,D), second, loglik, worst_ll (B,), worst_row (B,)) in float64, where
    s and second are centred on means[k] (full) or on `centre` (tied, diag, spherical), loglik is
    sum_i log p(x_i) (hard mode: sum_i max_k log p(x_i, k)), and worst_* hold, per block of
    rows, the lowest row log-likelihood and its row index (candidates for re-seeding).
    When resp_in has N rows it is used as the responsibilities (initialisation from given
    responsibilities) and the log-likelihood outputs are meaningless.
    """
    N, D = X.shape
    K = means.shape[0]
    sub = SUB_ROWS
    n_blocks = (N + block_rows - 1) // block_rows
    sh = prec.shape
    b_n = np.zeros((n_blocks, K))
    b_s = np.zeros((n_blocks, K, D))
    b_second = np.zeros((n_blocks, sh[0], sh[1], sh[2]))
    b_ll = np.zeros(n_blocks)
    worst_ll = np.full(n_blocks, np.inf)
    worst_row = np.zeros(n_blocks, dtype=np.int64)
    b = _tied_offsets(kind, means, prec, centre)
    W, off = _vector_weights(kind, means, prec, centre)
    for blk in prange(n_blocks):
        d = np.empty((sub, D), dtype=X.dtype)
        y = np.empty((sub, D), dtype=X.dtype)
        prod = np.empty((D, D), dtype=X.dtype)
        q = np.empty(sub, dtype=X.dtype)
        aa = np.empty((sub, 2 * D), dtype=X.dtype)
        dist = np.empty((sub, K), dtype=X.dtype)
        mom = np.empty((K, 2 * D), dtype=X.dtype)
        logp = np.empty((sub, K))
        resp = np.empty((sub, K))
        row_ll = np.empty(sub)
        stop = min(N, (blk + 1) * block_rows)
        for r0 in range(blk * block_rows, stop, sub):
            C = min(sub, stop - r0)
            if resp_in.shape[0] == N:
                for i in range(C):
                    row_ll[i] = 0.0
                    for k in range(K):
                        resp[i, k] = resp_in[r0 + i, k]
                if kind == DIAG or kind == SPHERICAL:
                    _squares_and_rows(X, r0, C, centre, aa)
            else:
                _sub_chunk_log_prob(kind, X, r0, C, means, prec, log_norm, centre, b, W, off, logp, d, y, q, aa,
                                    dist)
                _normalise(logp, C, hard, resp, row_ll)
            for i in range(C):
                b_ll[blk] += row_ll[i]
                if row_ll[i] < worst_ll[blk]:
                    worst_ll[blk] = row_ll[i]
                    worst_row[blk] = r0 + i
            if kind == FULL or kind == TIED:
                _accumulate_matrix(kind, X, r0, C, resp, means, centre, b_n[blk], b_s[blk], b_second[blk], d, y,
                                   prod)
            else:
                _accumulate_vector(kind, C, resp, b_n[blk], b_s[blk], b_second[blk], aa, dist, mom)
    # Fixed-order reduction over blocks.
    n = np.zeros(K)
    s = np.zeros((K, D))
    second = np.zeros(sh)
    ll = 0.0
    for blk in range(n_blocks):
        n += b_n[blk]
        s += b_s[blk]
        second += b_second[blk]
        ll += b_ll[blk]
    return n, s, second, ll, worst_ll, worst_row


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def row_scores(kind, X, means, prec, log_norm, centre, hard, out_ll, out_label, out_logp):
    """Per-row outputs without statistics: out_label[i] = argmax_k log p(x_i, k),
    out_ll[i] = log p(x_i) (hard: max_k log p(x_i, k)), and, when out_logp has N rows,
    out_logp[i, k] = log p(x_i, k)."""
    N, D = X.shape
    K = means.shape[0]
    sub = SUB_ROWS
    want_logp = out_logp.shape[0] == N
    n_sub = (N + sub - 1) // sub
    b = _tied_offsets(kind, means, prec, centre)
    W, off = _vector_weights(kind, means, prec, centre)
    for c in prange(n_sub):
        d = np.empty((sub, D), dtype=X.dtype)
        y = np.empty((sub, D), dtype=X.dtype)
        aa = np.empty((sub, 2 * D), dtype=X.dtype)
        dist = np.empty((sub, K), dtype=X.dtype)
        q = np.empty(sub, dtype=X.dtype)
        logp = np.empty((sub, K))
        resp = np.empty((sub, K))
        row_ll = np.empty(sub)
        r0 = c * sub
        C = min(sub, N - r0)
        _sub_chunk_log_prob(kind, X, r0, C, means, prec, log_norm, centre, b, W, off, logp, d, y, q, aa, dist)
        _normalise(logp, C, hard, resp, row_ll)
        for i in range(C):
            out_ll[r0 + i] = row_ll[i]
            best = 0
            for k in range(1, K):
                if logp[i, k] > logp[i, best]:
                    best = k
            out_label[r0 + i] = best
            if want_logp:
                for k in range(K):
                    out_logp[r0 + i, k] = logp[i, k]
