"""Numba CPU kernels for Gaussian mixtures.

One pass over a chunk of rows turns it into additive sufficient statistics:

    log p(x_i, k) = log pi_k - D/2 log(2 pi) + log det P_k - 1/2 ||P_k^T (x_i - mu_k)||^2
    log p(x_i)    = logsumexp_k log p(x_i, k)           r_ik = exp(log p(x_i, k) - log p(x_i))
    n_k = sum_i r_ik    s_k = sum_i r_ik (x_i - c_k)    S_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T

with P_k the (upper triangular) Cholesky factor of the precision and c_k a shift that keeps the
moments centred (c_k = mu_k; for the tied type one global c, since its second moment does not
depend on r). Hard mode replaces r_ik by the one-hot argmax (K-means). Statistics of a block of
rows are reduced serially and blocks are summed in index order, so the result does not depend
on the number of threads.

Every covariance type shares one layout, so one driver serves all four:
    prec    full (K,D,D) upper-triangular   tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
    second  full (K,D,D) upper triangle     tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
Rows are processed in sub-chunks transposed to (D, C) so the innermost loops run over rows with
unit stride and vectorise without remainders in the feature dimension.
"""

import numpy as np
from numba import njit, prange

FULL, TIED, DIAG, SPHERICAL = 0, 1, 2, 3
BLOCK_ROWS = 2048  # rows reduced serially into one partial; fixed, so results ignore threads
SUB_ROWS = 64  # rows per transposed sub-chunk: 4 scratch arrays of D x 64 stay in L1/L2

# Reassociation lets reductions vectorise; NaN/inf semantics are kept (no 'nnan'/'ninf').
_FASTMATH = {"reassoc", "contract", "arcp"}
_jit = njit(fastmath=_FASTMATH, cache=True, nogil=True)


@_jit
def _transpose_rows(X, r0, C, xt):
    """xt[:, :C] = X[r0:r0+C].T"""
    D = X.shape[1]
    for i in range(C):
        for p in range(D):
            xt[p, i] = X[r0 + i, p]


@_jit
def _centre(xt, C, m, dt):
    """dt[p, i] = xt[p, i] - m[p]"""
    for p in range(xt.shape[0]):
        mp = m[p]
        for i in range(C):
            dt[p, i] = xt[p, i] - mp


@_jit
def _tri_sq_norm(dt, C, P, yt, q):
    """q[i] = ||P^T d_i||^2 for upper-triangular P; yt is scratch."""
    D = dt.shape[0]
    for j in range(D):  # p = 0 term initialises every output row
        a = P[0, j]
        for i in range(C):
            yt[j, i] = a * dt[0, i]
    for p in range(1, D):
        for j in range(p, D):
            a = P[p, j]
            for i in range(C):
                yt[j, i] += a * dt[p, i]
    for i in range(C):
        q[i] = 0.0
    for j in range(D):
        for i in range(C):
            q[i] += yt[j, i] * yt[j, i]


