"""The k-means kernels' public entry points against NumPy brute force: nearest_centres (labels with
ties to the lowest index, as argmin; squared distances), cluster_sums (counts and sums by label)
and centre."""

import numpy as np
import pytest

from fastlvm.kernels import kmeans as kernels
from fastlvm.kernels.kmeans import BLOCK_ROWS, SUB_ROWS, cluster_sums, nearest_centres


def brute_force(X, C):
    d2 = ((X.astype(np.float64)[:, None, :] - C.astype(np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(axis=1), d2.min(axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, d, k", [(1, 1, 1), (7, 3, 5), (BLOCK_ROWS + 3, 5, 1), (BLOCK_ROWS + SUB_ROWS + 17, 4, 300)])
def test_nearest_centres_with_ties_is_argmin(dtype, n, d, k):
    """Small integers: every product is exact, so ties are exact and must go to the lowest index,
    for one centre, a few and many (several panels of centres, rows past a whole tile)."""
    rng = np.random.default_rng(n + k)
    X = rng.integers(-3, 4, size=(n, d)).astype(dtype)
    C = rng.integers(-3, 4, size=(k, d)).astype(dtype)
    if k > 2:
        C[k // 2] = C[1]  # a duplicate centre: always a tie, the first must win
    labels, d2 = nearest_centres(X, C)
    ref_labels, ref_d2 = brute_force(X, C)
    assert labels.dtype == np.int64 and d2.dtype == dtype
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(d2, ref_d2.astype(dtype))
    if k > 2:
        assert not (labels == k // 2).any()


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-4), (np.float64, 1e-12)])
def test_nearest_centres_on_random_data(dtype, rtol):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(3000, 17)) + 2.0).astype(dtype)
    C = (rng.normal(size=(40, 17)) + 2.0).astype(dtype)
    labels, d2 = nearest_centres(X, C)
    ref_labels, ref_d2 = brute_force(X, C)
    full = ((X.astype(np.float64)[:, None] - C.astype(np.float64)[None]) ** 2).sum(-1)
    chosen = full[np.arange(len(X)), labels]
    np.testing.assert_allclose(chosen, ref_d2, rtol=rtol, atol=rtol)  # a near-tie may go either way
    assert (labels == ref_labels).mean() > 0.999
    np.testing.assert_allclose(d2, ref_d2, rtol=rtol * 10, atol=rtol * 100)


def test_nearest_centres_rejects_bad_input():
    X = np.zeros((4, 3))
    with pytest.raises(TypeError, match="X must be a 2-D float32 or float64"):
        nearest_centres(X.astype(np.int64), X)
    with pytest.raises(ValueError, match="C-contiguous"):
        nearest_centres(np.zeros((3, 4)).T, X)
    with pytest.raises(ValueError, match="X's dtype"):
        nearest_centres(X, X.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        nearest_centres(X, np.zeros((2, 2)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, k", [(1, 1), (50, 7), (8 * BLOCK_ROWS + 5, 33)])
def test_cluster_sums_equal_numpy(dtype, n, k):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, 6)).astype(dtype)
    labels = rng.integers(k, size=n)
    counts, sums = cluster_sums(X, labels, k)
    assert counts.dtype == sums.dtype == np.float64 and sums.shape == (k, 6)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    ref = np.zeros((k, 6))
    np.add.at(ref, labels, X.astype(np.float64))
    np.testing.assert_allclose(sums, ref, rtol=1e-12, atol=1e-12)


def test_cluster_sums_rejects_bad_labels():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cluster_sums(X, np.array([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        cluster_sums(X, np.array([0, 1]), 3)


@pytest.mark.parametrize("share", [-1.0, 0.2, 1.0])  # never bounded, as predicted, always bounded
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lloyd_passes_give_the_nearest_centre_whichever_pass_runs(share, dtype, monkeypatch):
    """Full and bounded passes interleave (the sample's prediction, the back-off); every pass must
    give nearest_centres' labels and the sums of its labels, also with near-duplicate centres."""
    monkeypatch.setattr(kernels, "BOUNDED_MAX_SHARE", share)
    monkeypatch.setattr(kernels, "BOUNDED_MIN_ROWS", 0)
    rng = np.random.default_rng(5)
    means = rng.normal(size=(6, 4)) * 3
    X = (means[rng.integers(6, size=4000)] + rng.normal(size=(4000, 4))).astype(dtype)
    C = X[:9].astype(np.float64)
    C[8] = C[7] + 1e-9  # all but a tie: a bound that rounds the wrong way shows up here
    state = kernels.LloydState(kernels.Rows(X), np.ones(len(X)), 9)
    moves = np.zeros(9)
    for _ in range(8):
        state.assign(C, moves)
        labels, _ = nearest_centres(X, C.astype(dtype))
        np.testing.assert_array_equal(state.labels, labels)
        counts, sums = cluster_sums(X, labels, 9)
        np.testing.assert_allclose(state.counts, counts)
        np.testing.assert_allclose(state.sums, sums, rtol=1e-9, atol=1e-6)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
        moves, C = np.sqrt(((new - C) ** 2).sum(axis=1)), new


@pytest.mark.parametrize("sparse", [False, True])
def test_passes_ignore_the_thread_count(sparse):
    """Moves added up in row order (dense: fixed blocks summed in order; CSR: every cluster's rows
    in order, whichever thread takes the cluster): one thread and every thread give the same bits,
    over passes whose moves leave clusters as well as join them."""
    numba = pytest.importorskip("numba")
    sp = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(6)
    X = rng.normal(size=(5 * BLOCK_ROWS + 11, 3))
    X[rng.random(X.shape) < 0.3] = 0.0
    w = rng.uniform(0.5, 2.0, size=len(X))
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            state = kernels.LloydState(kernels.Rows(sp.csr_matrix(X) if sparse else X), w, 7)
            C = X[:7].copy()
            for _ in range(3):
                state.assign(C, np.zeros(7))
                C = state.sums / np.maximum(state.counts, 1e-12)[:, None]
            results.append((state.labels.copy(), state.sums.copy(), state.counts.copy()))
            if not sparse:
                results[-1] += (cluster_sums(X, state.labels, 7)[1],)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("share", [-1.0, 1.0])  # full passes only, bounded passes after the first
def test_running_sums_follow_the_weighted_labels(sparse, share, monkeypatch):
    """The sums kept by moving only changed rows (out of their old cluster, into the new one) equal
    the weighted sums of each pass's labels, for dense and CSR rows, over blocks and passes."""
    sp = pytest.importorskip("scipy.sparse")
    monkeypatch.setattr(kernels, "BOUNDED_MAX_SHARE", share)
    monkeypatch.setattr(kernels, "BOUNDED_MIN_ROWS", 0)
    rng = np.random.default_rng(7)
    n, d, k = 2 * BLOCK_ROWS + 37, 6, 5
    X = rng.normal(size=(n, d)) + rng.normal(size=(k, d))[rng.integers(k, size=n)] * 2
    X[rng.random(X.shape) < 0.3] = 0.0
    w = rng.uniform(0.1, 3.0, size=n)
    rows = kernels.Rows(sp.csr_matrix(X) if sparse else X)
    state = kernels.LloydState(rows, w, k)
    C, moves = X[:k].copy(), np.zeros(k)
    for _ in range(5):
        state.assign(C, moves)
        labels = brute_force(X, C)[0]
        np.testing.assert_array_equal(state.labels, labels)
        counts = np.bincount(labels, weights=w, minlength=k)
        sums = np.stack([np.bincount(labels, weights=w * X[:, j], minlength=k) for j in range(d)], axis=1)
        np.testing.assert_allclose(state.counts, counts, rtol=1e-12)
        np.testing.assert_allclose(state.sums, sums, rtol=1e-9, atol=1e-9)
        new = sums / counts[:, None]
        moves, C = np.sqrt(((new - C) ** 2).sum(axis=1)), new


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_full_pass_keeps_the_distances_it_is_asked_for(sparse, dtype, monkeypatch):
    """assign(distances=True) keeps each row's squared distance to its new centre (summed directly:
    a row on its centre gives 0) when the pass scores every row, and only for that pass."""
    sp = pytest.importorskip("scipy.sparse")
    monkeypatch.setattr(kernels, "BOUNDED_MIN_ROWS", 0)
    rng = np.random.default_rng(8)
    n, d, k = BLOCK_ROWS + SUB_ROWS + 5, 5, 4
    X = (rng.normal(size=(n, d)) + rng.normal(size=(k, d))[rng.integers(k, size=n)] * 3).astype(dtype)
    X[rng.random(X.shape) < 0.3] = 0.0
    C = X[:k].astype(np.float64)  # rows 0..k-1 lie on their centres
    state = kernels.LloydState(kernels.Rows(sp.csr_matrix(X) if sparse else X), np.ones(n), k)
    state.assign(C, np.zeros(k), distances=True)  # a first pass scores every row
    labels = brute_force(X.astype(np.float64), C)[0]
    np.testing.assert_array_equal(state.labels, labels)
    expected = ((X.astype(np.float64) - C.astype(dtype)[labels]) ** 2).sum(axis=1)
    np.testing.assert_allclose(state.d2, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    if not sparse:
        np.testing.assert_array_equal(state.d2[:k], 0.0)
    state.assign(C, np.zeros(k))
    assert state.d2 is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, d, k", [(5, 3, 1), (9, 1, 2), (203, 7, 17), (64, 33, 70)])
@pytest.mark.parametrize("vector_bytes", [32, 64])
def test_simd_search_gives_argmin_and_the_two_lowest_scores(dtype, n, d, k, vector_bytes, monkeypatch):
    """fastlvm.kernels.simd.nearest_tile (tiles of rows, four at a time with 256-bit vectors and
    eight with 512-bit ones, then one by one) against NumPy: the label with ties to the lowest
    index, also when the tie is across lanes and the later centre sits in a lower lane of a later
    block; the lowest and next lowest score ||c||^2 - 2 x.c."""
    from numba import njit

    from fastlvm.kernels import simd
    from fastlvm.kernels.simd import TILE_ROWS, lanes, nearest_tile

    monkeypatch.setattr(simd, "VECTOR_BYTES", vector_bytes)

    @njit
    def search(X, CT, lane_norms, best, s1, s2):
        for r in range(0, X.shape[0], TILE_ROWS):
            nearest_tile(X, r, min(TILE_ROWS, X.shape[0] - r), CT, lane_norms, best[r:], s1[r:], s2[r:])

    rng = np.random.default_rng(n * k)
    X = rng.integers(-3, 4, size=(n, d)).astype(dtype)  # small integers: exact products, exact ties
    C = rng.integers(-3, 4, size=(k, d)).astype(dtype)
    W = lanes(np.dtype(dtype))
    if k > W:
        C[W] = C[1]  # lane 0 of block 1 ties lane 1 of block 0: centre 1 must win
    if k > 2:
        C[min(k, W) - 1] = C[0]  # the block's last lane ties its first (another transposed part when k >= W)
    CT, lane_norms = kernels.centres_in_lanes(C)
    KP = -(-k // W) * W
    assert CT.shape == (KP // W, d, W) and np.isinf(lane_norms[k:]).all()
    np.testing.assert_array_equal(CT.transpose(0, 2, 1).reshape(KP, d)[:k], -2 * C)
    best, s1, s2 = np.empty(n, dtype=np.int64), np.empty(n), np.empty(n)
    search(X, CT, lane_norms, best, s1, s2)
    scores = (C.astype(np.float64) ** 2).sum(1)[None] - 2.0 * X.astype(np.float64) @ C.T.astype(np.float64)
    np.testing.assert_array_equal(best, scores.argmin(axis=1))
    ordered = np.sort(scores, axis=1)
    np.testing.assert_array_equal(s1, ordered[:, 0])
    np.testing.assert_array_equal(s2, ordered[:, 1] if k > 1 else np.full(n, np.inf))
    if k > W:
        assert not (best == W).any()
    if k > 2:
        assert not (best == min(k, W) - 1).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, BLOCK_ROWS + 5])
@pytest.mark.parametrize("write", ["in place", "copy", "nothing"])
def test_centre_shifts_and_gives_norms_and_column_squares(dtype, n, write):
    rng = np.random.default_rng(n)
    X = (rng.normal(size=(n, 6)) * 3 + 10).astype(dtype)
    before = X.copy()
    shift = X.mean(axis=0).astype(dtype)
    want = (X - shift).astype(dtype)
    out = {"in place": X, "copy": np.full_like(X, np.nan), "nothing": None}[write]
    norms, sums, sq_sums = kernels.centre(X, shift, out)
    if out is not None:
        np.testing.assert_array_equal(out, want)
    if out is not X:
        np.testing.assert_array_equal(X, before)
    got = want.astype(np.float64)  # the sums are of the rounded differences, as stored
    np.testing.assert_allclose(norms, (got**2).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(sums, got.sum(axis=0), rtol=1e-9, atol=1e-9 * np.abs(got).sum(axis=0).max())
    np.testing.assert_allclose(sq_sums, (got**2).sum(axis=0), rtol=1e-12)
