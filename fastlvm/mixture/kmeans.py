"""K-means: scikit-learn's KMeans (Lloyd's algorithm) on fastlvm's own k-means kernels.

A fit reads as the algorithm does: data source -> initial centres -> repeat (assign -> update).
In-memory data (dense or CSR) keeps Hamerly bounds and running sums between passes, so rows whose
label cannot change are not read; a streamed source (memmap, HDF5/Zarr, chunk callable, Dask)
is assigned chunk by chunk from scratch on every pass. Both give Lloyd's labels.
"""

import warnings
from dataclasses import dataclass
from functools import partial
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, _is_arraylike_not_scalar, check_array, check_is_fitted, validate_data

from fastlvm import engine as engines
from fastlvm._validation import check_finite
from fastlvm.data import as_source
from fastlvm.engine import LloydState, Rows, centre
from fastlvm.mixture.init import kmeans_plusplus, random_rows

INIT_SAMPLE_ROWS = 100_000  # rows a streamed source's initial centres are chosen from
CHUNK_ROWS = 65_536
SHIFT_SAMPLE_ROWS = 1024  # rows whose mean is the origin of a dense fit's coordinates


@dataclass
class LloydRun:
    """The outcome of one k-means run."""

    centres: np.ndarray
    labels: np.ndarray
    counts: np.ndarray  # the clusters' weights under these labels
    inertia: float
    n_iter: int
    strict: bool  # stopped because no label changed


class _InMemory:
    """Dense or CSR rows held in memory: Hamerly bounds and running sums across passes."""

    def __init__(self, X, weights, norms=None, checked=True):
        self.rows = Rows(X, norms)
        self.weights = weights
        self.checked = checked  # whether X is known to hold no NaN or infinity

    def start(self, n_clusters):
        self.state = LloydState(self.rows, self.weights, n_clusters)

    def assign(self, C, moves, distances=False):
        n_changed = self.state.assign(C, moves, distances)
        if not self.checked:  # the first pass adds every row into some cluster's sum (w x is NaN for w = 0 too)
            if not np.isfinite(self.state.sums).all():
                _finite(self.rows.X)
            self.checked = True
        return self.state.sums, self.state.counts, n_changed

    @property
    def labels(self):
        return self.state.labels

    def own_sq_distances(self, C):  # C: the last pass's centres, whose distances it may have kept
        d2 = self.state.d2
        return self.rows.own_sq_distances(C, self.labels) if d2 is None else d2

    def take(self, index):
        return self.rows.rows(index)


def _chunk_pass(C, weights, offset, chunk):
    """A fresh assignment of one chunk: (sums, counts, labels, squared distance to own centre)."""
    rows = Rows(chunk)
    state = LloydState(rows, weights[offset : offset + chunk.shape[0]], C.shape[0], bounds=False)
    state.assign(C, np.zeros(C.shape[0]), distances=True)
    return state.sums, state.counts, state.labels, state.d2


class _Streamed:
    """A source read chunk by chunk: every pass assigns every row afresh (no per-row bounds)."""

    def __init__(self, source, weights, mean):
        self.source = source
        self.weights = weights
        self.mean = mean

    def start(self, n_clusters):
        self.labels = np.full(self.source.n_rows, -1, dtype=np.int32)
        self._d2 = None

    def assign(self, C, moves, distances=False):  # distances: always kept
        parts = list(self.source.map(partial(_centred_chunk_pass, C, self.weights, self.mean), CHUNK_ROWS))
        sums = sum(p[0] for p in parts)
        counts = sum(p[1] for p in parts)
        labels = np.concatenate([p[2] for p in parts])
        n_changed = int((labels != self.labels).sum())
        self.labels, self._d2 = labels, np.concatenate([p[3] for p in parts])
        return sums, counts, n_changed

    def own_sq_distances(self, C):  # kept from the last pass, which was made with these C
        return self._d2

    def take(self, index):
        order = np.argsort(index)
        rows = np.empty((len(index), self.source.n_features))
        rows[order] = self.source.take(np.asarray(index)[order], CHUNK_ROWS) - self.mean
        return rows


