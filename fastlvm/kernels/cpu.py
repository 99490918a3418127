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

Every covariance type shares one layout, so the drivers' code is written once for all four (and
compiled per type and dtype, see the drivers):
    prec    full (K,D,D) upper-triangular   tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
    second  full (K,D,D)                    tied (1,D,D)   diag (K,1,D)   spherical (K,1,1)
Rows are processed in sub-chunks (`sub_rows`: 1 KB of each buffer row). Inside one,
log-probabilities and responsibilities are stored as (K, rows), so the log-sum-exp runs along
contiguous rows and vectorises. The products of every type are our own register-blocked loops
(simd.combine_rows, simd.row_dots), no BLAS. Kernels are serial, one per thread over fixed blocks,
so there is one level of parallelism (the caller keeps the host's BLAS on one thread meanwhile, see
`blas_single_thread`). Arithmetic is in the data's dtype, log-probabilities and responsibilities too
(each row's log p(x) and the statistics accumulate in float64 across sub-chunks). The last sub-chunk
of a block is padded with zero rows, which carry zero responsibility, so every product has the same
shape.
"""

import contextlib
import functools
import threading

import numpy as np
from numba import njit, types
from numba.extending import overload, register_jitable

from .simd import (TRANSPOSE_BYTES, claim, combine_rows, max_nonnan, polynomial, pow2, row_dots, split_exponent,
                   transpose_centred)
from .workers import on_workers

FULL, TIED, DIAG, SPHERICAL = 0, 1, 2, 3
BLOCK_ROWS = 4096  # rows reduced serially into one partial; fixed, so results ignore threads
# Bytes of a sub-chunk's buffer rows (each row holds one value per data row): long enough that the
# products' per-row-block costs (horizontal sums, reloaded outputs) amortise, short enough that a
# sub-chunk's buffers stay in cache from E-step to M-step. So 256 float32 rows but 128 float64: the
# full type's K whitened copies of the rows are then 512 KB in both (EPYC Zen 3, 512 KB L2, 200k x 32,
# K=16: float64 full fits with 128 rows against 256, two threads, interleaved: medians 3-12% faster
# over four runs, one thread 237 against 248 ms a pass; float32 full with 128 rows 97.8 against
# 87.7 ms; diag and tied float64 within noise; 256 against 128 float32 rows: diag pass 20.6 -> 17.9 ms).
# Rows a multiple of 32: simd.combine_rows takes them 32 float32 (16 float64) at a time on AVX-512
# targets, 16 (8) on others.
SUB_BYTES = 1024
# The diag and spherical types' transposed rows aa (W, sub) are stored sub + SUB_SKEW apart: rows
# 1 KB apart fall in a quarter of the L1 cache's sets, so the 64 rows of D = 32 evicted each other
# between the transposition and the products (diag pass, one thread, 200k x 32, K = 16: float64 32.2
# -> 29.9 ms, float32 15.7 -> 15.3 ms).
SUB_SKEW = 16


@register_jitable
def sub_rows(itemsize):
    """Rows per sub-chunk for data of this item size (bytes): SUB_BYTES of each buffer row."""
    return SUB_BYTES // itemsize

# Reassociation lets reductions vectorise; NaN/inf semantics are kept (no 'nnan'/'ninf').
_FASTMATH = {"reassoc", "contract", "arcp"}
_jit = njit(fastmath=_FASTMATH, cache=True, nogil=True, no_cfunc_wrapper=True)
# Helpers called only from compiled code: no Python wrapper to compile (calling one from Python crashes).
_helper = njit(fastmath=_FASTMATH, cache=True, nogil=True, no_cfunc_wrapper=True, no_cpython_wrapper=True)
# Helpers that branch on the covariance type: inlined into each type's drivers, where `kind` is a
# constant, so the other types' branches are pruned before Numba types (and compiles) them. Also
# small helpers reached through one other helper: Numba links a compiled helper's optimised IR into
# each caller and optimises and compiles it again there, so every level of nesting repeats LLVM's
# work on what lies below it (first full float64 fit, alternating fresh processes: 4.2-6.4 s
# against 4.9-7.1 s with these levels as functions). Not overloads: an overload inlined this way
# is compiled whole first, to type it, and then again in its caller.
_inline = njit(fastmath=_FASTMATH, inline="always")


_controller = None
_limited = threading.local()  # .active: this thread is inside blas_single_thread


@contextlib.contextmanager
def blas_single_thread():
    """Context manager limiting every loaded BLAS to one thread, for kernels that call BLAS from
    their workers (the k-means BLAS-tile search) and around the workers' passes, where a threaded
    host call left OpenBLAS's threads spinning beside them. Nested inside another it costs nothing (setting and
    restoring the limits took ~25 us, a k-means fit opens one a pass)."""
    global _controller
    if getattr(_limited, "active", False):
        yield
        return
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        _limited.active = True
        try:
            yield
        finally:
            _limited.active = False


# ----------------------------------------------------------------------------- exp
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.9082149292705877e-10
_FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal numbers
_FLOAT64_TINY = 2.2250738585072014e-308
_EXP_MIN = -708.0  # below this exp(t) is subnormal or zero; returned as 0 (a responsibility < 1e-307)
# The float32 series: constants of that type keep Numba's arithmetic in float32
_F32 = np.float32
_EXP_MIN_F32 = _F32(-87.0)  # exp(-87) is near float32's smallest normal number
_LOG2E_F32 = _F32(_LOG2E)
_LN2_HI_F32, _LN2_LO_F32 = _F32(0.693359375), _F32(-2.12194440e-4)  # n * _LN2_HI_F32 exact for |n| < 2^15
_ZERO_F32, _HALF_F32, _ONE_F32 = _F32(0.0), _F32(0.5), _F32(1.0)


# Polynomials, lowest degree first (simd.polynomial). exp(r) on |r| <= ln(2) / 2: Chebyshev fits
# (mpmath.chebyfit(exp, [-ln2/2, ln2/2], n) at 50 digits), whose relative error with the coefficients
# rounded to the type is 1.7e-17 (degree 11, float64; the Taylor series needs degree 12 for 2.4e-16)
# and 2.0e-8 (degree 6, float32; a float32 ulp is 1.2e-7).
_EXP_SERIES = (1.0, 1.0, 0.5000000000000019, 0.1666666666666668, 0.0416666666664881, 0.008333333333319601,
               0.0013888888952314775, 0.00019841269890047113, 2.4801485482328494e-05, 2.755724091857897e-06,
               2.763263963904103e-07, 2.5110037605963777e-08)
_EXP_SERIES_F32 = tuple(_F32(c) for c in (1.0, 1.0, 0.5, 0.16666415333747864, 0.04166635125875473,
                                          0.00837512593716383, 0.0013941108481958508))
# atanh(s) / s = sum z^j / (2j + 1), z = s^2.
_ATANH_SERIES = tuple(1.0 / (2 * j + 1) for j in range(11))
_ATANH_SERIES_F32 = tuple(_F32(1.0 / (2 * j + 1)) for j in range(6))


def _exp_nonpositive(x):
    """exp(x) for x <= 0, in x's dtype, in code that vectorises with its loop (libm's exp does
    not): exp(t) = 2^m exp(r), m = round(t / ln 2), |r| <= ln(2) / 2, exp(r) by a polynomial fit,
    2^m assembled in the exponent bits (simd.pow2). float64: to 2 ulp (_EXP_SERIES); float32
    (responsibilities of float32 data), all in float32 arithmetic, twice the lanes: to 2 float32
    ulp (t < -87 gives 0).
    Compiled code only: the series is chosen from x's dtype while typing; LLVM inlines the call
    into the caller's loop, which then vectorises (a loop of its own had cost the normalisation a
    pass over the row)."""
    raise NotImplementedError("_exp_nonpositive runs in compiled code only")


@overload(_exp_nonpositive, jit_options={"fastmath": _FASTMATH, "nogil": True})
def _exp_nonpositive_typed(x):
    if x == types.float32:
        def exp_float32(x):
            t = max(x, _EXP_MIN_F32)
            m = np.floor(t * _LOG2E_F32 + _HALF_F32)
            r = (t - m * _LN2_HI_F32) - m * _LN2_LO_F32  # the first product is exact
            return polynomial(r, _EXP_SERIES_F32) * pow2(m) if x >= _EXP_MIN_F32 else _ZERO_F32
        return exp_float32

    def exp_float64(x):
        t = max(x, _EXP_MIN)
        m = np.floor(t * _LOG2E + 0.5)
        r = (t - m * _LN2_HI) - m * _LN2_LO
        return polynomial(r, _EXP_SERIES) * pow2(m) if x >= _EXP_MIN else 0.0
    return exp_float64


def _log_positive(a, n, inverse):
    """inverse[:n] = 1 / a[:n], then a[:n] = log(a[:n]), for positive normal a, in a's dtype, in a
    loop that vectorises (libm's log, one call per row, and the divisions took 1.1 of the
    normalisation's 2.6-3.1 ms for 200k rows): log(a) = e ln 2 + log(f), a = 2^e f with f
    in [sqrt(1/2), sqrt(2)) (simd.split_exponent), log(f) = 2 atanh(s), s = (f - 1) / (f + 1),
    |s| < 0.172, by its odd series: float64 to s^21 (remainder < 3e-17), float32 to s^11 (< 4e-9).
    Compiled code only, like _exp_nonpositive."""
    raise NotImplementedError("_log_positive runs in compiled code only")


@overload(_log_positive, jit_options={"fastmath": _FASTMATH, "nogil": True})
def _log_positive_typed(a, n, inverse):
    series = _log_float32 if a.dtype == types.float32 else _log_float64
    return lambda a, n, inverse: series(a, n, inverse)


_SQRT2 = 1.4142135623730951
_SQRT2_F32 = _F32(_SQRT2)
_TWO_F32 = _F32(2.0)


# NumPy's error model: Python's checks every division for a zero divisor, a branch that keeps the
# loop from vectorising (f + 1 > 0 here).
_divide = njit(fastmath=_FASTMATH, cache=True, nogil=True, no_cfunc_wrapper=True, no_cpython_wrapper=True,
               error_model="numpy")


@_divide
def _log_float32(a, n, inverse):
    for i in range(n):
        inverse[i] = _ONE_F32 / a[i]
        e, f = split_exponent(a[i])
        big = f >= _SQRT2_F32
        f = f * _HALF_F32 if big else f
        e = e + _ONE_F32 if big else e
        s = (f - _ONE_F32) / (f + _ONE_F32)
        a[i] = e * _LN2_HI_F32 + (_TWO_F32 * s * polynomial(s * s, _ATANH_SERIES_F32) + e * _LN2_LO_F32)


@_divide
def _log_float64(a, n, inverse):
    for i in range(n):
        inverse[i] = 1.0 / a[i]
        e, f = split_exponent(a[i])
        big = f >= _SQRT2
        f = f * 0.5 if big else f
        e = e + 1.0 if big else e
        s = (f - 1.0) / (f + 1.0)
        a[i] = e * _LN2_HI + (2.0 * s * polynomial(s * s, _ATANH_SERIES) + e * _LN2_LO)


# ----------------------------------------------------------------------------- full and tied
# The tied type whitens once, y_i = P^T (x_i - c), and its E-step sums ||y_i - b_k||^2 over k; its
# second moment about c is the rows' own (dT dT^T, the upper triangle) and does not depend on r.
# The full type works in whitened coordinates y_i = P_k^T (x_i - mu_k): the E-step needs ||y_i||^2,
# and the M-step sums r_ik y_i and r_ik y_i y_i^T, which map back to the moments about mu_k once per
# pass (s_k = P_k^-T sum r y, S_k = P_k^-T (sum r y y^T) P_k^-1), so each row is multiplied by P_k
# once. Rows are centred once, on the mixture mean c, and y_i = P_k^T (x_i - c) - b_k with
# b_k = P_k^T (mu_k - c): the rounding of y is then relative to |mu_k - c| / sigma_k rather than to
# |x|, and the moments need no cancelling correction.
#
# The full type's two products are our own register-blocked loops (simd.combine_rows and
# simd.row_dots, shared with the diag type) rather than BLAS calls: at these shapes (a sub-chunk of
# rows by D x D) BLAS spends as long packing its operands as multiplying, and it cannot use the
# structure (P_k triangular, sum r y y^T symmetric), which halves the arithmetic. Rows are stored
# transposed, dT (Dp, rows) and YT[k] (Dp, rows), so the products run along contiguous rows; D is
# padded with zeros to Dp, a multiple of 4, so they step through the triangle four rows at a time.
# Eight vector accumulators, 256 bits wide on AVX2 (16 registers) and 512 on AVX-512 (32).
PAD = 4  # the full and tied types' feature count is padded to a multiple of this


@_inline
def _transpose_centred(X, r0, C, m, dT, sq):
    """dT[p, i] = X[r0 + i, p] - m[p] and, when sq has rows, sq[p, i] = dT[p, i]^2, for i < C, p < D
    (rows D.. of dT stay zero): whole tiles by simd.transpose_centred, the edges here."""
    D = X.shape[1]
    T = TRANSPOSE_BYTES // X.itemsize
    CT, DT = C - C % T, D - D % T
    transpose_centred(X, r0, C, m, dT, sq)
    for i in range(C):
        xi = X[r0 + i]
        for p in range(DT if i < CT else 0, D):
            a = xi[p] - m[p]
            dT[p, i] = a
            if sq.shape[0]:
                sq[p, i] = a * a


@_inline
def _accumulate_whitened(YT, r, n, s, second, k, ZT):
    """n[k] += sum r, s[k] += YT r and the upper triangle of second[k] += YT diag(r) YT^T (only the
    upper triangle is read). r (rows,) in the data's dtype, zero on padding rows."""
    Dp, rows = YT.shape
    tot = 0.0
    for i in range(rows):
        tot += r[i]
    if tot == 0.0:
        return  # exact zero weight adds nothing
    n[k] += tot
    for p in range(Dp):
        z = ZT[p]
        y = YT[p]
        acc = YT.dtype.type(0.0)
        for i in range(rows):
            v = r[i] * y[i]
            z[i] = v
            acc += v
        s[k, p] += acc
    row_dots(ZT, YT, second[k], True, ZT, 0, 0)


def _padded(kind, prec, b):
    """The full and tied types' precision factors padded with zeros to Dp features (see PAD), and
    their offsets -b_k padded and in float64 (the full type's whitening starts from them,
    simd.combine_rows's base)."""
    if kind != FULL and kind != TIED:
        return prec, b
    K, D = b.shape
    Dp = -(-D // PAD) * PAD
    P = np.zeros((prec.shape[0], Dp, Dp), dtype=prec.dtype)
    P[:, :D, :D] = np.triu(prec)
    bp = np.zeros((K, Dp))
    bp[:, :D] = -b.astype(np.float64)
    return P, bp


def _symmetric(upper):
    """The symmetric matrices (stacked) whose upper triangles these are."""
    return np.triu(upper) + np.swapaxes(np.triu(upper, 1), -1, -2)


def _unwhiten(prec, s, upper):
    """Moments from whitened sums: (A_k^T s_k, A_k^T S_k A_k) with A_k = P_k^-1, given the upper
    triangle of the symmetric S_k."""
    D = s.shape[1]
    A = np.linalg.solve(np.triu(prec).astype(np.float64), np.eye(D))  # P_k A_k = I
    return np.einsum("kp,kpj->kj", s, A), np.swapaxes(A, 1, 2) @ _symmetric(upper) @ A


def _whitened_offsets(kind, means, prec, centre):
    """b_k = P_k^T (mu_k - c) (full; tied: P for every k), so that P_k^T (x - mu_k) = P_k^T (x - c) - b_k."""
    if kind != FULL and kind != TIED:
        return np.zeros((0, means.shape[1]), dtype=means.dtype)
    P = np.triu(prec).astype(np.float64)
    m = means.astype(np.float64) - centre
    return np.einsum("kpj,kp->kj", np.broadcast_to(P, (means.shape[0],) + P.shape[1:]), m).astype(means.dtype)


# ------------------------------------------------------------------------- diag and spherical
# With a = x - c (c the mixture mean) and m_k = mu_k - c, a diagonal Mahalanobis distance is
#   sum_p prec_kp (a_p - m_kp)^2 = [prec_k, -2 prec_k m_k] . [a^2, a] + sum_p prec_kp m_kp^2,
# so one (K x W) @ (W x rows) product gives every row's distances (its weights scaled by -1/2 and
# added to log_norm_k - offset_k / 2, the log-probabilities themselves), and one (K x rows) @ (rows x W)
# product gives the weighted sums of a and a^2 (moments about c). The spherical type needs only
# ||a||^2 of the squares, so its rows are [||a||^2, a] (W = D + 1) where diag's are [a^2, a] (W = 2D).
# The expansion is stored transposed, aaT (Wp, rows), W padded with zeros to Wp, a multiple of 4.
# Both products are register-blocked SIMD loops (simd.combine_rows, simd.row_dots). The two types
# share these compiled helpers, told apart by the run-time flag `diag`.
def _vector_weights(kind, means, prec, centre, log_norm):
    """(WT (Wp, K), base (K,)) of the expansion above: WT -1/2 the weights, transposed and padded;
    base log_norm_k - offset_k / 2 in float64, where every row's log-probability starts."""
    K, D = means.shape
    if kind != DIAG and kind != SPHERICAL:
        return np.zeros((0, K), dtype=means.dtype), np.zeros(K)
    p2 = np.broadcast_to(prec[:, 0, :].astype(np.float64) ** 2, (K, D))
    m = means.astype(np.float64) - centre
    squares = p2 if kind == DIAG else p2[:, :1]
    Wt = np.hstack([-0.5 * squares, p2 * m])
    WT = np.zeros((-(-Wt.shape[1] // PAD) * PAD, K), dtype=means.dtype)
    WT[: Wt.shape[1]] = Wt.T
    return WT, np.asarray(log_norm, dtype=np.float64) - 0.5 * (p2 * m * m).sum(axis=1)


@_helper
def _squares_and_rows(diag, X, r0, C, centre, aa):
    """aa[:, i] = [(x_i - c)^2, x_i - c] (diag) or [||x_i - c||^2, x_i - c] (spherical), i < C"""
    D = X.shape[1]
    sq = D if diag else 1  # leading rows of aa that hold squares
    _transpose_centred(X, r0, C, centre, aa[sq:], aa[:D] if diag else aa[:0])
    if not diag:
        aa[0] = 0.0
        for p in range(D):
            for i in range(C):
                aa[0, i] += aa[sq + p, i] * aa[sq + p, i]


# ----------------------------------------------------------------------------- one sub-chunk, per type
@_helper
def _log_prob_full(X, r0, C, prec, log_norm, centre, b, dT, YT, dist, logp):
    """logp[k, i] = log p(x_i, k), leaving dT = (x - c)^T and YT[k] = P_k^T (x - mu_k) (Dp, rows):
    YT[k] = P_k^T dT + b[k] (b the negated offsets, see _padded) over P_k's upper triangle."""
    _transpose_centred(X, r0, C, centre, dT, dT[:0])
    for k in range(prec.shape[0]):
        YTk, nrm = YT[k], dist[k]
        combine_rows(prec[k], dT, b[k], YTk, True)
        nrm[:] = 0.0
        for j in range(YTk.shape[0]):
            for i in range(YTk.shape[1]):
                nrm[i] += YTk[j, i] * YTk[j, i]
        for i in range(C):
            logp[k, i] = log_norm[k] - 0.5 * nrm[i]


@_helper
def _log_prob_tied(X, r0, C, prec, log_norm, centre, b, dT, YT, logp):
    """logp[k, i] = log p(x_i, k) = log_norm_k - ||y_i + b[k]||^2 / 2 (b the negated offsets, see
    _padded), leaving dT = (x - c)^T and YT[0] = P^T (x - c) (Dp, rows): one whitening for all k."""
    _transpose_centred(X, r0, C, centre, dT, dT[:0])
    Y = YT[0]
    combine_rows(prec[0], dT, log_norm[:0], Y, True)
    for k in range(b.shape[0]):
        lk = logp[k]
        for i in range(C):
            lk[i] = 0.0
        for j in range(Y.shape[0]):
            bj, yj = Y.dtype.type(b[k, j]), Y[j]
            for i in range(C):
                t = yj[i] + bj
                lk[i] += t * t
        for i in range(C):
            lk[i] = log_norm[k] - 0.5 * lk[i]


@_helper
def _log_prob_vector(diag, X, r0, C, base, centre, Wt, aa, logp):
    """logp[k, i] = log p(x_i, k) in one product, leaving aa as _squares_and_rows makes it."""
    _squares_and_rows(diag, X, r0, C, centre, aa)
    combine_rows(Wt, aa, base, logp, False)


@_helper
def _add_counts(C, resp, n):
    """n[k] += sum_{i < C} resp[k, i] (resp may have padding rows past n's K)"""
    for k in range(n.shape[0]):
        tot = 0.0
        for i in range(C):
            tot += resp[k, i]
        n[k] += tot


@_helper
def _accumulate_full(resp, n, s, second, YT, ZT):
    """n, s and the upper triangle of second in whitened coordinates (see _accumulate_whitened)."""
    for k in range(n.shape[0]):
        _accumulate_whitened(YT[k], resp[k], n, s, second, k, ZT)


@_helper
def _accumulate_tied(C, resp, n, s, second, dT, mom):
    """n, s about c and the upper triangle of the second moment about c (which does not depend on
    r), from the transposed rows dT (Dp, rows; zero past C)."""
    _add_counts(C, resp, n)
    row_dots(dT, dT, second[0], True, dT, 0, 0)
    mom[:] = 0.0
    row_dots(resp, dT, mom, False, dT, 0, 0)
    for k in range(s.shape[0]):
        for p in range(s.shape[1]):
            s[k, p] += mom[k, p]


@_helper
def _accumulate_vector(diag, C, resp, onehot, best, n, s, second, aa, mom, X, lo, hi):
    """n, s and the diag / spherical second moment from the sums of [squares, a] per component, under
    resp or, when onehot (hard mode), adding each row to its component best[i]."""
    K, D = s.shape
    mom[:] = 0.0
    if onehot:
        for i in range(C):
            n[best[i]] += 1.0
            mk = mom[best[i]]
            for j in range(aa.shape[0]):
                mk[j] += aa[j, i]
    else:
        _add_counts(C, resp, n)
        row_dots(resp, aa, mom, False, X, lo, hi)
    sq = D if diag else 1
    for k in range(K):
        for p in range(D):
            s[k, p] += mom[k, sq + p]
        if diag:
            for p in range(D):
                second[k, 0, p] += mom[k, p]
        else:
            second[k, 0, 0] += mom[k, 0]


@_helper
def _normalise(logp, C, hard, onehot_rows, resp, row_ll, best, top, tot):
    """resp[k, i] (soft: exp(logp - logsumexp), below the dtype's smallest normal number set to
    zero: as float32 subnormals they would add nothing but slow every product they enter; hard:
    one-hot argmax, left unset when onehot_rows says the caller adds rows by best alone), each row's
    log p(x) row_ll[i] (float64; hard: max_k log p(x, k)) and argmax best[i] (int32; not when best
    is empty, which hard mode may not pass), for i < C; resp is zero on padding rows. logp, resp,
    top and tot (scratch, (rows,)) are in the data's dtype: for float32 data the exp and the sums
    run on twice the lanes, and the M-step's products take resp as it is. resp may have more rows
    than logp (left as they are)."""
    K, rows = logp.shape
    one = resp.dtype.type(1.0)
    tiny = resp.dtype.type(_FLOAT32_TINY if resp.itemsize == 4 else _FLOAT64_TINY)
    # The maximum over k, then the first k that reaches it, as vector max and min (see
    # simd.max_nonnan: a running argmax by selects ran at a quarter of the speed).
    for i in range(C):  # a loop: an array assignment compiles Numba's shape-mismatch message (seconds)
        top[i] = logp[0, i]
    for k in range(1, K):
        for i in range(C):
            top[i] = max_nonnan(top[i], logp[k, i])
    if best.shape[0]:  # hard mode and per-row labels need the argmax; a soft fit does not
        last = np.int32(K - 1)
        best[:C] = last
        for k in range(K - 1):
            k32 = np.int32(k)  # int32: as many lanes as float32 logp's
            for i in range(C):
                best[i] = min(best[i], k32 if logp[k, i] == top[i] else last)
    if hard:
        for i in range(C):
            row_ll[i] = top[i]
        if not onehot_rows:
            for k in range(K):
                for i in range(C):
                    resp[k, i] = one if best[i] == k else 0
    else:
        tot[:C] = 0
        for k in range(K):
            rk, lk = resp[k], logp[k]
            for i in range(C):
                e = _exp_nonpositive(lk[i] - top[i])
                rk[i] = e
                tot[i] += e
        for i in range(C):  # row_ll the maxima, top then log(tot), tot its reciprocal
            row_ll[i] = top[i]
            top[i] = tot[i]
        _log_positive(top, C, tot)
        for i in range(C):
            row_ll[i] += top[i]
        for k in range(K):
            for i in range(C):
                r = resp[k, i] * tot[i]
                resp[k, i] = r if r >= tiny else 0
    for k in range(K):
        for i in range(C, rows):
            resp[k, i] = 0


# ----------------------------------------------------------------------------- one sub-chunk
# The switches on `kind`: inlined into each type's drivers, where `kind` is a constant, so only the
# branch of that type is typed and compiled.
@_inline
def _log_prob(kind, X, r0, C, prec, log_norm, centre, b, Wt, base, d, Y, aa, dist, logp):
    """logp[k, i] = log p(x_i, k) for i < C, leaving the rows in the form the type's M-step needs.
    Padding rows (columns of the full type's d) of d and aa must be zero."""
    if kind == FULL:
        _log_prob_full(X, r0, C, prec, log_norm, centre, b, d, Y, dist, logp)
    elif kind == TIED:
        _log_prob_tied(X, r0, C, prec, log_norm, centre, b, d, Y, logp)
    else:
        _log_prob_vector(kind == DIAG, X, r0, C, base, centre, Wt, aa, logp)


@_inline
def _accumulate(kind, C, resp, onehot, best, n, s, second, d, Y, aa, mom, Z, X, lo, hi):
    """Adds the sub-chunk's statistics under responsibilities resp (K, rows), or, when onehot (hard
    mode, diag and spherical), under the one-hot best[i]."""
    if kind == FULL:
        _accumulate_full(resp, n, s, second, Y, Z)
    elif kind == TIED:
        _accumulate_tied(C, resp, n, s, second, d, mom)
    else:
        _accumulate_vector(kind == DIAG, C, resp, onehot, best, n, s, second, aa, mom, X, lo, hi)


try:
    from fastlvm._C import empty as _pooled_empty
except ImportError:  # the compiled kernels are not built: NumPy's memory, aligned by hand
    _pooled_empty = None


def _aligned(shape, dtype, zero=False):
    """An array on a 64-byte boundary (NumPy gives 16: a quarter of the 32-byte vector loads of a
    16-byte-aligned row then straddle a cache line, which cost the full type 8-11% a pass). Its
    memory comes from fastlvm._C's pool: blocks from 1 MiB up are kept for the next array of their
    size when this one dies, so a fit's copy of the data is not faulted in page by page at every
    fit (that took 3-4 of the 5 ms of a 200k x 32 float32 k-means fit's centring pass)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    if _pooled_empty is not None:
        out = _pooled_empty(list(shape), dtype)
        if zero:
            out.fill(0)
        return out
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = (np.zeros if zero else np.empty)(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


_kept = threading.local()  # .scratch: (key, buffers) of this thread's last driver call
SCRATCH_KEPT_BYTES = 64 << 20  # larger scratch is made afresh at every call


def _scratch(kind, dtype, K, D, Dp, W, n_workers):
    """_new_scratch's buffers, kept per calling thread for the next call with the same shapes: made
    afresh, its 13 arrays cost 0.1 ms of every EM iteration (the kernels keep their zero padding
    zero, so kept buffers are as good as new ones)."""
    key = (kind, np.dtype(dtype), K, D, Dp, W, n_workers)
    kept = getattr(_kept, "scratch", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    scratch = _new_scratch(*key)
    if sum(a.nbytes for a in scratch) <= SCRATCH_KEPT_BYTES:
        _kept.scratch = (key, scratch)
    return scratch


def _new_scratch(kind, dtype, K, D, Dp, W, n_workers):
    """Each worker's buffers for a driver, stacked on a leading worker axis: (d, Y, aa, dist) for
    _log_prob (d and Y are (Dp, sub) and (K, Dp, sub) for the full type, (Dp, sub) and (1, Dp, sub)
    for tied, nothing otherwise; aa (W, sub + SUB_SKEW); dist (K, sub) for the full type only);
    (logp, resp, row_ll, best, top, tot) for _normalise (resp (Kp, sub), its rows past K zero;
    row_ll float64, best int32); (Z, mom) for _accumulate (Z (Dp, sub) for the full type; mom (Kp,
    Dp) for tied, (Kp, W) otherwise). Made here in NumPy: allocations inside the kernels compile
    NumPy's allocation code once per shape and dtype, about half a second of a first fit."""
    n, sub = n_workers, sub_rows(np.dtype(dtype).itemsize)
    Kp = K + K % 2 if kind != FULL else K  # row_dots takes the responsibilities' rows in pairs
    whitened = kind == FULL or kind == TIED
    d = _aligned((n, Dp, sub) if whitened else (n, 0, sub), dtype, zero=True)
    Y = _aligned((n, (K if kind == FULL else 1) if whitened else 0, Dp, sub), dtype)
    return (d, Y, _aligned((n, W, sub + SUB_SKEW), dtype, zero=True), _aligned((n, K if kind == FULL else 0, sub), dtype),
            _aligned((n, K, sub), dtype), _aligned((n, Kp, sub), dtype, zero=True), _aligned((n, sub), np.float64),
            _aligned((n, sub), np.int32), _aligned((n, sub), dtype), _aligned((n, sub), dtype),
            _aligned((n, Dp if kind == FULL else 0, sub), dtype), _aligned((n, Kp, Dp if kind == TIED else W), dtype))


@_inline
def _worker(scratch, w):
    """Worker w's buffers from _scratch's stacks."""
    d, Y, aa, dist, logp, resp, row_ll, best, top, tot, Z, mom = scratch
    return d[w], Y[w], aa[w], dist[w], logp[w], resp[w], row_ll[w], best[w], top[w], tot[w], Z[w], mom[w]


@_inline
def _zero_padding(kind, C, d, aa):
    """Zero the rows past C of a short last sub-chunk (columns of the full and tied types' d)."""
    if kind == FULL or kind == TIED:
        d[:, C:] = 0
    else:
        d[C:] = 0
        aa[:, C:] = 0


# ----------------------------------------------------------------------------- drivers
# One pair of compiled drivers per covariance type (made on first use by `_drivers`), so a fit
# compiles only its own type: the small switches on `kind` (_log_prob, _accumulate, _worker,
# _zero_padding) are inlined into them at Numba's IR level, where `kind` is a constant and the other
# types' branches are pruned before typing. Everything else is a compiled helper of its own, compiled
# once per dtype when first reached and cached: the per-type ones (_log_prob_full, ...) and the
# shared ones (the products, the normalisation, exp). The kernels are serial and release the GIL;
# `on_workers` runs one per thread, each claiming blocks until none is left. Plain threads rather than
# Numba's parallel loops: a parallel loop compiles several times slower.
@functools.cache
def _drivers(kind):
    """(suff_stats_blocks, row_scores_subs) compiled for one covariance type. `kind` is a constant
    of these closures (and part of Numba's cache key for them), so the branches of the inlined
    switches (_log_prob, _accumulate, ...) for other types are pruned before typing: a fit compiles
    only its own type's helpers."""

    @_jit
    def suff_stats_blocks(X, means, prec, log_norm, centre, b, Wt, base, hard, resp_in, block_rows,
                          b_n, b_s, b_second, b_ll, worst_ll, worst_row, scratch, worker, counter):
        """Statistics of the blocks of block_rows rows this worker claims, into the block's slot of
        the b_* / worst_* partials (see suff_stats), with the worker's buffers (_scratch)."""
        N, D = X.shape
        K = means.shape[0]
        sub = sub_rows(X.itemsize)
        given = resp_in.shape[0] == N
        onehot_rows = hard and not given and (kind == DIAG or kind == SPHERICAL)
        tiny = _FLOAT32_TINY if X.itemsize == 4 else _FLOAT64_TINY
        d, Y, aa, dist, logp, resp, row_ll, best, top, tot, Z, mom = _worker(scratch, worker)
        while True:
            blk = claim(counter)
            if blk >= b_ll.shape[0]:
                break
            stop = min(N, (blk + 1) * block_rows)
            for r0 in range(blk * block_rows, stop, sub):
                C = min(sub, stop - r0)
                if C < sub:
                    _zero_padding(kind, C, d, aa)
                _log_prob(kind, X, r0, C, prec, log_norm, centre, b, Wt, base, d, Y, aa, dist, logp)
                if given:
                    for k in range(K):
                        for i in range(sub):
                            v = resp_in[r0 + i, k] if i < C else 0.0
                            resp[k, i] = v if v >= tiny else 0.0  # as _normalise flushes
                    row_ll[:C] = 0.0
                else:
                    _normalise(logp, C, hard, onehot_rows, resp, row_ll, best if hard else best[:0], top, tot)
                # in locals: the partials' elements were loaded and stored at every row
                ll, worst, at = b_ll[blk], worst_ll[blk], worst_row[blk]
                for i in range(C):
                    ll += row_ll[i]
                    if row_ll[i] < worst:
                        worst, at = row_ll[i], r0 + i
                b_ll[blk], worst_ll[blk], worst_row[blk] = ll, worst, at
                # The block's next sub-chunk of rows (bytes lo to hi of X), requested into L2 a cache
                # line at a time among the M-step's FMAs (diag and spherical): its transposition
                # otherwise waits on memory (diag float32, 200k rows, one thread on Zen 4: 29% of the
                # pass, against 12% when the rows fit the cache). Against one burst of prefetches
                # into L1 after the E-step: the pass 0.93-0.94x as long, two threads.
                lo = (r0 + sub) * X.strides[0]
                hi = min(stop, r0 + 2 * sub) * X.strides[0] if r0 + sub < stop else lo
                _accumulate(kind, C, resp, onehot_rows, best, b_n[blk], b_s[blk], b_second[blk], d, Y, aa,
                            mom, Z, X, lo, hi)


    @_jit
    def row_scores_subs(X, means, prec, log_norm, centre, b, Wt, base, hard, out_ll, out_label, out_logp, scratch,
                        worker, counter):
        """row_scores on the sub-chunks of sub_rows rows this worker claims, with its buffers
        (_scratch)."""
        N, D = X.shape
        K = means.shape[0]
        sub = sub_rows(X.itemsize)
        want_logp = out_logp.shape[0] == N
        d, Y, aa, dist, logp, resp, row_ll, best, top, tot, _, _ = _worker(scratch, worker)
        while True:
            c = claim(counter)
            if c >= (N + sub - 1) // sub:
                break
            r0 = c * sub
            C = min(sub, N - r0)
            if C < sub:
                _zero_padding(kind, C, d, aa)
            _log_prob(kind, X, r0, C, prec, log_norm, centre, b, Wt, base, d, Y, aa, dist, logp)
            _normalise(logp, C, hard, hard, resp, row_ll, best, top, tot)  # hard: no one-hot resp needed
            for i in range(C):
                out_ll[r0 + i] = row_ll[i]
                out_label[r0 + i] = best[i]
            if want_logp:
                for i in range(C):
                    for k in range(K):
                        out_logp[r0 + i, k] = logp[k, i]

    return suff_stats_blocks, row_scores_subs


def suff_stats(kind, X, means, prec, log_norm, centre, hard, resp_in, n_workers, block_rows=BLOCK_ROWS):
    """Sufficient statistics of the rows of X under the current parameters.

    Returns (n (K,), s (K,D), second, loglik, worst_ll (B,), worst_row (B,)) in float64, where
    s and second are centred on means[k] (full) or on `centre` (tied, diag, spherical), loglik is
    sum_i log p(x_i) (hard mode: sum_i max_k log p(x_i, k)), and worst_* hold, per block of
    rows, the lowest row log-likelihood and its row index (candidates for re-seeding).
    When resp_in has N rows it is used as the responsibilities (initialisation from given
    responsibilities) and the log-likelihood outputs are meaningless. n_workers: threads to use.
    """
    X = np.ascontiguousarray(X)  # the kernels read rows as contiguous vectors
    N, D = X.shape
    K = means.shape[0]
    n_blocks = (N + block_rows - 1) // block_rows
    kprec, b = _padded(kind, prec, _whitened_offsets(kind, means, prec, centre))
    b_n = np.zeros((n_blocks, K))
    b_s = np.zeros((n_blocks, K, kprec.shape[2] if kind == FULL or kind == TIED else D))
    b_second = np.zeros((n_blocks,) + kprec.shape)
    b_ll = np.zeros(n_blocks)
    worst_ll = np.full(n_blocks, np.inf)
    worst_row = np.zeros(n_blocks, dtype=np.int64)
    Wt, base = _vector_weights(kind, means, prec, centre, log_norm)
    n_workers = max(1, min(n_workers, n_blocks))
    scratch = _scratch(kind, X.dtype, K, D, kprec.shape[1], Wt.shape[0], n_workers)
    on_workers(_drivers(kind)[0], n_workers, X, means, kprec, log_norm, centre, b, Wt, base,
               bool(hard), resp_in, block_rows, b_n, b_s, b_second, b_ll, worst_ll, worst_row, scratch)
    # Fixed-order reduction over blocks.
    n, s, second, ll = b_n.sum(axis=0), b_s.sum(axis=0), b_second.sum(axis=0), float(b_ll.sum())
    if kind == FULL:
        s, second = _unwhiten(prec, s[:, :D], second[:, :D, :D])
    elif kind == TIED:
        s, second = s[:, :D], _symmetric(second[:, :D, :D])
    return n, s, second, ll, worst_ll, worst_row


def row_scores(kind, X, means, prec, log_norm, centre, hard, out_ll, out_label, out_logp, n_workers):
    """Per-row outputs without statistics: out_label[i] = argmax_k log p(x_i, k),
    out_ll[i] = log p(x_i) (hard: max_k log p(x_i, k)), and, when out_logp has N rows,
    out_logp[i, k] = log p(x_i, k)."""
    X = np.ascontiguousarray(X)
    sub = sub_rows(X.itemsize)
    n_sub = (X.shape[0] + sub - 1) // sub
    kprec, b = _padded(kind, prec, _whitened_offsets(kind, means, prec, centre))
    Wt, base = _vector_weights(kind, means, prec, centre, log_norm)
    n_workers = max(1, min(n_workers, n_sub))
    scratch = _scratch(kind, X.dtype, means.shape[0], X.shape[1], kprec.shape[1], Wt.shape[0], n_workers)
    on_workers(_drivers(kind)[1], n_workers, X, means, kprec, log_norm, centre, b, Wt, base,
               bool(hard), out_ll, out_label, out_logp, scratch)
