"""The Numba GMM kernel (fastlvm.kernels.cpu) against scikit-learn's densities and responsibilities.

scikit-learn's GaussianMixture, given the same parameters, gives log p(x_i, k) and r_ik; the
statistics are then the definitions, summed in float64 NumPy. Awkward shapes: D not a multiple of
the full type's padding, N not a multiple of the sub-chunk, one row, one component.
"""

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from fastlvm.kernels import cpu
from fastlvm.mixture.covariance import get_covariance_type
from fastlvm.mixture.stats import kernel_parameters

TYPES = ("full", "tied", "diag", "spherical")
RTOL = {np.float32: 2e-4, np.float64: 1e-9}


def _problem(cov, N, D, K, dtype, seed=0, spread=3.0):
    """Data and a random valid parameter set in scikit-learn's conventions, with the same sklearn
    estimator holding those parameters."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, spread, (K, D))
    X = (means[rng.integers(K, size=N)] + rng.normal(size=(N, D)) * rng.uniform(0.5, 2.0, D)).astype(dtype)
    weights = rng.dirichlet(np.full(K, 3.0))
    if cov in ("full", "tied"):
        A = rng.normal(size=(K if cov == "full" else 1, D, D)) / np.sqrt(D)
        L = np.linalg.cholesky(A @ np.swapaxes(A, 1, 2) + np.eye(D))  # covariance = L L^T
        prec_chol = np.swapaxes(np.linalg.inv(L), 1, 2)  # sklearn's upper U = L^-T: precision = U U^T
        prec_chol = prec_chol if cov == "full" else prec_chol[0]
    elif cov == "diag":
        prec_chol = 1.0 / np.sqrt(rng.uniform(0.5, 2.0, (K, D)))
    else:
        prec_chol = 1.0 / np.sqrt(rng.uniform(0.5, 2.0, K))
    sk = SkGaussianMixture(K, covariance_type=cov)
    sk.weights_, sk.means_, sk.precisions_cholesky_ = weights, means, prec_chol
    return X, weights, means, prec_chol, sk


def _expected(cov, X, means, centre, sk):
    """n, s, second, loglik from sklearn's responsibilities and the definitions (float64)."""
    Xd = X.astype(np.float64)
    log_norm, log_resp = sk._estimate_log_prob_resp(Xd)
    r = np.exp(log_resp)
    n = r.sum(axis=0)
    if cov == "full":
        a = Xd[None, :, :] - means[:, None, :]  # (K, N, D) about mu_k
        s = np.einsum("nk,knd->kd", r, a)
        second = np.einsum("nk,knp,knq->kpq", r, a, a)
    else:
        a = Xd - centre
        s = r.T @ a
        if cov == "tied":
            second = (a.T @ a)[None]
        elif cov == "diag":
            second = (r.T @ a**2)[:, None, :]
        else:
            second = (r.T @ (a**2).sum(axis=1))[:, None, None]
    return n, s, second, log_norm.sum(), log_norm


def _relerr(got, want):
    return np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cov", TYPES)