class _OnGpu:
    """Rows assigned on the GPU (fastlvm.engine, the GMM kernel's hard mode): every pass assigns
    every row afresh and brings back the sums, counts, labels and distances. rows: a centred host
    array (copied to the device in chunks) or a DeviceSource (read in place, not centred)."""

    def __init__(self, engine, rows, chunk_rows=engines.CUDA_CHUNK_ROWS):
        self.engine = engine
        self.rows = rows
        self.chunk_rows = chunk_rows

    def start(self, n_clusters):
        self.labels = np.full(self.rows.shape[0], -1, dtype=np.int32)
        self._d2 = None

    def _chunks(self):
        if isinstance(self.rows, engines.DeviceSource):
            return self.rows.chunks(self.chunk_rows)
        return ((a, self.rows[a : a + self.chunk_rows]) for a in range(0, self.rows.shape[0], self.chunk_rows))

    def assign(self, C, moves, distances=False):  # distances: always kept
        parts = [self.engine.assign(chunk, C) for _, chunk in self._chunks()]
        labels = np.concatenate([p[2] for p in parts]).astype(np.int32)
        n_changed = int((labels != self.labels).sum())
        self.labels, self._d2 = labels, np.concatenate([p[3] for p in parts])
        return sum(p[0] for p in parts), sum(p[1] for p in parts), n_changed

    def own_sq_distances(self, C):  # kept from the last pass, which was made with these C
        return self._d2

    def take(self, index):
        if isinstance(self.rows, engines.DeviceSource):
            return self.rows.take(np.asarray(index), self.chunk_rows).astype(np.float64)
        return np.asarray(self.rows[np.asarray(index)], dtype=np.float64)


def _centred_chunk_pass(C, weights, mean, offset, chunk):
    return _chunk_pass(C, weights, offset, chunk - mean.astype(chunk.dtype))


def _updated_centres(data, weights, sums, counts, C):
    """Lloyd's update as scikit-learn makes it: each empty cluster takes the row farthest from its
    centre, which leaves its old cluster's mean; a cluster still empty sits on the heaviest one."""
    if counts.min() > 1e-12 * np.abs(counts).sum():  # no empty cluster: the means, in 3 NumPy calls, not 12
        return sums / counts[:, None]
    counts = np.where(counts <= 1e-12 * np.abs(counts).sum(), 0.0, counts)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        d2 = data.own_sq_distances(C)
        if d2.max() > 0:
            sums, counts = sums.copy(), counts.copy()
            far = np.argpartition(d2, -empty.size)[: -empty.size - 1 : -1]
            for k, i, x in zip(empty, far, data.take(far)):
                w, old = weights[i], data.labels[i]
                sums[old] -= w * x
                sums[k] = w * x
                counts[k] = w
                counts[old] -= w
    filled = counts > 0
    new = np.where(filled[:, None], sums / np.where(filled, counts, 1.0)[:, None], 0.0)
    new[~filled] = new[np.argmax(counts)]
    return new


def lloyd(data, weights, centres, max_iter, tol, verbose=0):
    """Lloyd's iterations from `centres`, stopping as scikit-learn does: when no label changes
    (strict convergence) or when the squared centre shift is at most tol; a run that did not stop
    strictly is followed by one more assignment, so labels match the final centres."""
    K = centres.shape[0]
    data.start(K)
    C = np.array(centres, dtype=np.float64)
    moves = np.zeros(K)
    strict = False
    for i in range(max_iter):
        sums, counts, n_changed = data.assign(C, moves)
        if verbose:
            print(f"Iteration {i}, inertia {float(weights @ data.own_sq_distances(C))}.")
        new = _updated_centres(data, weights, sums, counts, C)
        moves = np.sqrt(((new - C) ** 2).sum(axis=1))
        C = new
        if i > 0 and n_changed == 0:
            if verbose:
                print(f"Converged at iteration {i}: strict convergence.")
            strict = True
            break
        shift = float((moves**2).sum())
        if shift <= tol:
            if verbose:
                print(f"Converged at iteration {i}: center shift {shift} within tolerance {tol}.")
            break
    if not strict:  # the inertia's distances from this pass, where it scores every row
        counts = data.assign(C, moves, distances=True)[1]
    inertia = float(weights @ data.own_sq_distances(C))
    return LloydRun(C, data.labels, counts, inertia, i + 1, strict)