@_jit
def _log_prob(kind, xt, C, means, prec, log_norm, centre, logp, dt, yt, q):
    """logp[i, k] = log_norm[k] - 1/2 (Mahalanobis distance of row i to component k)^2."""
    D = xt.shape[0]
    K = means.shape[0]
    if kind == TIED:
        # y_i = P^T (x_i - c) once; then P^T (x_i - mu_k) = y_i - P^T (mu_k - c).
        _centre(xt, C, centre, dt)
        _tri_sq_norm(dt, C, prec[0], yt, q)
        b = np.zeros(D, dtype=xt.dtype)
        for k in range(K):
            for j in range(D):
                acc = 0.0
                for p in range(j + 1):
                    acc += prec[0, p, j] * (means[k, p] - centre[p])
                b[j] = acc
            for i in range(C):
                q[i] = 0.0
            for j in range(D):
                bj = b[j]
                for i in range(C):
                    v = yt[j, i] - bj
                    q[i] += v * v
            for i in range(C):
                logp[i, k] = log_norm[k] - 0.5 * q[i]
        return
    for k in range(K):
        _centre(xt, C, means[k], dt)
        if kind == FULL:
            _tri_sq_norm(dt, C, prec[k], yt, q)
        else:
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
def _normalise(logp, C, hard, resp, row_ll):
    """Responsibilities (soft: exp(logp - logsumexp); hard: one-hot argmax) and each row's log p(x)."""
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
def _accumulate(kind, xt, C, resp, means, centre, n, s, second, dt, zt, w):
    """Add one sub-chunk's weighted, centred moments to n, s and second."""
    D = xt.shape[0]
    K = means.shape[0]
    if kind == TIED:  # second moment about c does not depend on r
        _centre(xt, C, centre, dt)
        for p in range(D):
            for j in range(p, D):
                acc_t = dt[p, 0] * dt[j, 0]
                for i in range(1, C):
                    acc_t += dt[p, i] * dt[j, i]
                second[0, p, j] += acc_t
    for k in range(K):
        tot = 0.0
        for i in range(C):
            w[i] = resp[i, k]
            tot += w[i]
        if tot == 0.0:
            continue  # exact zero weight adds nothing
        n[k] += tot
        if kind != TIED:  # tied: dt already holds x - c
            _centre(xt, C, means[k], dt)
        for p in range(D):
            acc = 0.0
            for i in range(C):
                zt[p, i] = w[i] * dt[p, i]
                acc += zt[p, i]
            s[k, p] += acc
        if kind == FULL:
            for p in range(D):
                for j in range(p, D):
                    acc2 = zt[p, 0] * dt[j, 0]
                    for i in range(1, C):
                        acc2 += zt[p, i] * dt[j, i]
                    second[k, p, j] += acc2
        elif kind == DIAG or kind == SPHERICAL:
            for p in range(D):
                acc3 = zt[p, 0] * dt[p, 0]
                for i in range(1, C):
                    acc3 += zt[p, i] * dt[p, i]
                if kind == DIAG:
                    second[k, 0, p] += acc3
                else:
                    second[k, 0, 0] += acc3


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def suff_stats(kind, X, means, prec, log_norm, centre, hard, resp_in, block_rows=BLOCK_ROWS, sub_rows=SUB_ROWS):
    """Sufficient statistics of the rows of X under the current parameters.

    When resp_in has N rows it is used as the responsibilities (initialisation from given
    responsibilities) and the log-likelihood outputs are meaningless.

    Returns (n (K,), s (K,D), second, loglik, worst_ll (B,), worst_row (B,)) in float64, where
    s and second are centred on means[k] (full/diag/spherical) or on `centre` (tied), loglik is
    sum_i log p(x_i) (hard mode: sum_i max_k log p(x_i, k)), and worst_* hold, per block of
    rows, the lowest row log-likelihood and its row index (candidates for re-seeding).
    """
    N, D = X.shape
    K = means.shape[0]
    n_blocks = (N + block_rows - 1) // block_rows
    sh = prec.shape
    b_n = np.zeros((n_blocks, K))
    b_s = np.zeros((n_blocks, K, D))
    b_second = np.zeros((n_blocks, sh[0], sh[1], sh[2]))
    b_ll = np.zeros(n_blocks)
    worst_ll = np.full(n_blocks, np.inf)
    worst_row = np.zeros(n_blocks, dtype=np.int64)
    for b in prange(n_blocks):
        xt = np.empty((D, sub_rows), dtype=X.dtype)
        dt = np.empty((D, sub_rows), dtype=X.dtype)
        yt = np.empty((D, sub_rows), dtype=X.dtype)
        zt = np.empty((D, sub_rows), dtype=X.dtype)
        q = np.empty(sub_rows, dtype=X.dtype)
        w = np.empty(sub_rows, dtype=X.dtype)
        logp = np.empty((sub_rows, K))
        resp = np.empty((sub_rows, K))
        row_ll = np.empty(sub_rows)
        stop = min(N, (b + 1) * block_rows)
        for r0 in range(b * block_rows, stop, sub_rows):
            C = min(sub_rows, stop - r0)
            _transpose_rows(X, r0, C, xt)
            if resp_in.shape[0] == N:
                for i in range(C):
                    row_ll[i] = 0.0
                    for k in range(K):
                        resp[i, k] = resp_in[r0 + i, k]
            else:
                _log_prob(kind, xt, C, means, prec, log_norm, centre, logp, dt, yt, q)
                _normalise(logp, C, hard, resp, row_ll)
            for i in range(C):
                b_ll[b] += row_ll[i]
                if row_ll[i] < worst_ll[b]:
                    worst_ll[b] = row_ll[i]
                    worst_row[b] = r0 + i
            _accumulate(kind, xt, C, resp, means, centre, b_n[b], b_s[b], b_second[b], dt, zt, w)
    # Fixed-order reduction over blocks.
    n = np.zeros(K)
    s = np.zeros((K, D))
    second = np.zeros(sh)
    ll = 0.0
    for b in range(n_blocks):
        n += b_n[b]
        s += b_s[b]
        second += b_second[b]
        ll += b_ll[b]
    return n, s, second, ll, worst_ll, worst_row


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def row_scores(kind, X, means, prec, log_norm, centre, hard, out_ll, out_label, out_logp, sub_rows=SUB_ROWS):
    """Per-row outputs without statistics: out_label[i] = argmax_k log p(x_i, k),
    out_ll[i] = log p(x_i) (hard: max_k log p(x_i, k)), and, when out_logp has N rows,
    out_logp[i, k] = log p(x_i, k)."""
    N, D = X.shape
    K = means.shape[0]
    want_logp = out_logp.shape[0] == N
    n_sub = (N + sub_rows - 1) // sub_rows
    for c in prange(n_sub):
        xt = np.empty((D, sub_rows), dtype=X.dtype)
        dt = np.empty((D, sub_rows), dtype=X.dtype)
        yt = np.empty((D, sub_rows), dtype=X.dtype)
        q = np.empty(sub_rows, dtype=X.dtype)
        logp = np.empty((sub_rows, K))
        r0 = c * sub_rows
        C = min(sub_rows, N - r0)
        _transpose_rows(X, r0, C, xt)
        _log_prob(kind, xt, C, means, prec, log_norm, centre, logp, dt, yt, q)
        for i in range(C):
            best = 0
            mx = logp[i, 0]
            for k in range(1, K):
                if logp[i, k] > mx:
                    mx = logp[i, k]
                    best = k
            if hard:
                out_ll[r0 + i] = mx
            else:
                tot = 0.0
                for k in range(K):
                    tot += np.exp(logp[i, k] - mx)
                out_ll[r0 + i] = mx + np.log(tot)
            out_label[r0 + i] = best
            if want_logp:
                for k in range(K):
                    out_logp[r0 + i, k] = logp[i, k]