@pytest.mark.parametrize("N,D,K", [(300, 5, 3), (1, 3, 2), (257, 1, 1), (200, 33, 4)])
def test_suff_stats_match_sklearn(cov, N, D, K, dtype):
    X, weights, means, prec_chol, sk = _problem(cov, N, D, K, dtype)
    kp = kernel_parameters(get_covariance_type(cov), weights, means, prec_chol, dtype)
    n, s, second, ll, worst_ll, worst_row = cpu.suff_stats(cpu.__dict__[cov.upper()], X, *kp, False,
                                                           np.empty((0, K)), 1)
    want_n, want_s, want_second, want_ll, row_ll = _expected(cov, X, kp[0].astype(np.float64),
                                                             kp[3].astype(np.float64), sk)
    tol = RTOL[dtype]
    for got, want in ((n, want_n), (s, want_s), (second, want_second)):
        assert np.all(np.isfinite(got))
        assert got.shape == want.shape
        assert _relerr(got, want) < tol * 10
    assert abs(ll - want_ll) <= tol * abs(want_ll) * 10
    assert worst_ll.min() == pytest.approx(row_ll.min(), rel=tol * 10, abs=tol * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cov", TYPES)
def test_row_scores_match_sklearn(cov, dtype):
    N, D, K = 301, 6, 3
    X, weights, means, prec_chol, sk = _problem(cov, N, D, K, dtype, seed=1)
    kp = kernel_parameters(get_covariance_type(cov), weights, means, prec_chol, dtype)
    ll, labels, logp = np.empty(N), np.empty(N, dtype=np.int64), np.empty((N, K))
    cpu.row_scores(cpu.__dict__[cov.upper()], X, *kp, False, ll, labels, logp, 2)
    want_logp = sk._estimate_weighted_log_prob(X.astype(np.float64))
    scale = np.abs(want_logp).max()
    assert np.abs(logp - want_logp).max() <= RTOL[dtype] * scale * 10
    np.testing.assert_allclose(ll, sk.score_samples(X.astype(np.float64)), rtol=RTOL[dtype] * 10)
    gap = np.sort(want_logp, axis=1)
    clear = gap[:, -1] - gap[:, -2] > 1e-3 * scale  # rows whose argmax is not a near tie
    np.testing.assert_array_equal(labels[clear], want_logp.argmax(axis=1)[clear])


@pytest.mark.parametrize("cov", TYPES)
def test_kept_scratch_gives_what_fresh_scratch_gives(cov):
    """A thread's scratch is kept for its next call of the same shapes: after calls on other rows
    (a partial last sub-chunk, hard mode, given responsibilities, row scores), statistics and row
    scores equal those made with fresh buffers, bit for bit."""
    D, K = 7, 3
    X, weights, means, prec_chol, sk = _problem(cov, 2 * cpu.sub_rows(4), D, K, np.float32, seed=3)
    kp = kernel_parameters(get_covariance_type(cov), weights, means, prec_chol, np.float32)
    kind = cpu.__dict__[cov.upper()]
    other = np.random.default_rng(4).normal(size=(cpu.sub_rows(4) + 37, D)).astype(np.float32) * 50
    resp = np.random.default_rng(5).dirichlet(np.ones(K), size=len(other))

    def outputs():
        stats = cpu.suff_stats(kind, X, *kp, False, np.empty((0, K)), 1)
        scores = np.empty(len(X)), np.empty(len(X), dtype=np.int64), np.empty((len(X), K))
        cpu.row_scores(kind, X, *kp, False, *scores, 1)
        return stats + scores

    cpu._kept.scratch = None
    fresh = outputs()
    for hard, given in ((False, np.empty((0, K))), (True, np.empty((0, K))), (False, resp)):
        cpu.suff_stats(kind, other, *kp, hard, given, 1)
    cpu.row_scores(kind, other, *kp, True, np.empty(len(other)), np.empty(len(other), dtype=np.int64),
                   np.empty((0, K)), 1)
    assert cpu._kept.scratch is not None
    for a, b in zip(outputs(), fresh):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cov", TYPES)
def test_statistics_do_not_depend_on_threads(cov):
    X, weights, means, prec_chol, sk = _problem(cov, 1000, 7, 3, np.float32, seed=2)
    kp = kernel_parameters(get_covariance_type(cov), weights, means, prec_chol, np.float32)
    kind = cpu.__dict__[cov.upper()]
    one = cpu.suff_stats(kind, X, *kp, False, np.empty((0, 3)), 1, block_rows=256)
    two = cpu.suff_stats(kind, X, *kp, False, np.empty((0, 3)), 2, block_rows=256)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_of_the_responsibilities_against_numpy(dtype):
    # the array's dtype picks the series: a few ulp of its precision over the range a
    # responsibility's exponent takes; exactly 1 at 0 and 0 far below
    import numba

    @numba.njit
    def exp_in_place(a):
        for i in range(a.shape[0]):
            a[i] = cpu._exp_nonpositive(a[i])

    t = -np.concatenate([np.random.default_rng(0).random(20000) * 80, np.linspace(0.0, 80.0, 1001)])
    got = t.astype(dtype)
    exp_in_place(got)
    assert got.dtype == dtype
    want = np.exp(t.astype(dtype).astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= 4 * np.finfo(dtype).eps
    edge = np.array([0.0, -1000.0], dtype=dtype)
    exp_in_place(edge)
    assert edge.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_powers_of_two_over_the_normal_exponents(dtype):
    # simd.pow2 assembles 2**m in the exponent bits (float64 through a magic-number addition, AVX2
    # having no packed double -> int64 conversion): exact for every normal exponent, in a loop
    import numba

    from fastlvm.kernels.simd import pow2

    @numba.njit
    def powers(m, out):
        for i in range(m.shape[0]):
            out[i] = pow2(m[i])

    info = np.finfo(dtype)
    m = np.arange(info.minexp, info.maxexp, dtype=dtype)
    out = np.zeros_like(m)
    powers(m, out)
    np.testing.assert_array_equal(out, np.ldexp(np.ones_like(m), m.astype(np.int32)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 12, 13])
def test_polynomial_against_numpy(dtype, n):
    # simd.polynomial's pairing (Estrin) against NumPy's Horner evaluation in float64, for every
    # parity of the coefficient count, to the rounding of the type
    import numba

    from fastlvm.kernels.simd import polynomial

    rng = np.random.default_rng(n)
    c = tuple(dtype(v) for v in rng.uniform(-1.0, 1.0, n))

    @numba.njit
    def values(x, out):
        for i in range(x.shape[0]):
            out[i] = polynomial(x[i], c)

    x = rng.uniform(-1.2, 1.2, 4000).astype(dtype)
    out = np.zeros_like(x)
    values(x, out)
    want = np.polynomial.polynomial.polyval(x.astype(np.float64), np.array(c, dtype=np.float64))
    scale = np.polynomial.polynomial.polyval(np.abs(x.astype(np.float64)), np.abs(np.array(c, dtype=np.float64)))
    assert out.dtype == dtype
    assert np.max(np.abs(out - want) / scale) <= 2 * n * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_of_the_row_sums_against_numpy(dtype):
    # the sums of a row's exponentials lie in [1, K]; any positive normal number must give log (and
    # the reciprocal, to the rounding of the division) to
    # within an ulp of its precision (relative to max(|log|, 1)), exactly 0 at 1, on both sides of
    # the sqrt(2) switch and at powers of two
    import numba

    @numba.njit
    def log_in_place(a, inverse):
        cpu._log_positive(a, a.shape[0], inverse)

    rng = np.random.default_rng(1)
    tiny = np.finfo(dtype).tiny
    x = np.concatenate([rng.uniform(1.0, 64.0, 20000), np.exp(rng.uniform(-80.0, 80.0, 5000)),
                        1.0 + rng.uniform(-1e-3, 1e-3, 2000), np.sqrt(2.0) * (1.0 + rng.uniform(-1e-6, 1e-6, 500)),
                        2.0 ** np.arange(-20.0, 21.0), [tiny, 1.0]]).astype(dtype)
    got, inverse = x.copy(), np.zeros_like(x)
    log_in_place(got, inverse)
    assert got.dtype == dtype
    want = np.log(x.astype(np.float64))
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)) <= 2 * np.finfo(dtype).eps
    assert got[-1] == 0.0
    np.testing.assert_allclose(inverse[:-2], (1.0 / x.astype(np.float64))[:-2], rtol=np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, D", [(128, 32), (13, 7), (16, 9), (3, 40)])
def test_centred_transposition_against_numpy(dtype, n, D):
    import numba

    # whole SIMD tiles and the scalar edges together: every (feature, row) written once, exactly
    rng = np.random.default_rng(n * D)
    X = rng.normal(size=(n + 5, D)).astype(dtype)
    m = rng.normal(size=D).astype(dtype)
    out = np.full((D + 2, n + 3), 7.0, dtype=dtype)
    sq = np.full((D + 2, n + 3), 7.0, dtype=dtype)
    transpose = numba.njit(lambda X, n, m, out, sq: cpu._transpose_centred(X, 3, n, m, out, sq))
    transpose(X, n, m, out, sq)
    np.testing.assert_array_equal(out[:D, :n], (X[3 : 3 + n] - m).T)
    np.testing.assert_array_equal(sq[:D, :n], ((X[3 : 3 + n] - m) ** 2).T)
    assert (sq[D:] == 7.0).all() and (sq[:, n:] == 7.0).all()
    again = np.full_like(out, 7.0)
    transpose(X, n, m, again, sq[:0])  # no rows: no squares
    np.testing.assert_array_equal(again, out)
    assert (out[D:] == 7.0).all() and (out[:, n:] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P, K, n", [(64, 16, 256), (4, 1, 16), (36, 5, 32), (12, 7, 64), (32, 32, 256), (8, 8, 16),
                                     (16, 9, 32), (24, 14, 16)])
