"""Numba CPU kernels for Gaussian mixtures.

One pass over a chunk of rows turns it into additive sufficient statistics:

    log p(x_i, k) = log pi_k - D/2 log(2 pi) + log det P_k - 1/2 ||P_k^T (x_i - mu_k)||^2
    log p(x_i)    = logsumexp_k log p(x_i, k)           r_ik = exp(log p(x_i, k) - log p(x_i))
    n_k = sum_i r_ik    s_k = sum_i r_ik (x_i - c_k)    S_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T

with P_k the Cholesky factor of the precision and c_k a shift that keeps the moments centred
(c_k = mu_k; for the tied type one global c, since its second moment does not depend on r).
Hard mode replaces r_ik by the one-hot argmax (K-means). A block of rows is reduced serially
and blocks are summed in index order, so the result does not depend on the number of threads.

Every covariance type shares one layout, so one driver serves all four:
    prec    full (K,D,D) upper-triangular   tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
    second  full (K,D,D)                    tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
Full and tied rows are centred in sub-chunks and multiplied by P_k (and the weighted rows by the
rows) with single-threaded BLAS calls inside the parallel loop over blocks: the caller limits BLAS
to one thread (see `blas_single_thread`), so there is one level of parallelism. Diag and spherical
sub-chunks are transposed to (D, C) so the innermost loops run over rows with unit stride.
Arithmetic is in the data's dtype; statistics accumulate in float64 across sub-chunks.
"""

import numpy as np
from numba import njit, prange

FULL, TIED, DIAG, SPHERICAL = 0, 1, 2, 3
BLOCK_ROWS = 4096  # rows reduced serially into one partial; fixed, so results ignore threads
SUB_ROWS_MATRIX = 256  # full/tied sub-chunk: C x D by D x D products run near BLAS speed
SUB_ROWS_VECTOR = 64  # diag/spherical sub-chunk: the D x 64 scratch arrays stay in L1

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
@_jit
def _transpose_rows(X, r0, C, xt):
    """xt[:, :C] = X[r0:r0+C].T"""
    for i in range(C):
        for p in range(X.shape[1]):
            xt[p, i] = X[r0 + i, p]


@_jit
def _centre_cols(xt, C, m, dt):
    """dt[p, i] = xt[p, i] - m[p]"""
    for p in range(xt.shape[0]):
        mp = m[p]
        for i in range(C):
            dt[p, i] = xt[p, i] - mp


@_jit
def _log_prob_vector(kind, xt, C, means, prec, log_norm, logp, dt, q):
    K, D = means.shape
    for k in range(K):
        _centre_cols(xt, C, means[k], dt)
        for i in range(C):
            q[i] = 0.0
        for p in range(D):
            a = prec[k, 0, p] if kind == DIAG else prec[k, 0, 0]
            a2 = a * a
            for i in range(C):
                q[i] += a2 * dt[p, i] * dt[p, i]
        for i in range(C):
            logp[i, k] = log_norm[k] - 0.5 * q[i]


@_jit
def _accumulate_vector(kind, xt, C, resp, means, n, s, second, dt, w):
    K, D = means.shape
    for k in range(K):
        tot = 0.0
        for i in range(C):
            w[i] = resp[i, k]
            tot += resp[i, k]
        if tot == 0.0:
            continue
        n[k] += tot
        _centre_cols(xt, C, means[k], dt)
        for p in range(D):
            acc1 = 0.0
            acc2 = 0.0
            for i in range(C):
                v = w[i] * dt[p, i]
                acc1 += v
                acc2 += v * dt[p, i]
            s[k, p] += acc1
            if kind == DIAG:
                second[k, 0, p] += acc2
            else:
                second[k, 0, 0] += acc2


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
def _sub_chunk_log_prob(kind, X, r0, C, means, prec, log_norm, centre, b, logp, d, y, q, xt, dt):
    if kind == FULL or kind == TIED:
        _log_prob_matrix(kind, X, r0, C, means, prec, log_norm, centre, b, logp, d, y, q)
    else:
        _transpose_rows(X, r0, C, xt)
        _log_prob_vector(kind, xt, C, means, prec, log_norm, logp, dt, q)


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def suff_stats(kind, X, means, prec, log_norm, centre, hard, resp_in, block_rows=BLOCK_ROWS):
    """Sufficient statistics of the rows of X under the current parameters.

    Returns (n (K,), s (K,D), second, loglik, worst_ll (B,), worst_row (B,)) in float64, where
    s and second are centred on means[k] (full/diag/spherical) or on `centre` (tied), loglik is
    sum_i log p(x_i) (hard mode: sum_i max_k log p(x_i, k)), and worst_* hold, per block of
    rows, the lowest row log-likelihood and its row index (candidates for re-seeding).
    When resp_in has N rows it is used as the responsibilities (initialisation from given
    responsibilities) and the log-likelihood outputs are meaningless.
    """
    N, D = X.shape
    K = means.shape[0]
    sub = SUB_ROWS_MATRIX if (kind == FULL or kind == TIED) else SUB_ROWS_VECTOR
    n_blocks = (N + block_rows - 1) // block_rows
    sh = prec.shape
    b_n = np.zeros((n_blocks, K))
    b_s = np.zeros((n_blocks, K, D))
    b_second = np.zeros((n_blocks, sh[0], sh[1], sh[2]))
    b_ll = np.zeros(n_blocks)
    worst_ll = np.full(n_blocks, np.inf)
    worst_row = np.zeros(n_blocks, dtype=np.int64)
    b = _tied_offsets(kind, means, prec, centre)
    for blk in prange(n_blocks):
        d = np.empty((sub, D), dtype=X.dtype)
        y = np.empty((sub, D), dtype=X.dtype)
        xt = np.empty((D, sub), dtype=X.dtype)
        dt = np.empty((D, sub), dtype=X.dtype)
        prod = np.empty((D, D), dtype=X.dtype)
        q = np.empty(sub, dtype=X.dtype)
        w = np.empty(sub, dtype=X.dtype)
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
                    _transpose_rows(X, r0, C, xt)
            else:
                _sub_chunk_log_prob(kind, X, r0, C, means, prec, log_norm, centre, b, logp, d, y, q, xt, dt)
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
                _accumulate_vector(kind, xt, C, resp, means, b_n[blk], b_s[blk], b_second[blk], dt, w)
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
    sub = SUB_ROWS_MATRIX if (kind == FULL or kind == TIED) else SUB_ROWS_VECTOR
    want_logp = out_logp.shape[0] == N
    n_sub = (N + sub - 1) // sub
    b = _tied_offsets(kind, means, prec, centre)
    for c in prange(n_sub):
        d = np.empty((sub, D), dtype=X.dtype)
        y = np.empty((sub, D), dtype=X.dtype)
        xt = np.empty((D, sub), dtype=X.dtype)
        dt = np.empty((D, sub), dtype=X.dtype)
        q = np.empty(sub, dtype=X.dtype)
        logp = np.empty((sub, K))
        resp = np.empty((sub, K))
        row_ll = np.empty(sub)
        r0 = c * sub
        C = min(sub, N - r0)
        _sub_chunk_log_prob(kind, X, r0, C, means, prec, log_norm, centre, b, logp, d, y, q, xt, dt)
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
