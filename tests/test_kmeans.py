"""KMeans: scikit-learn's Lloyd from the same initial centres is the oracle (labels, centres,
inertia, n_iter_); scikit-learn's API, warnings, messages and edge behaviours; the bounded kernel
never changes a label; every data source gives the in-memory fit."""

import re

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans as SkKMeans
from sklearn.exceptions import ConvergenceWarning

from fastlvm import KMeans
from fastlvm.kernels import kmeans as kernels
from fastlvm.kernels.kmeans import LloydState, Rows


def blobs(n=600, d=5, k=4, spread=0.6, seed=0, dtype=np.float64):
    """Overlapping clusters: labels keep changing for several iterations."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * 2
    return (means[rng.integers(k, size=n)] * spread + rng.normal(size=(n, d)) + 3.0).astype(dtype)


X = blobs()
W = np.random.default_rng(1).uniform(0.5, 2.0, size=len(X))


def assert_same_fit(ours, sk, rtol=1e-10):
    np.testing.assert_array_equal(ours.labels_, sk.labels_)
    assert ours.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(ours.cluster_centers_, sk.cluster_centers_, rtol=rtol, atol=rtol)
    assert ours.inertia_ == pytest.approx(sk.inertia_, rel=rtol)
    assert ours.cluster_centers_.dtype == sk.cluster_centers_.dtype


@pytest.mark.parametrize("algorithm", ["lloyd", "elkan"])
@pytest.mark.parametrize("tol", [0.0, 1e-4])
@pytest.mark.parametrize("csr", [False, True])
def test_same_fit_as_sklearn_lloyd_from_the_same_centres(algorithm, tol, csr):
    data = sp.csr_matrix(X) if csr else X
    kw = dict(init=X[:4].copy(), n_init=1, tol=tol, max_iter=300)
    ours = KMeans(4, algorithm=algorithm, **kw).fit(data, sample_weight=W)
    sk = SkKMeans(4, algorithm="lloyd", **kw).fit(data, sample_weight=W)
    assert_same_fit(ours, sk)
    assert ours.n_iter_ > 3  # the labels kept changing for a while
    np.testing.assert_array_equal(ours.predict(data), sk.predict(data))
    assert ours.score(data, sample_weight=W) == pytest.approx(sk.score(data, sample_weight=W), rel=1e-10)


def test_float32_stays_float32_and_matches_sklearn():
    X32 = X.astype(np.float32)
    kw = dict(init=X32[:4].copy(), n_init=1, tol=0.0)
    ours, sk = KMeans(4, **kw).fit(X32), SkKMeans(4, **kw).fit(X32)
    assert_same_fit(ours, sk, rtol=1e-5)
    assert ours.transform(X32).dtype == np.float32


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_seeding_draws_as_sklearn_does(init):
    """Same random_state, same draws (weighted k-means++ / weighted random rows): the same fit."""
    ours = KMeans(4, init=init, random_state=3).fit(X, sample_weight=W)
    sk = SkKMeans(4, init=init, random_state=3).fit(X, sample_weight=W)
    assert_same_fit(ours, sk)
    assert ours._n_init == sk._n_init == (1 if init == "k-means++" else 10)


def _assert_bounds_hold(state, d):
    """upper >= the distance to the own centre, lower[:, g] <= the distance to group g's nearest
    centre but the own one (d: every row's distance to every centre)."""
    rows = np.arange(len(d))
    assert (state.upper >= d[rows, state.labels] * (1 - 1e-12)).all()
    others = d.copy()
    others[rows, state.labels] = np.inf
    if state.groups is None:  # set by a full pass before any grouping: every group's bound alike
        groups = [np.arange(d.shape[1])] * state.n_groups
    else:
        members, start, _ = state.groups
        groups = [members[start[g] : start[g + 1]] for g in range(state.n_groups)]
    for g, m in enumerate(groups):
        assert (state.lower[:, g] <= others[:, m].min(axis=1) * (1 + 1e-6)).all()


@pytest.mark.parametrize("n_clusters", [12, 80])  # Elkan-like groups of 4, and Yinyang groups of 10
def test_bounds_never_change_a_label(n_clusters, monkeypatch):
    """Every bounded pass gives the argmin over all distances, and the bounds hold (bounded passes
    forced, whatever share of rows they score)."""
    monkeypatch.setattr(kernels, "BOUNDED_MAX_SHARE", 1.0)
    monkeypatch.setattr(kernels, "BOUNDED_MIN_ROWS", 0)
    data = blobs(n=3000, d=6, k=n_clusters, spread=0.5, seed=2)
    rng = np.random.default_rng(3)
    C = data[rng.choice(len(data), n_clusters, replace=False)]
    state = LloydState(Rows(data), np.ones(len(data)), n_clusters)
    moves, n_changed, checked = np.zeros(n_clusters), [], 0
    for _ in range(12):
        n_changed.append(state.assign(C, moves))
        d = np.sqrt(((data[:, None, :] - C[None]) ** 2).sum(-1))
        np.testing.assert_array_equal(state.labels, d.argmin(axis=1))
        if state._fresh:  # bounds kept for these labels and centres
            checked += 1
            _assert_bounds_hold(state, d)
        new = state.sums / state.counts[:, None]
        moves, C = np.sqrt(((new - C) ** 2).sum(axis=1)), new
    assert checked >= 8 and state.groups is not None  # bounded passes ran
    assert min(n_changed[1:]) > 0  # labels kept changing: the bounds had work to do


def test_tol_zero_stops_when_labels_stop_changing():
    kw = dict(init=X[:4].copy(), n_init=1, tol=0.0, max_iter=300)
    ours = KMeans(4, **kw).fit(X)
    assert ours.n_iter_ < 300
    assert ours.n_iter_ == SkKMeans(4, **kw).fit(X).n_iter_


@pytest.mark.parametrize("weighted", [False, True])
def test_empty_cluster_is_relocated_as_sklearn_does(weighted):
    """The farthest row moves to the empty cluster and leaves its old cluster's mean."""
    x = np.array([-10.0, -9.5, -9, -8.5, -8, -1, 1, 9, 9.5, 10]).reshape(-1, 1)
    w = np.linspace(0.5, 2.0, len(x)) if weighted else None
    init = np.array([[-10.0], [100.0], [200.0]])
    ours = KMeans(3, init=init, n_init=1).fit(x, sample_weight=w)
    sk = SkKMeans(3, init=init, n_init=1).fit(x, sample_weight=w)
    assert_same_fit(ours, sk)


def test_transform_of_the_centres_is_zero_on_the_diagonal():
    for dtype in (np.float32, np.float64):
        km = KMeans(4, random_state=0).fit(X.astype(dtype))
        Xt = km.transform(km.cluster_centers_)
        assert (np.diag(Xt) == 0).all()
        np.testing.assert_allclose(Xt, SkKMeans(4, random_state=0).fit(X.astype(dtype)).transform(km.cluster_centers_),
                                   rtol=1e-5, atol=1e-5)


def test_warnings_are_sklearn_s():
    with pytest.warns(RuntimeWarning, match="Explicit initial center position passed: performing only one init "
                                            "in KMeans instead of n_init=5"):
        assert KMeans(4, init=X[:4], n_init=5).fit(X)._n_init == 1
    dup = np.array([[0.0, 0], [0, 1], [1, 0], [1, 0]])
    with pytest.warns(ConvergenceWarning, match=r"Number of distinct clusters \(3\) found smaller than "
                                                r"n_clusters \(4\)\. Possibly due to duplicate points in X\."):
        KMeans(4, random_state=0).fit(dup)
    with pytest.warns(ConvergenceWarning, match=r"Number of distinct clusters \(3\)"):
        KMeans(4, random_state=0).fit(dup, sample_weight=[1.0, 2.0, 0.5, 1.0])
    with pytest.warns(RuntimeWarning, match="algorithm='elkan' doesn't make sense for a single cluster"):
        KMeans(1, algorithm="elkan").fit(X)


@pytest.mark.parametrize("params", [dict(n_clusters=0), dict(n_clusters=2.5), dict(n_init=0), dict(n_init="x"),
                                    dict(max_iter=0), dict(tol=-1.0), dict(algorithm="full"), dict(init="nope"),
                                    dict(copy_x="yes"), dict(n_clusters=len(X) + 1),
                                    dict(init=X[:3, :2], n_clusters=3), dict(init=X[:2], n_clusters=3)])
def test_parameter_errors_are_sklearn_s(params):
    with pytest.raises(Exception) as theirs:
        SkKMeans(**params).fit(X)
    with pytest.raises(type(theirs.value)) as ours:
        KMeans(**params).fit(X)
    assert str(ours.value).replace("fastlvm.mixture.kmeans.", "") == str(theirs.value)


@pytest.mark.parametrize("tol", [0.0, 1e-2])
def test_verbose_output_is_sklearn_s(tol, capsys):
    kw = dict(init=X[:4].copy(), n_init=1, tol=tol, verbose=1)
    KMeans(4, **kw).fit(X)
    ours = capsys.readouterr().out
    SkKMeans(4, **kw).fit(X)
    theirs = capsys.readouterr().out
    number = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
    assert number.sub("#", ours) == number.sub("#", theirs)
    assert ("strict convergence" if tol == 0 else "within tolerance") in ours


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_x_leaves_the_data_untouched(dtype):
    """The fit centres a copy (written in the centring pass), never the caller's array, also when the
    array needs no conversion."""
    mine = (X + 5.0).astype(dtype)
    before = mine.copy()
    KMeans(4, random_state=0).fit(mine)
    np.testing.assert_array_equal(mine, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("n, row", [(None, 13), (5000, 4322)])  # among the rows sampled for the origin, or not
def test_copy_x_false_names_a_bad_row_and_gives_the_data_back(bad, n, row):
    """The dense fit centres in place while it sums the columns; a NaN or infinity found there is
    named by row, and the other values are given back (to rounding)."""
    mine = X + 5.0 if n is None else np.random.default_rng(1).normal(size=(n, 3)) + 5.0
    mine[row, 1] = bad
    before = mine.copy()
    with pytest.raises(ValueError, match=rf"NaN or infinity \(first at row {row}\)"):
        KMeans(4, random_state=0, copy_x=False).fit(mine)
    finite = np.isfinite(before)
    np.testing.assert_allclose(mine[finite], before[finite], rtol=1e-15, atol=1e-14)


def _on_a_cache_line(A):
    """A copy of A whose first byte starts a 64-byte line."""
    buf = np.empty(A.size + 64 // A.itemsize, dtype=A.dtype)
    start = (-buf.ctypes.data % 64) // A.itemsize
    out = buf[start : start + A.size].reshape(A.shape)
    out[...] = A
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("copy_x", [True, False])
def test_centred_rows_on_cache_lines_are_read_in_place(monkeypatch, dtype, copy_x):
    """Rows already centred (to within a quarter of their spread) and aligned need neither a shift nor
    a copy: they are read where they lie, left as they were, and the fit is scikit-learn's."""
    from fastlvm.mixture import kmeans as fit_module

    Xc = _on_a_cache_line((X - X.mean(axis=0) + 0.05).astype(dtype))
    before = Xc.copy()
    copies = []
    real = fit_module.engines.aligned_array
    def aligned_array(shape, dtype):
        if np.ndim(shape) == 1 and len(shape) == 2:  # a copy of the rows (not the unit weights)
            copies.append(shape)
        return real(shape, dtype)

    monkeypatch.setattr(fit_module.engines, "aligned_array", aligned_array)
    kw = dict(init=Xc[:4].copy(), n_init=1, tol=0.0)
    ours = KMeans(4, copy_x=copy_x, **kw).fit(Xc)
    assert copies == []
    np.testing.assert_array_equal(Xc, before)
    assert_same_fit(ours, SkKMeans(4, **kw).fit(Xc), rtol=1e-10 if dtype == np.float64 else 1e-5)
    if copy_x:  # shifted, or read-only: copied
        KMeans(4, **kw).fit(Xc + 5.0)
        Xc.flags.writeable = False
        KMeans(4, **kw).fit(Xc)
        assert len(copies) == 2


def test_a_bad_value_in_rows_read_in_place_is_named():
    Xc = _on_a_cache_line(np.random.default_rng(2).normal(size=(5000, 3)))
    Xc[4322, 2] = np.nan  # not among the rows sampled for the origin
    before = Xc.copy()
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 4322\)"):
        KMeans(4, random_state=0).fit(Xc)
    np.testing.assert_array_equal(Xc, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("weighted", [False, True])
def test_given_centres_at_tol_zero_skip_the_centring_pass_not_the_check(monkeypatch, bad, weighted):
    """Centred rows, given centres and tol=0 need nothing from the centring pass: the fit runs
    without it (and is scikit-learn's), and the first Lloyd pass's sums still find a NaN or
    infinity, named by row, also in a row of weight 0."""
    from fastlvm.mixture import kmeans as fit_module

    passes = []
    real = fit_module.centre
    monkeypatch.setattr(fit_module, "centre", lambda *a: passes.append(1) or real(*a))
    Xc = np.random.default_rng(2).normal(size=(5000, 3))
    w = np.random.default_rng(3).uniform(0.5, 2.0, size=len(Xc)) if weighted else None
    kw = dict(init=Xc[:4].copy(), n_init=1, tol=0.0)
    ours = KMeans(4, **kw).fit(Xc, sample_weight=w)
    assert passes == []
    assert_same_fit(ours, SkKMeans(4, **kw).fit(Xc, sample_weight=w))
    Xc[4322, 2] = bad
    if weighted:
        w[4322] = 0.0
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 4322\)"):
        KMeans(4, **kw).fit(Xc, sample_weight=w)
    KMeans(4, init=Xc[:4].copy(), n_init=1).fit(np.delete(Xc, 4322, axis=0))  # tol > 0: the pass runs
    assert passes == [1]


@pytest.mark.parametrize("offset", [0.0, 5.0])  # centred (read in place when writeable), or shifted
def test_read_only_rows_are_copied_whatever_copy_x_says(offset):
    mine = X - X.mean(axis=0) + offset
    mine.flags.writeable = False
    kw = dict(init=mine[:4].copy(), n_init=1, tol=0.0)
    ours = KMeans(4, copy_x=False, **kw).fit(mine)
    np.testing.assert_array_equal(ours.labels_, KMeans(4, **kw).fit(mine.copy()).labels_)
    assert_same_fit(ours, SkKMeans(4, **kw).fit(mine))


def test_copy_x_false_gives_the_data_back():
    mine = X.copy()
    a = KMeans(4, random_state=0, copy_x=False).fit(mine)
    np.testing.assert_allclose(mine, X, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.labels_, KMeans(4, random_state=0).fit(X).labels_)


def test_callable_init_feature_names_and_fit_transform():
    km = KMeans(4, init=lambda data, k, random_state: data[:k] + 0.0, n_init=1)
    Xt = km.fit_transform(X)
    np.testing.assert_allclose(Xt, km.transform(X))
    assert list(km.get_feature_names_out()) == [f"kmeans{i}" for i in range(4)]
    assert km.n_features_in_ == X.shape[1]


def test_integer_weights_equal_repeated_rows():
    reps = np.random.default_rng(4).integers(1, 4, size=len(X))
    kw = dict(init=X[:4].copy(), n_init=1)
    weighted = KMeans(4, **kw).fit(X, sample_weight=reps)
    repeated = KMeans(4, **kw).fit(np.repeat(X, reps, axis=0))
    np.testing.assert_array_equal(np.repeat(weighted.labels_, reps), repeated.labels_)
    np.testing.assert_allclose(weighted.cluster_centers_, repeated.cluster_centers_, rtol=1e-12)
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-12)


def test_every_source_gives_the_in_memory_fit(tmp_path):
    h5py = pytest.importorskip("h5py")
    da = pytest.importorskip("dask.array")
    kw = dict(init=X[:4].copy(), n_init=1, tol=0.0)
    ref = KMeans(4, **kw).fit(X, sample_weight=W)
    path = tmp_path / "x.npy"
    np.save(path, X)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = X
    with h5py.File(tmp_path / "x.h5", "r") as f:
        sources = {"memmap": np.load(path, mmap_mode="r"), "hdf5": f["x"],
                   "chunks": lambda: (X[i : i + 128] for i in range(0, len(X), 128)),
                   "dask": da.from_array(X, chunks=(200, -1))}
        for name, source in sources.items():
            km = KMeans(4, **kw).fit(source, sample_weight=W)
            np.testing.assert_array_equal(km.labels_, ref.labels_, err_msg=name)
            assert km.n_iter_ == ref.n_iter_, name
            np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-10, err_msg=name)
            assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-10), name