@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("no_base", [False, True])
@pytest.mark.parametrize("vector_bytes", [32, 64])
def test_row_combinations_against_numpy(dtype, P, K, n, upper, no_base, vector_bytes, monkeypatch):
    """simd.combine_rows (the diag and spherical E-step; with `upper`, the full and tied types'
    whitening by an upper-triangular C): out[k] = base[k] + sum_p C[p, k] A[p] (an empty base: from
    zero), six or four rows of out at a time, then one by one; A's columns past out's and out's rows past K
    untouched. With the AVX2 hosts' 256-bit accumulators and the AVX-512 hosts' 512-bit ones (LLVM
    splits these on AVX2 hardware: the same arithmetic)."""
    import numba

    from fastlvm.kernels import simd
    from fastlvm.kernels.simd import combine_rows

    monkeypatch.setattr(simd, "VECTOR_BYTES", vector_bytes)
    n = n * vector_bytes // 32  # a multiple of two vectors
    rng = np.random.default_rng(P * K + n)
    C, A = rng.normal(size=(P, K)).astype(dtype), rng.normal(size=(P, n + 16)).astype(dtype)
    if upper:
        C = np.triu(C)
    base = np.zeros(K) if no_base else rng.normal(size=K) * 10
    out = np.full((K + 2, n), 7.0, dtype=dtype)
    numba.njit(lambda C, A, base, out, upper: combine_rows(C, A, base, out[:K], upper))(
        C, A, base[:0] if no_base else base, out, upper)
    want = base[:, None] + C.astype(np.float64).T @ A[:, :n].astype(np.float64)
    scale = np.abs(base)[:, None] + np.abs(C.astype(np.float64)).T @ np.abs(A[:, :n].astype(np.float64))
    assert np.all(np.abs(out[:K] - want) <= 4 * P * np.finfo(dtype).eps * np.abs(scale))
    assert (out[K:] == 7.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Ka, Kb, n", [(16, 64, 256), (2, 4, 8), (6, 36, 32), (32, 32, 256), (12, 12, 8), (4, 8, 8),
                                       (10, 12, 16)])
