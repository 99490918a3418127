"""GaussianMixture: scikit-learn's estimator API over fastlvm's fused EM kernel.

One EM iteration is one pass over the rows: the kernel turns each chunk into sufficient
statistics under the current parameters (E-step), their sum gives the new parameters in closed
form (M-step, fastlvm.mixture.em). No N x K array is allocated during a fit. The rows come from a
data source (fastlvm.data): an in-memory array, anything sliceable by rows (memmap,
HDF5, Zarr), a callable yielding chunks, or a Dask array whose blocks are processed by workers.
"""

import math
import os
import warnings
from functools import partial
from numbers import Integral, Real

import numpy as np
from sklearn import get_config
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as _SkGaussianMixture
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm import engine as engines
from fastlvm._validation import check_finite
from fastlvm.data.sources import ArraySource, as_source
from fastlvm.mixture.checkpoint import Checkpoint
from fastlvm.mixture.covariance import get_covariance_type
from fastlvm.mixture.em import Run, best_of, change_below, run_em
from fastlvm.mixture.fit_context import CollapsedComponentWarning, FitContext, MixtureParameters, data_moments
from fastlvm.mixture.init import kmeans_plusplus, random_rows
from fastlvm.mixture.init_checks import check_initial_arrays
from fastlvm.mixture.kmeans import KMeans
from fastlvm.mixture.online import OnlineState, step_size, stepwise_update
from fastlvm.mixture.prior import GaussianMixturePrior
from fastlvm.mixture.progress import Progress
from fastlvm.mixture.stats import kernel_parameters, rows_output

__all__ = ["CollapsedComponentWarning", "GaussianMixture"]

# Rows used to initialise from data that is not an in-memory array (a uniform random sample).
DEFAULT_INIT_SIZE = 100_000