def _shifted_moments(shift, offset, chunk):
    y = np.asarray(chunk, dtype=np.float64) - shift
    return y.shape[0], y.sum(axis=0), (y * y).sum(axis=0)


def _column_moments(source):
    """Mean and variance of every column of a source, summed chunk by chunk about its first row."""
    shift = np.asarray(source.head()[0], dtype=np.float64)
    parts = list(source.map(partial(_shifted_moments, shift), CHUNK_ROWS))
    n = sum(p[0] for p in parts)
    mean = sum(p[1] for p in parts) / n
    return shift + mean, np.maximum(sum(p[2] for p in parts) / n - mean**2, 0.0)


def _weights(sample_weight, n_samples, dtype):
    """The rows' weights in float64 (N,), checked as scikit-learn checks them; unit weights in a
    pooled buffer (a fresh array's page faults took 1 ms of a 200k-row fit)."""
    if sample_weight is None:
        weights = engines.aligned_array(n_samples, np.float64)
        weights.fill(1.0)
        return weights
    weights = _check_sample_weight(sample_weight, np.empty((n_samples, 0), dtype=dtype), dtype=dtype)
    return np.asarray(weights, dtype=np.float64)


def _dense_origin(X):
    """The origin of a dense fit's coordinates, so that ||c||^2 - 2 x.c does not cancel: the mean of
    a sample of rows (near enough to the mean that one pass both centres the data and sums its
    columns), or zero where it lies within a quarter of the rows' spread (rms distance to it) of
    zero: there centring changes the products' rounding by a few percent at most, and aligned rows
    are read in place, without a copy (a copy cost a 200k x 32 float32 fit 3 to 5 ms of 60)."""
    sample = np.asarray(X[:: max(1, X.shape[0] // SHIFT_SAMPLE_ROWS)], dtype=np.float64)
    origin = sample.mean(axis=0)
    if not np.isfinite(origin).all():  # a bad value among the sampled rows: named before X is touched
        _finite(X)
        return np.zeros(X.shape[1])  # finite values whose sum overflows
    spread = ((sample - origin) ** 2).sum(axis=1).mean()
    return np.zeros(X.shape[1]) if origin @ origin <= spread / 16 else origin


def _same_clustering(labels1, labels2, n_clusters):
    """True when the labellings differ only by a renaming of the clusters."""
    mapping = np.full(n_clusters, -1)
    first = np.unique(labels1, return_index=True)[1]
    mapping[labels1[first]] = labels2[first]
    return bool(np.array_equal(mapping[labels1], labels2))


class KMeans(ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin, BaseEstimator):
    """K-means clustering with scikit-learn's KMeans API and results.

    From the same initial centres it gives scikit-learn's Lloyd labels, centres, inertia and
    n_iter_; 'lloyd' and 'elkan' both run fastlvm's bounded Lloyd kernel (Hamerly's bounds skip
    rows whose label cannot change). `fit` also takes every source GaussianMixture.fit takes
    (memmap, HDF5/Zarr datasets, chunk callables, Dask arrays), read chunk by chunk.

    backend: 'auto' (the GPU for device input: CuPy arrays, torch CUDA tensors, ...), 'cpu' or
    'cuda'. On the GPU every Lloyd pass is the GMM kernel's hard mode (labels and per-cluster sums,
    reduced in float64 on the device; no bounds); dense data without sample weights only.
    """

    _parameter_constraints: dict = {
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "init": [StrOptions({"k-means++", "random"}), callable, "array-like"],
        "n_init": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "copy_x": ["boolean"],
        "algorithm": [StrOptions({"lloyd", "elkan"})],
        "backend": [StrOptions(set(engines.BACKENDS))],
    }

    def __init__(self, n_clusters=8, *, init="k-means++", n_init="auto", max_iter=300, tol=1e-4,
                 verbose=0, random_state=None, copy_x=True, algorithm="lloyd", backend="auto"):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.copy_x = copy_x
        self.algorithm = algorithm
        self.backend = backend

    def _check_params_vs_input(self, n_samples):
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}.")
        if self.n_init == "auto":
            explicit = not isinstance(self.init, str) and not callable(self.init)
            self._n_init = 1 if explicit or self.init == "k-means++" else 10
        else:
            self._n_init = self.n_init
        if _is_arraylike_not_scalar(self.init) and self._n_init != 1:
            warnings.warn("Explicit initial center position passed: performing only one init in "
                          f"{self.__class__.__name__} instead of n_init={self._n_init}.", RuntimeWarning,
                          stacklevel=3)
            self._n_init = 1
        self._algorithm = self.algorithm
        if self.algorithm == "elkan" and self.n_clusters == 1:
            warnings.warn("algorithm='elkan' doesn't make sense for a single cluster. Using 'lloyd' instead.",
                          RuntimeWarning, stacklevel=3)
            self._algorithm = "lloyd"

    def _validate_center_shape(self, n_features, centers):
        if centers.shape[0] != self.n_clusters:
            raise ValueError(f"The shape of the initial centers {centers.shape} does not match the number "
                             f"of clusters {self.n_clusters}.")
        if centers.shape[1] != n_features:
            raise ValueError(f"The shape of the initial centers {centers.shape} does not match the number "
                             f"of features of the data {n_features}.")

    def _initial_centres(self, X, rows, weights, random_state):
        """Initial centres in the fit's coordinates (X and rows are centred like the fit's data)."""
        init = self.init
        if isinstance(init, str) and init == "k-means++":
            return kmeans_plusplus(rows, self.n_clusters, random_state, sample_weight=weights)
        if isinstance(init, str) and init == "random":
            return random_rows(rows, self.n_clusters, random_state, sample_weight=weights)
        centres = init(X, self.n_clusters, random_state=random_state)
        if sp.issparse(centres):
            centres = centres.toarray()
        centres = check_array(centres, dtype=rows.dtype, copy=False, order="C")
        self._validate_center_shape(rows.n_features, centres)
        return centres.astype(np.float64)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Compute k-means clustering of X (array-like, CSR matrix or any fastlvm data source)."""
        engine = engines.resolve(self.backend, X)
        source = engines.DeviceSource(X) if engines.is_device_array(X) else as_source(X)
        if engine.backend == "cuda":
            _check_gpu_input(X, source, sample_weight)
        if source is None:
            # Not copied here: centring writes the fit's copy (copy_x) in the same pass, and CSR rows
            # are never written.
            X = validate_data(self, X, accept_sparse="csr", dtype=[np.float64, np.float32], order="C",
                              copy=False, accept_large_sparse=False, ensure_all_finite=False)
            if sp.issparse(X):
                _finite(X)  # dense rows are checked by the centring pass's sums below
            n_samples, n_features, dtype = X.shape[0], X.shape[1], X.dtype
        else:
            n_samples, n_features, dtype = source.n_rows, source.n_features, source.dtype
            self.n_features_in_ = n_features
        self._check_params_vs_input(n_samples)
        random_state = check_random_state(self.random_state)
        weights = _weights(sample_weight, n_samples, dtype)

        init_array = None
        if _is_arraylike_not_scalar(self.init):
            init_array = check_array(self.init, dtype=dtype, copy=True, order="C")
            self._validate_center_shape(n_features, init_array)

        # Centre dense data (as scikit-learn does) so that ||c||^2 - 2 x.c does not cancel.
        shifted_in_place = False  # the caller's rows centred in place (copy_x=False): given back after
        if source is not None:
            if isinstance(source, engines.DeviceSource):  # read in place, so not centred
                variances = engines.column_moments(engine, source.array)[1]
                origin, data = np.zeros(n_features), _OnGpu(engine, source)
            else:
                origin, variances = _column_moments(source)
                data = _Streamed(source, weights, origin)
            init_X = init_rows = init_weights = None
            if init_array is None:  # centres are chosen from a sample read in one pass
                sample = np.sort(random_state.permutation(n_samples)[:INIT_SAMPLE_ROWS]) \
                    if n_samples > INIT_SAMPLE_ROWS else np.arange(n_samples)
                init_X = np.ascontiguousarray(source.take(sample, CHUNK_ROWS) - origin, dtype=dtype)
                init_rows, init_weights = Rows(init_X), weights[sample]
        elif sp.issparse(X):
            origin = np.zeros(n_features)
            variances = _sparse_variances(X) if self.tol else 0.0
            data = _InMemory(X, weights)
            init_X, init_rows, init_weights = X, data.rows, weights
        else:
            origin = _dense_origin(X)
            # Centred into the fit's copy (copy_x), or into X and given back after the fit. Rows that
            # need no shift are read where they lie, on a cache line or not (the search broadcasts
            # single elements: a 64-byte aligned copy cost a 200k x 32 float32 fit 0.6 ms, float64
            # 1.0 ms, and saved no time in its passes). A read-only array is copied whatever copy_x
            # says: it cannot be centred in place, and its type would compile every kernel again.
            user_X, shifted = X, bool(origin.any())
            copy = not X.flags.writeable or (self.copy_x and shifted)
            X = engines.aligned_array(X.shape, X.dtype) if copy else X
            norms, variances = None, 0.0
            if shifted or copy or self.tol or init_array is None or engine.backend == "cuda":
                norms, sums, sq_sums = centre(user_X, origin.astype(dtype), X if shifted or copy else None)
                shifted_in_place = shifted and not copy
                if not np.isfinite(sq_sums).all():  # NaN and inf reach the sums (a float64 overflow falls through)
                    if shifted_in_place:
                        X += origin.astype(dtype)  # the caller's data back, as after a fit
                    _finite(user_X)
                variances = np.maximum(sq_sums / n_samples - (sums / n_samples) ** 2, 0.0)
            # else nothing to shift, copy or measure, and given centres: no centring pass (a fit
            # 1.4-2.5 ms shorter at 200k x 32); the first Lloyd pass's sums, every row's, show a bad
            # value, and the norms are computed if bounds need them.
            data = _OnGpu(engine, X) if engine.backend == "cuda" else _InMemory(X, weights, norms,
                                                                              checked=norms is not None)
            init_X, init_rows, init_weights = X, Rows(X, norms) if engine.backend == "cuda" else data.rows, weights
        tol = float(np.mean(variances) * self.tol) if self.tol else 0.0

        # One BLAS thread on the host (the seeding's and the updates' small products): a threaded
        # call leaves OpenBLAS's threads spinning beside the kernels' workers, at up to half their speed.
        with engines.single_thread_blas():
            best = None
            for _ in range(self._n_init):
                if init_array is not None:
                    centres = init_array.astype(np.float64) - origin
                else:
                    centres = self._initial_centres(init_X, init_rows, init_weights, random_state)
                if self.verbose:
                    print("Initialization complete")
                run = lloyd(data, weights, centres, self.max_iter, tol, self.verbose)
                if best is None or (run.inertia < best.inertia
                                    and not _same_clustering(run.labels, best.labels, self.n_clusters)):
                    best = run

        if shifted_in_place:
            X += origin.astype(dtype)
        # Unit weights count rows exactly; a bincount of the labels took 1-2 ms of a 200k-row fit.
        distinct = np.count_nonzero(best.counts if sample_weight is None
                                    else np.bincount(best.labels, minlength=self.n_clusters))
        if distinct < self.n_clusters:
            warnings.warn(f"Number of distinct clusters ({distinct}) found smaller than n_clusters "
                          f"({self.n_clusters}). Possibly due to duplicate points in X.", ConvergenceWarning,
                          stacklevel=2)
        self.cluster_centers_ = (best.centres + origin).astype(dtype)
        self._n_features_out = self.n_clusters
        self.labels_ = best.labels
        self.inertia_ = best.inertia
        self.n_iter_ = best.n_iter
        return self

    def _check_test_data(self, X):
        check_is_fitted(self)
        if engines.is_device_array(X):
            source = engines.DeviceSource(X)
            if source.n_features != self.n_features_in_:
                raise ValueError(f"X has {source.n_features} features, but {type(self).__name__} is expecting "
                                 f"{self.n_features_in_} features as input.")
            return source
        return _finite(validate_data(self, X, accept_sparse="csr", reset=False, dtype=[np.float64, np.float32],
                                     order="C", accept_large_sparse=False, ensure_all_finite=False))

    def _labels_inertia(self, X, sample_weight=None):
        C = np.asarray(self.cluster_centers_, dtype=np.float64)
        if isinstance(X, engines.DeviceSource):
            if sample_weight is not None:
                raise ValueError("sample_weight is not supported for device input; pass host arrays.")
            data = _OnGpu(engines.resolve("cuda"), X)
            data.start(self.n_clusters)
            data.assign(C, None)
            return engines.like_input(engines.to_device(data.labels.astype(np.int64)), X.input), float(data._d2.sum())
        rows = Rows(X)
        weights = _weights(sample_weight, X.shape[0], X.dtype)
        state = LloydState(rows, weights, self.n_clusters, bounds=False)
        state.assign(C, np.zeros(self.n_clusters), distances=True)  # the first pass is a full one
        return state.labels, float(weights @ state.d2)

    def predict(self, X):
        """Index of the nearest centre of every row."""
        return self._labels_inertia(self._check_test_data(X))[0]

    def fit_predict(self, X, y=None, sample_weight=None):
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X):
        """Distances of every row to every centre (exactly 0 for a row equal to a centre)."""
        return self._transform(self._check_test_data(X))

    def _transform(self, X):
        if isinstance(X, engines.DeviceSource):
            raise TypeError("transform needs host data (it returns an N x K array); copy X to the host first.")
        d2 = Rows(X).sq_distances(self.cluster_centers_)
        return np.sqrt(d2).astype(X.dtype, copy=False)

    def fit_transform(self, X, y=None, sample_weight=None):
        return self.fit(X, sample_weight=sample_weight)._transform(self._check_test_data(X))

    def score(self, X, y=None, sample_weight=None):
        """Opposite of the (weighted) sum of squared distances of X to its nearest centre."""
        return -self._labels_inertia(self._check_test_data(X), sample_weight)[1]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


def _check_gpu_input(X, source, sample_weight):
    """The GPU path takes dense data without sample weights (in memory or on the device)."""
    if sp.issparse(X):
        raise TypeError("KMeans(backend='cuda') takes dense data; sparse matrices run on backend='cpu'.")
    if source is not None and not isinstance(source, engines.DeviceSource):
        raise TypeError("KMeans(backend='cuda') takes in-memory or device arrays; streamed sources (memmap, "
                        "HDF5/Zarr, chunk callables, Dask) run on backend='cpu'.")
    if sample_weight is not None and np.any(np.asarray(sample_weight) != 1):
        raise ValueError("KMeans(backend='cuda') does not take sample weights; use backend='cpu'.")


def _finite(X):
    """X, after checking that it holds no NaN or infinity (naming the first bad row)."""
    if sp.issparse(X):
        if not np.isfinite(X.data).all():
            row = np.searchsorted(X.indptr, np.argmin(np.isfinite(X.data)), side="right") - 1
            raise ValueError(f"Input X contains NaN or infinity (first at row {row}).")
    else:
        check_finite(X)
    return X


def _sparse_variances(X):
    from sklearn.utils.sparsefuncs import mean_variance_axis

    return mean_variance_axis(X, axis=0)[1]