@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("vector_bytes", [32, 64])
def test_row_dots_against_numpy(dtype, Ka, Kb, n, upper, wide, vector_bytes, monkeypatch):
    """simd.row_dots (the M-step of the diag and spherical types; with `upper`, the full type's upper
    triangle): out[a, b] += A[a] . B[b] over A's columns (B's rows may be longer), out in A's dtype or
    (wide) float64; out's other entries untouched (with `upper`, those below the diagonal's blocks).
    With 256-bit and 512-bit accumulators (see test_row_combinations_against_numpy)."""
    import numba

    from fastlvm.kernels import simd
    from fastlvm.kernels.simd import row_dots

    monkeypatch.setattr(simd, "VECTOR_BYTES", vector_bytes)
    n = n * vector_bytes // 32  # a multiple of one vector
    rng = np.random.default_rng(Ka * Kb + n)
    A, B = rng.normal(size=(Ka, n)).astype(dtype), rng.normal(size=(Kb, n + 8)).astype(dtype)
    out = rng.normal(size=(Ka + 1, Kb + 3)).astype(np.float64 if wide else dtype)
    before = out.copy()
    # a prefetch range (B's bytes, past which the last line is requested again; or none) changes nothing
    hi = B.nbytes if wide else 0
    numba.njit(lambda A, B, out, upper, hi: row_dots(A, B, out[:Ka], upper, B, 0, hi))(A, B, out, upper, hi)
    want = before[:Ka, :Kb] + A.astype(np.float64) @ B[:, :n].astype(np.float64).T
    scale = np.abs(before[:Ka, :Kb]) + np.abs(A.astype(np.float64)) @ np.abs(B[:, :n].astype(np.float64)).T
    a, b = np.indices((Ka, Kb))
    done = b >= a if upper else np.ones((Ka, Kb), dtype=bool)
    assert np.all(np.abs(out[:Ka, :Kb] - want)[done] <= 4 * n * np.finfo(dtype).eps * scale[done])
    # with `upper`, blocks of at most 3 rows of A by 4 of B: the ones wholly below the diagonal are
    # untouched, so entries more than a block below it are
    untouched = (a > b // 4 * 4 + 5) if upper else ~done
    assert (out[:Ka, :Kb][untouched] == before[:Ka, :Kb][untouched]).all()
    assert (out[Ka:] == before[Ka:]).all() and (out[:, Kb:] == before[:, Kb:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hard, labels", [(False, True), (True, True), (False, False)])
def test_normalisation_against_scipy(dtype, hard, labels):
    # responsibilities, log p(x) and the argmax of each row (first of tied maxima, as np.argmax),
    # in the data's dtype; rows past C left zero; a far-off component's responsibility is exactly 0;
    # without labels (an empty best, as a soft fit passes) the same responsibilities and log p(x)
    import numba
    from scipy.special import logsumexp, softmax

    K, rows, C = 5, 40, 37
    rng = np.random.default_rng(3)
    logp = (rng.normal(size=(K, rows)) * 4 - 30).astype(dtype)
    logp[2, :10] = logp[4, :10] = logp[:, :10].max(axis=0)  # ties: the lower index wins
    logp[3, 10:20] = -1e4  # exp underflows: resp 0
    resp = np.full((K + 1, rows), 5.0, dtype=dtype)
    resp[K] = 0.0
    row_ll, best = np.empty(rows), np.empty(rows, dtype=np.int32)
    top, tot = np.empty(rows, dtype=dtype), np.empty(rows, dtype=dtype)
    numba.njit(lambda *a: cpu._normalise(*a))(logp, C, hard, False, resp, row_ll, best if labels else best[:0],
                                                 top, tot)
    want_best = logp[:, :C].argmax(axis=0)
    if labels:
        np.testing.assert_array_equal(best[:C], want_best)
    l64 = logp[:, :C].astype(np.float64)
    if hard:
        np.testing.assert_array_equal(resp[:K, :C], np.eye(K)[want_best].T)
        np.testing.assert_array_equal(row_ll[:C], l64.max(axis=0))
    else:
        rtol = 8 * np.finfo(dtype).eps
        np.testing.assert_allclose(resp[:K, :C], softmax(l64, axis=0), rtol=rtol, atol=np.finfo(dtype).tiny)
        np.testing.assert_allclose(row_ll[:C], logsumexp(l64, axis=0), rtol=rtol)
        assert (resp[3, 10:20] == 0).all()
    assert resp.dtype == dtype and (resp[:K, C:] == 0).all() and (resp[K] == 0).all()