class GaussianMixture(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by EM (maximum likelihood, or MAP with a conjugate prior).

    Same constructor, methods, fitted attributes, errors and warnings as scikit-learn's
    GaussianMixture, plus: prior (None for maximum likelihood; a fastlvm.GaussianMixturePrior or a
    dict of its fields for MAP-EM, in which case lower_bound_ is the log-posterior per row),
    chunk_size (rows per kernel call; None picks one that keeps working memory flat) and backend
    ('auto', 'cpu' or 'cuda'; 'auto' runs the GPU kernels for device input: CuPy arrays, torch CUDA
    tensors, anything with __cuda_array_interface__ or DLPack on a CUDA device, whose per-row
    outputs come back as the same array type on the same device). Float32 input is fitted in float32 arithmetic with float64 statistics and
    gives float32 parameters and outputs. A collapsed component is re-seeded with a
    CollapsedComponentWarning; only when no positive definite covariance can be had (degenerate
    data at reg_covar=0) does fit raise scikit-learn's ValueError. lower_bounds_ holds the
    objective of every iteration of the best initialisation.

    Data larger than memory: X may be anything sliceable by rows (np.memmap, h5py/Zarr datasets),
    a callable returning a fresh iterable of 2-D arrays on every call, or a dask.array (each
    block's statistics computed on the Dask workers); it is read chunk by chunk, validated as it is
    read. init_size: rows used to initialise; None means every row of an in-memory array and a
    uniform random sample of at most 100,000 rows of any other input. checkpoint: a path; after
    every iteration the fit's state is written there atomically (.npz, no pickle), and a later
    fit with the same path resumes from it (delete the file to start afresh). partial_fit runs
    stepwise EM with step size (t - 1 + learning_offset) ** -learning_decay.
    """

    # scikit-learn's own constraints for its parameters (the same objects, so the same messages,
    # whose option sets print in hash order), then fastlvm's.
    _parameter_constraints: dict = {
        **_SkGaussianMixture._parameter_constraints,
        "prior": [GaussianMixturePrior, dict, None],
        "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
        "backend": [StrOptions(set(engines.BACKENDS))],
        "init_size": [Interval(Integral, 1, None, closed="left"), None],
        "checkpoint": [str, os.PathLike, None],
        "learning_offset": [Interval(Real, 0.0, None, closed="left")],
        "learning_decay": [Interval(Real, 0.5, 1.0, closed="right")],
    }

    def __init__(self, n_components=1, *, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans", weights_init=None, means_init=None,
                 precisions_init=None, random_state=None, warm_start=False, verbose=0,
                 verbose_interval=10, prior=None, chunk_size=None, backend="auto", init_size=None,
                 checkpoint=None, learning_offset=2.0, learning_decay=0.6):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.prior = prior
        self.chunk_size = chunk_size
        self.backend = backend
        self.init_size = init_size
        self.checkpoint = checkpoint
        self.learning_offset = learning_offset
        self.learning_decay = learning_decay

    # ------------------------------------------------------------------ data and context
    def _data(self, X, reset, min_rows=1):
        """X as a data source. In-memory data is validated whole (scikit-learn's validate_data);
        out-of-core data, chunk sources and Dask arrays chunk by chunk as they are read."""
        if engines.is_device_array(X):
            source = engines.DeviceSource(X)
        else:
            source = as_source(X)
        if source is None:
            X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=min_rows,
                              ensure_all_finite=False, order="C", reset=reset)
            check_finite(X)
            return ArraySource(X, trusted=True)
        if source.n_rows < min_rows:
            raise ValueError(f"Found array with {source.n_rows} sample(s) (shape={source.shape}) while a minimum "
                             f"of {min_rows} is required.")
        if reset:
            self.n_features_in_ = source.n_features
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif source.n_features != self.n_features_in_:
            raise ValueError(f"X has {source.n_features} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        return source

    def _engine(self, X):
        """The kernels for this call's input (fastlvm.engine.resolve)."""
        return engines.resolve(self.backend, X)

    def _chunk_rows(self, engine, D):
        return self.chunk_size or engine.chunk_rows(self.n_components, D)

    def _check_start(self, data):
        """The checks that need the data's shape (scikit-learn's order); the user's initial arrays."""
        K, N = self.n_components, data.n_rows
        if N < K:
            raise ValueError(f"Expected n_samples >= n_components but got n_components = {K}, n_samples = {N}")
        if self.init_size is not None and self.init_size < K:
            raise ValueError(f"The 'init_size' parameter of {type(self).__name__} must be >= n_components = {K}. "
                             f"Got {self.init_size} instead.")
        initial = (engines.on_host(a)[0] for a in (self.weights_init, self.means_init, self.precisions_init))
        return check_initial_arrays(*initial, get_covariance_type(self.covariance_type), K, data.n_features)

    def _context(self, data, rng, engine, prior=None):
        """The fit's context. The rows to initialise on are drawn from rng: out-of-core data (and any
        data when init_size is set) is initialised on a uniform random sample."""
        K, N = self.n_components, data.n_rows
        if isinstance(prior, dict):
            prior = GaussianMixturePrior(**prior)
        cov = get_covariance_type(self.covariance_type)
        size = self.init_size
        if size is None:
            size = math.inf if isinstance(data, ArraySource) and data.trusted else DEFAULT_INIT_SIZE
        rows = None
        if N > size:
            # Generator.choice draws a small sample without a permutation of all N rows (Floyd's algorithm).
            rows = np.sort(np.random.default_rng(rng.randint(2**31)).choice(N, size, replace=False, shuffle=False))
        return FitContext(data, cov, K, self._chunk_rows(engine, data.n_features), self.reg_covar, prior, rows, engine)

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Estimate the parameters by EM; the best of n_init initialisations is kept. With
        warm_start, a fitted model continues from its parameters and lower_bound_.

        X: array-like (N, D), np.memmap, h5py/Zarr dataset, dask.array, or a callable returning a
        fresh iterable of (rows, D) arrays on every call."""
        continuing = self.warm_start and hasattr(self, "converged_")
        self._check_dispatch_init()
        vars(self).pop("_online", None)  # a later partial_fit starts its running statistics afresh
        X, namespace = engines.on_host(X)
        engine = self._engine(X)
        data = self._data(X, reset=not continuing, min_rows=2)
        init = self._check_start(data)
        rng = check_random_state(self.random_state)
        ctx = self._context(data, rng, engine, self.prior)
        n_inits = 1 if continuing else self.n_init
        checkpoint = resumed = best = None
        if self.checkpoint is not None:
            checkpoint = Checkpoint(self.checkpoint, MixtureParameters, n_components=self.n_components,
                                    n_features=data.n_features, covariance_type=ctx.cov.name, dtype=str(data.dtype),
                                    n_samples=data.n_rows, n_init=n_inits)
            resumed = checkpoint.load()
        first = 0 if resumed is None else resumed.init
        best = None if resumed is None else resumed.best
        # One BLAS thread on the host: the kernels are the parallel part, the host's D x D algebra
        # gains nothing from threads, and a threaded call leaves OpenBLAS's threads spinning beside
        # the kernels' workers for ~0.1 s, at up to half their speed.
        with engines.single_thread_blas():
            for i in range(first, n_inits):
                progress = Progress(self.verbose, self.verbose_interval, self.max_iter, data.n_rows, i)
                if resumed is not None and i == resumed.init:
                    rng.set_state(resumed.rng_state)
                    run = resumed.run
                elif continuing:
                    run = Run(self._fitted_parameters(), objective=self.lower_bound_)
                else:
                    run = Run(self._initial_parameters(ctx, rng, init))
                progress.start()
                callbacks = [progress]
                if checkpoint is not None:
                    callbacks.insert(0, partial(checkpoint.save, i, rng.get_state(), best=best))
                run = run_em(ctx.step, run, self.max_iter, change_below(self.tol), lambda r: [f(r) for f in callbacks])
                progress.close(run)
                best = best_of(best, run)
        if not best.converged and self.max_iter > 0:
            warnings.warn("Best performing initialization did not converge. Try different init parameters, "
                          "or increase max_iter, tol, or check for degenerate data.", ConvergenceWarning)
        self._set_parameters(ctx.cov, best.params, data.dtype)
        self.converged_ = best.converged
        self.n_iter_ = best.n_iter
        self.lower_bound_ = best.objective if best.n_iter else -math.inf
        self.lower_bounds_ = list(best.history)
        self._keep_in(namespace)
        return self

    _PARAMETERS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")

    def _check_dispatch_init(self):
        """scikit-learn's rule under array_api_dispatch, kept for drop-in use (its own tests check it):
        only the 'random' initialisations, which fastlvm could lift but does not, so that code
        written against scikit-learn behaves the same."""
        allowed = ["random", "random_from_data"]
        if get_config()["array_api_dispatch"] and self.init_params not in allowed:
            raise NotImplementedError(
                f"Allowed `init_params` are {allowed} if 'array_api_dispatch' is enabled. You passed "
                f"init_params={self.init_params!r}, which are not implemented to work with 'array_api_dispatch' "
                f"enabled. Please disable 'array_api_dispatch' to use init_params={self.init_params!r}.")

    def _keep_in(self, namespace):
        """Under array_api_dispatch, the fitted parameters in the input's namespace and on its device."""
        if namespace:
            for name in self._PARAMETERS:
                setattr(self, name, engines.to_namespace(getattr(self, name), namespace))

    def _fitted_parameters(self):
        return MixtureParameters(*(np.asarray(a, dtype=np.float64) for a in
                                   (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_)))

    def _set_parameters(self, cov, params, dtype):
        w, m, c, P = params
        self.weights_ = w.astype(dtype)
        self.means_ = m.astype(dtype)
        self.covariances_ = c.astype(dtype)
        self.precisions_cholesky_ = P.astype(dtype)
        self.precisions_ = cov.precisions(P).astype(dtype)

    def fit_predict(self, X, y=None):
        """Fit, then label X with the fitted model (scikit-learn's final E-step)."""
        return self.fit(X, y).predict(X)

    def _initial_parameters(self, ctx, rng, init):
        """Initial parameters: the user's arrays where given; the rest from one M-step of a hard (or,
        for init_params='random', random) assignment of the rows ctx.init_data to initial centres."""
        if all(a is not None for a in init):
            w, m, P = init
            return MixtureParameters(w, m, ctx.cov.covariance_from_precision_cholesky(P), P)
        X = ctx.init_data
        K, D, cov = self.n_components, X.shape[1], ctx.cov
        resp_fn = None
        if init.means is not None:
            centres = init.means
        elif self.init_params == "kmeans":
            # rng itself, as scikit-learn passes it: the same random_state gives the same components
            centres = KMeans(K, n_init=1, random_state=rng, backend=ctx.engine.backend).fit(X).cluster_centers_
        elif self.init_params == "k-means++":
            centres = kmeans_plusplus(X, K, np.random.default_rng(rng.randint(2**31)), ctx.chunk_rows)
        elif self.init_params == "random_from_data":
            centres = random_rows(X, K, np.random.default_rng(rng.randint(2**31)))
        else:  # 'random': responsibilities drawn uniformly, normalised per row
            seed_rng = np.random.default_rng(rng.randint(2**31))
            centres = np.repeat(data_moments(ArraySource(X, trusted=True), ctx.chunk_rows)[0][None], K, axis=0)

            def resp_fn(chunk):
                r = seed_rng.uniform(size=(chunk.shape[0], K))
                return r / r.sum(axis=1, keepdims=True)

        # Hard assignment of every row to its nearest centre (unit isotropic components).
        start = MixtureParameters(np.full(K, 1.0 / K), np.asarray(centres, dtype=np.float64), None,
                                  cov.isotropic(K, D))
        w, m, c, P = ctx.m_step(ctx.statistics(start, X, hard=True, resp_fn=resp_fn))
        if init.weights is not None:
            w = init.weights
        if init.means is not None:
            m = init.means
        if init.precisions_cholesky is not None:
            P = init.precisions_cholesky
            c = cov.covariance_from_precision_cholesky(P)
        return MixtureParameters(w, m, c, P)

    # ------------------------------------------------------------------ online EM
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """One step of stepwise EM on a batch of rows (any input fit accepts).

        The first call on an unfitted model initialises from the batch (init_params) and sets the
        running statistics to the batch's; each later batch t moves them by the step size
        rho_t = (t - 1 + learning_offset) ** -learning_decay, and the parameters are the M-step of
        the running statistics. On a model fitted by fit, the first batch starts from its
        parameters. lower_bound_ is the batch's mean log-likelihood before the update and n_iter_
        the number of batches seen; prior (MAP) and checkpoint are not used here."""
        fitted = hasattr(self, "converged_")
        X, namespace = engines.on_host(X)
        engine = self._engine(X)
        data = self._data(X, reset=not fitted, min_rows=1)
        if self.prior is not None:
            raise ValueError("partial_fit does not support a prior (MAP-EM needs the size of the whole data "
                             "set); use fit, or prior=None.")
        rng = check_random_state(self.random_state)
        if fitted:
            ctx = FitContext(data, get_covariance_type(self.covariance_type), self.n_components,
                             self._chunk_rows(engine, data.n_features), self.reg_covar, engine=engine)
            params = self._fitted_parameters()
            state = getattr(self, "_online", None) or OnlineState(None)
        else:
            init = self._check_start(data)
            ctx = self._context(data, rng, engine)
            params = self._initial_parameters(ctx, rng, init)
            state = OnlineState(None)
        st = ctx.statistics(params)
        t = state.t + 1
        rho = 1.0 if state.running is None else step_size(t, self.learning_offset, self.learning_decay)
        running = stepwise_update(state.running, st, rho)
        # The M-step sees the running average at the batch's size, so its safeguards (the
        # collapse threshold in rows) mean what they mean for a batch fit.
        params = ctx.m_step(running.scaled(data.n_rows))
        self._online = OnlineState(running, t, state.history + (st.loglik / data.n_rows,))
        self._set_parameters(ctx.cov, params, data.dtype)
        self.converged_ = False
        self.n_iter_ = t
        self.lower_bound_ = self._online.history[-1]
        self.lower_bounds_ = list(self._online.history)
        self._keep_in(namespace)
        return self

    # ------------------------------------------------------------------ inference
    def _rows(self, X, what):
        """Per-row answers ('log_prob', 'label' or 'proba') chunk by chunk; a Dask array for Dask input.
        Densities are computed with float64 accumulation and returned in the input's dtype."""
        check_is_fitted(self, "precisions_cholesky_")
        host, namespace = engines.on_host(X)
        if namespace:  # computed on as NumPy, answered in the input's namespace
            return engines.to_namespace(self._rows(host, what), namespace)
        engine = self._engine(X)
        data = self._data(X, reset=False)
        cov = get_covariance_type(self.covariance_type)
        kp = kernel_parameters(cov, *(np.asarray(a, dtype=np.float64) for a in
                                      (self.weights_, self.means_, self.precisions_cholesky_)), data.dtype)
        out_dtype = np.int64 if what == "label" else data.dtype
        chunk_rows = self._chunk_rows(engine, data.n_features)
        rows = partial(rows_output, what, engine, cov, kp, chunk_rows, out_dtype)
        if isinstance(data, engines.DeviceSource):  # one pass over the device rows, answered on the device
            return engines.like_input(rows(0, data.array), data.input)
        fn = partial(_rows_as, out_dtype, rows)
        width = self.n_components if what == "proba" else None
        if hasattr(data, "map_rows"):
            return data.map_rows(fn, width, out_dtype)
        out = np.empty((data.n_rows,) if width is None else (data.n_rows, width), dtype=out_dtype)
        start = 0
        for part in data.map(fn, chunk_rows):
            out[start : start + part.shape[0]] = part
            start += part.shape[0]
        return out

    def score_samples(self, X):
        """log p(x) of every row."""
        return self._rows(X, "log_prob")

    def score(self, X, y=None):
        """Mean log-likelihood per row: the mean of score_samples(X) taken in its dtype, as a float
        (scikit-learn's, to the last digit)."""
        return float(engines.to_numpy(self.score_samples(X)).mean())

    def predict(self, X):
        """Most probable component of every row."""
        return self._rows(X, "label")

    def predict_proba(self, X):
        """Posterior probability of each component for every row (N, K)."""
        return self._rows(X, "proba")

    def sample(self, n_samples=1):
        """(X, y): n_samples draws from the fitted mixture (float64, as scikit-learn's) and their
        components."""
        check_is_fitted(self, "precisions_cholesky_")
        if not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(f"Invalid value for 'n_samples': {n_samples} . The sampling requires at least one sample.")
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, np.asarray(self.weights_, dtype=np.float64))
        cov = get_covariance_type(self.covariance_type)
        c = np.asarray(self.covariances_, dtype=np.float64)
        D = self.means_.shape[1]
        means = np.asarray(self.means_, dtype=np.float64)
        X = np.vstack([rng.multivariate_normal(means[k], cov.component_covariance(c, k, D), int(n))
                       for k, n in enumerate(counts)])
        y = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(counts)])
        namespace = engines.on_host(self.means_)[1]
        return (X, y) if namespace is None else (engines.to_namespace(X, namespace), engines.to_namespace(y, namespace))

    def _n_parameters(self):
        K, D = self.means_.shape
        return get_covariance_type(self.covariance_type).n_cov_parameters(K, D) + K * D + K - 1

    def bic(self, X):
        """Bayesian information criterion on X (lower is better)."""
        ll = engines.to_numpy(self.score_samples(X))
        return -2 * float(ll.sum(dtype=np.float64)) + self._n_parameters() * np.log(ll.shape[0])

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * float(engines.to_numpy(self.score_samples(X)).sum(dtype=np.float64)) + 2 * self._n_parameters()


def _rows_as(dtype, fn, row_offset, X):
    """fn's per-row answers in dtype (a module-level function, so Dask can ship it to its workers)."""
    return fn(row_offset, X).astype(dtype, copy=False)
