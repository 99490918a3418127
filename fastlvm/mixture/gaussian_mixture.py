"""GaussianMixture: scikit-learn's estimator API over fastlvm's fused EM kernel.

One EM iteration is one pass over the rows: the kernel turns each chunk into sufficient
statistics under the current parameters (E-step), their sum gives the new parameters in closed
form (M-step, fastlvm.mixture.em). No N x K array is allocated during a fit. The rows come from a
data source (fastlvm.data): an in-memory array, anything sliceable by rows (memmap,
HDF5, Zarr), a callable yielding chunks, or a Dask array whose blocks are processed by workers.
"""

import numbers
import os
import sys
import time
import warnings
from functools import cache, partial

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm._validation import check_finite, check_scalar
from fastlvm.kernels import cpu
from fastlvm.mixture.checkpoint import Checkpoint
from fastlvm.mixture.covariance import get_covariance_type
from fastlvm.mixture.em import m_step
from fastlvm.mixture.init import kmeans_plusplus, random_rows
from fastlvm.mixture.kmeans import KMeans
from fastlvm.mixture.online import step_size, stepwise_update
from fastlvm.mixture.prior import GaussianMixturePrior
from fastlvm.data.sources import ArraySource, as_source
from fastlvm.mixture.stats import default_chunk_rows, kernel_parameters, rows_output, statistics

# Rows used to initialise from data that is not an in-memory array (a uniform random sample).
DEFAULT_INIT_SIZE = 100_000

_INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
_BACKENDS = ("auto", "cpu")


def data_moments(data, chunk_rows):
    """(mean, biased covariance) of a data source by one pass of the one-component full kernel,
    with moments taken about the first row against cancellation."""
    full = get_covariance_type("full")
    shift = np.asarray(data.head(), dtype=np.float64)
    kp = kernel_parameters(full, np.ones(1), shift, np.eye(data.n_features)[None], data.dtype)
    st = statistics(data, full, kp, chunk_rows, hard=True)
    N = float(data.n_rows)
    delta = st.s[0] / N
    return st.shift[0] + delta, full.scatter(st.second, np.array([N]), delta[None])[0] / N


class CollapsedComponentWarning(UserWarning):
    """A component lost (almost) all its weight or its covariance stopped being positive
    definite; it was re-seeded on the worst-explained rows and the fit went on."""


class GaussianMixture(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by EM (maximum likelihood, or MAP with a conjugate prior).

    Same constructor, methods and fitted attributes as scikit-learn's GaussianMixture, plus:
    prior (None for maximum likelihood; a fastlvm.GaussianMixturePrior or a dict of its fields
    for MAP-EM, in which case lower_bound_ is the log-posterior per row), chunk_size (rows per
    kernel call; None picks one that keeps working memory flat) and backend ('auto' or 'cpu').
    Float32 input is fitted in float32 arithmetic with float64 statistics and gives float32
    parameters. A collapsed component is re-seeded with a CollapsedComponentWarning instead of
    raising. lower_bounds_ holds the objective of every iteration of the best initialisation.

    Data larger than memory: X may be anything sliceable by rows (np.memmap, h5py/Zarr datasets),
    a callable returning a fresh iterable of 2-D arrays on every call, or a dask.array (each
    block's statistics computed on the Dask workers); it is read chunk by chunk, validated as it is
    read. init_size: rows used to initialise; None means every row of an in-memory array and a
    uniform random sample of at most 100,000 rows of any other input. checkpoint: a path; after
    every iteration the fit's state is written there atomically (.npz, no pickle), and a later
    fit with the same path resumes from it (delete the file to start afresh). partial_fit runs
    stepwise EM with step size (t - 1 + learning_offset) ** -learning_decay.
    """

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

    # ------------------------------------------------------------------ checks
    def _check_params(self, X):
        check_scalar(self.n_components, "n_components", kind=numbers.Integral, low=1)
        cov = get_covariance_type(self.covariance_type)
        check_scalar(self.tol, "tol", low=0)
        check_scalar(self.reg_covar, "reg_covar", low=0)
        check_scalar(self.max_iter, "max_iter", kind=numbers.Integral, low=1)
        check_scalar(self.n_init, "n_init", kind=numbers.Integral, low=1)
        check_scalar(self.verbose_interval, "verbose_interval", kind=numbers.Integral, low=1)
        if self.init_params not in _INIT_PARAMS:
            raise ValueError(f"init_params must be one of {_INIT_PARAMS}, got {self.init_params!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None:
            check_scalar(self.chunk_size, "chunk_size", kind=numbers.Integral, low=1)
        if self.prior is not None and not isinstance(self.prior, (GaussianMixturePrior, dict)):
            raise TypeError("prior must be None, a fastlvm.GaussianMixturePrior or a dict of its "
                            f"fields, got {type(self.prior).__name__}")
        N, D = X.shape
        K = self.n_components
        if N < K:
            raise ValueError(f"Expected n_samples >= n_components but got n_components = {K}, n_samples = {N}")
        w = m = P = None
        if self.weights_init is not None:
            w = np.array(self.weights_init, dtype=np.float64)
            if w.shape != (K,):
                raise ValueError(f"weights_init must have shape ({K},), got {w.shape}")
            if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w > 1):
                raise ValueError("weights_init must be finite and in [0, 1]")
            if not np.allclose(w.sum(), 1.0, rtol=0, atol=1e-6):
                raise ValueError(f"weights_init must sum to 1, got sum {w.sum():.6g}")
        if self.means_init is not None:
            m = np.array(self.means_init, dtype=np.float64)
            if m.shape != (K, D):
                raise ValueError(f"means_init must have shape ({K}, {D}), got {m.shape}")
            if not np.all(np.isfinite(m)):
                raise ValueError("means_init contains NaN or infinity")
        if self.precisions_init is not None:
            prec = np.array(self.precisions_init, dtype=np.float64)
            if prec.shape != cov.shape(K, D):
                raise ValueError(f"precisions_init must have shape {cov.shape(K, D)} for covariance_type="
                                 f"{cov.name!r}, got {prec.shape}")
            if not np.all(np.isfinite(prec)):
                raise ValueError("precisions_init contains NaN or infinity")
            if cov.name in ("full", "tied") and not np.allclose(prec, np.swapaxes(prec, -1, -2), atol=1e-8):
                raise ValueError("precisions_init must be symmetric")
            # The precision's own Cholesky factor exists iff it is positive definite.
            P_of_precision, bad = cov.precision_cholesky(prec)
            if bad:
                raise ValueError(f"precisions_init is not positive definite (component(s) {bad})")
            P = self._prec_chol_from_precisions(cov, prec)
        return cov, w, m, P

    @staticmethod
    def _prec_chol_from_precisions(cov, prec):
        """Upper-triangular P with P P^T = precision (the kernels read the upper triangle):
        the lower Cholesky factor of the index-reversed matrix, reversed back."""
        if cov.name in ("full", "tied"):
            return np.linalg.cholesky(prec[..., ::-1, ::-1])[..., ::-1, ::-1].copy()
        return np.sqrt(prec)

    def _check_scale_params(self, K):
        """The parameters of this issue's features (out-of-core, checkpoints, online EM)."""
        if self.init_size is not None:
            check_scalar(self.init_size, "init_size", kind=numbers.Integral, low=K)
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be None, a str or an os.PathLike, got {type(self.checkpoint).__name__}")
        check_scalar(self.learning_offset, "learning_offset", low=0)
        check_scalar(self.learning_decay, "learning_decay", low=0.5, low_inclusive=False, high=1)

    def _data(self, X, reset, min_rows=1):
        """X as a data source. In-memory data is validated whole (scikit-learn's validate_data);
        out-of-core data, chunk sources and Dask arrays chunk by chunk as they are read."""
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

    def _chunk_rows(self, D):
        return self.chunk_size or default_chunk_rows(self.n_components, D, cpu.BLOCK_ROWS)

    def _init_rows(self, data, rng):
        """Sorted indices of the rows to initialise on, or None for every row. Out-of-core data
        (and any data when init_size is set) is initialised on a uniform random sample."""
        size = self.init_size
        if size is None:
            size = np.inf if isinstance(data, ArraySource) and data.trusted else DEFAULT_INIT_SIZE
        if data.n_rows <= size:
            return None
        # Generator.choice draws a small sample without a permutation of all N rows (Floyd's algorithm).
        return np.sort(np.random.default_rng(rng.randint(2**31)).choice(data.n_rows, size, replace=False,
                                                                        shuffle=False))

    @staticmethod
    def _init_data(data, rows, chunk_rows):
        """The rows to initialise on, as an in-memory array."""
        if rows is None:
            if isinstance(data, ArraySource) and data.trusted:
                return data.array
            rows = np.arange(data.n_rows)
        return data.take(rows, chunk_rows)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Estimate the parameters by EM; the best of n_init initialisations is kept.

        X: array-like (N, D), np.memmap, h5py/Zarr dataset, dask.array, or a callable returning a
        fresh iterable of (rows, D) arrays on every call."""
        continuing = self.warm_start and hasattr(self, "converged_")
        data = self._data(X, reset=not continuing, min_rows=2)
        cov, w_init, m_init, P_init = self._check_params(data)
        K, (N, D) = self.n_components, data.shape
        self._check_scale_params(K)
        chunk_rows = self._chunk_rows(D)
        rng = check_random_state(self.random_state)
        self._moments = None
        self._online = None
        prior = self._resolve_prior(data, cov, chunk_rows)
        init_rows = self._init_rows(data, rng)
        n_inits = 1 if continuing else self.n_init
        checkpoint, resumed = None, None
        if self.checkpoint is not None:
            checkpoint = Checkpoint(self.checkpoint, n_components=K, n_features=D, covariance_type=cov.name,
                                    dtype=str(data.dtype), n_samples=N, n_init=n_inits)
            resumed = checkpoint.load()
        best, first = (resumed[3], resumed[0]) if resumed is not None else (None, 0)
        init_data = cache(lambda: self._init_data(data, init_rows, chunk_rows))  # read when first needed
        for init in range(first, n_inits):
            if resumed is not None and init == resumed[0]:
                rng.set_state(resumed[1])
                run = resumed[2]
            else:
                if continuing:
                    params = tuple(np.asarray(a, dtype=np.float64) for a in
                                   (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_))
                else:
                    params = self._initial_parameters(init_data, data, cov, rng, chunk_rows, prior,
                                                      w_init, m_init, P_init)
                run = (params, -np.inf, 0, False, [])
            if self.verbose:
                print(f"Initialization {init}", file=sys.stderr)
            save = None
            if checkpoint is not None:
                save = partial(checkpoint.save, init, rng.get_state(), best=best)
            result = self._run_em(data, cov, run, prior, chunk_rows, save)
            if best is None or result[1] > best[1]:
                best = result
        params, lower_bound, n_iter, converged, history = best
        if not converged and self.max_iter > 0:
            warnings.warn(
                f"Best of {n_inits} initialisations did not converge in "
                f"{self.max_iter} iterations. Try a larger max_iter or tol, or check the data.",
                ConvergenceWarning,
            )
        self._set_parameters(cov, params, data.dtype)
        self.converged_ = converged
        self.n_iter_ = n_iter
        self.lower_bound_ = float(lower_bound)
        self.lower_bounds_ = history
        del self._moments
        return self

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

    def _run_em(self, data, cov, run, prior, chunk_rows, save=None):
        """EM from run = (params, lower_bound, n_iter, converged, history) until convergence or
        max_iter; save(run) is called after every iteration."""
        params, lower_bound, n_iter, converged, history = run
        history = list(history)
        t_start = time.perf_counter()
        while not converged and n_iter < self.max_iter:
            n_iter += 1
            t0 = time.perf_counter()
            previous = lower_bound
            params, lower_bound = self._em_step(data, cov, params, prior, chunk_rows)
            history.append(lower_bound)
            change = lower_bound - previous
            converged = abs(change) < self.tol
            dt = time.perf_counter() - t0
            if save is not None:
                save((params, lower_bound, n_iter, converged, history))
            self._report(n_iter, lower_bound, change, dt, time.perf_counter() - t_start, data.n_rows)
        if self.verbose >= 2:
            print(file=sys.stderr)
        if self.verbose:
            state = "converged" if converged else "did not converge"
            print(f"Initialization {state}. lower bound {lower_bound:.6f}", file=sys.stderr)
        return params, lower_bound, n_iter, converged, history

    def _report(self, n_iter, lower_bound, change, dt, elapsed, n_rows):
        rate = n_rows / max(dt, 1e-9)
        if self.verbose >= 2:
            done = int(30 * n_iter / self.max_iter)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {n_iter}/{self.max_iter} "
                  f"lower bound {lower_bound:.6f} ({elapsed:.2f} s, {rate:,.0f} rows/s)", end="", file=sys.stderr,
                  flush=True)
        elif self.verbose == 1 and n_iter % self.verbose_interval == 0:
            print(f"  Iteration {n_iter}: lower bound {lower_bound:.6f}, change {change:.3g}, "
                  f"{dt:.3f} s, {rate:,.0f} rows/s", file=sys.stderr)

    def _em_step(self, data, cov, params, prior, chunk_rows):
        """One E-step pass to statistics, then the M-step. Returns (new params, objective per row
        under the old params)."""
        w, m, c, P = params
        K, N = self.n_components, data.n_rows
        st = statistics(data, cov, kernel_parameters(cov, w, m, P, data.dtype), chunk_rows, n_worst=K)
        objective = st.loglik
        if prior is not None:
            objective += prior.log_density(cov, w, m, c)
        return self._new_parameters(data, cov, st, prior, chunk_rows), objective / N

    def _new_parameters(self, data, cov, st, prior, chunk_rows):
        """M-step, then re-seed any component that collapsed."""
        w, m, c, collapsed = m_step(st, cov, self.reg_covar, prior)
        P, bad = cov.precision_cholesky(c)
        collapsed = sorted(set(collapsed) | set(bad))
        if collapsed:
            w, m, c, P = self._reseed(data, cov, collapsed, st, (w, m, c, P), chunk_rows)
        return w, m, c, P

    def _reseed(self, data, cov, collapsed, st, params, chunk_rows):
        """Collapsed components move onto the rows the statistics explained worst."""
        w, m, c, P = (a.copy() for a in params)
        K, D = m.shape
        warnings.warn(f"Component(s) {collapsed} collapsed (too little weight or a covariance that is "
                      "not positive definite); re-seeded on the worst-explained rows.",
                      CollapsedComponentWarning)
        if cov.name == "tied":
            if not np.all(np.isfinite(c)) or cov.precision_cholesky(c)[1]:
                c = self._data_moments(data, chunk_rows)[1] + self.reg_covar * np.eye(D)
        else:
            healthy = [k for k in range(K) if k not in collapsed]
            if healthy:  # an average of positive definite covariances is positive definite
                replacement = np.mean(c[healthy], axis=0)
            else:
                replacement = cov.from_full(self._data_moments(data, chunk_rows)[1] + self.reg_covar * np.eye(D))
            c[collapsed] = replacement
        rows = [st.worst_x[row] for _, row in st.worst] or [data.head()[0]]
        for j, k in enumerate(collapsed):
            m[k] = rows[j % len(rows)]
            w[k] = 1.0 / K
        w = w / w.sum()
        P, bad = cov.precision_cholesky(c)
        if bad:
            raise FloatingPointError(f"re-seeded covariance of component(s) {bad} is not positive definite; "
                                     "increase reg_covar")
        return w, m, c, P

    def _data_moments(self, data, chunk_rows):
        """(mean, biased covariance) of the data (cached for the fit's data source)."""
        if self._moments is None or self._moments[0] is not data:
            self._moments = (data, data_moments(data, chunk_rows))
        return self._moments[1]

    def _resolve_prior(self, data, cov, chunk_rows):
        if self.prior is None:
            return None
        prior = self.prior if isinstance(self.prior, GaussianMixturePrior) else GaussianMixturePrior(**self.prior)
        mean, data_cov = self._data_moments(data, chunk_rows)
        return prior.resolve(cov, mean, data_cov, self.n_components)

    def _initial_parameters(self, init_data, data, cov, rng, chunk_rows, prior, w_init, m_init, P_init):
        """Initial parameters from the in-memory rows init_data() returns (all the data, or a sample)."""
        if w_init is not None and m_init is not None and P_init is not None:
            return w_init, m_init, cov.covariance_from_precision_cholesky(P_init), P_init
        X = init_data()
        K, D = self.n_components, X.shape[1]
        seed_rng = np.random.default_rng(rng.randint(2**31))
        resp_fn = None
        if m_init is not None:
            centres = m_init
        elif self.init_params == "kmeans":
            centres = KMeans(K, n_init=1, random_state=rng.randint(2**31)).fit(X).cluster_centers_
        elif self.init_params == "k-means++":
            centres = kmeans_plusplus(X, K, seed_rng, chunk_rows)
        elif self.init_params == "random_from_data":
            centres = random_rows(X, K, seed_rng)
        else:  # 'random': responsibilities drawn uniformly, normalised per row
            centres = np.repeat(data_moments(ArraySource(X, trusted=True), chunk_rows)[0][None], K, axis=0)

            def resp_fn(chunk):
                r = seed_rng.uniform(size=(chunk.shape[0], K))
                return r / r.sum(axis=1, keepdims=True)

        centres = np.asarray(centres, dtype=np.float64)
        # Hard assignment of every row to its nearest centre (unit isotropic components).
        kp = kernel_parameters(cov, np.full(K, 1.0 / K), centres, cov.isotropic(K, D), X.dtype)
        st = statistics(X, cov, kp, chunk_rows, hard=True, n_worst=K, resp_fn=resp_fn)
        w, m, c, P = self._new_parameters(data, cov, st, prior, chunk_rows)
        if w_init is not None:
            w = w_init
        if m_init is not None:
            m = m_init
        if P_init is not None:
            P = P_init
            c = cov.covariance_from_precision_cholesky(P)
        return w, m, c, P

    # ------------------------------------------------------------------ online EM
    def partial_fit(self, X, y=None):
        """One step of stepwise EM on a batch of rows (any input fit accepts).

        The first call on an unfitted model initialises from the batch (init_params) and sets the
        running statistics to the batch's; each later batch t moves them by the step size
        rho_t = (t - 1 + learning_offset) ** -learning_decay, and the parameters are the M-step of
        the running statistics. On a model fitted by fit, the first batch starts from its
        parameters. lower_bound_ is the batch's mean log-likelihood before the update and n_iter_
        the number of batches seen; prior (MAP) and checkpoint are not used here."""
        fitted = hasattr(self, "converged_")
        data = self._data(X, reset=not fitted, min_rows=1)
        if self.prior is not None:
            raise ValueError("partial_fit does not support a prior (MAP-EM needs the size of the whole data "
                             "set); use fit, or prior=None.")
        K, D = self.n_components, data.n_features
        chunk_rows = self._chunk_rows(D)
        self._moments = None
        if not fitted:
            cov, w_init, m_init, P_init = self._check_params(data)
            self._check_scale_params(K)
            rng = check_random_state(self.random_state)
            rows = self._init_rows(data, rng)
            params = self._initial_parameters(lambda: self._init_data(data, rows, chunk_rows), data, cov, rng,
                                              chunk_rows, None, w_init, m_init, P_init)
            self._online = None
        else:
            cov = get_covariance_type(self.covariance_type)
            self._check_scale_params(K)
            params = tuple(np.asarray(a, dtype=np.float64) for a in
                           (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_))
        running, t, history = getattr(self, "_online", None) or (None, 0, [])
        w, m, c, P = params
        st = statistics(data, cov, kernel_parameters(cov, w, m, P, data.dtype), chunk_rows, n_worst=K)
        t += 1
        running = stepwise_update(running, st, 1.0 if running is None else
                                  step_size(t, self.learning_offset, self.learning_decay))
        # The M-step sees the running average at the batch's size, so its safeguards (the
        # collapse threshold in rows) mean what they mean for a batch fit.
        params = self._new_parameters(data, cov, running.scaled(data.n_rows), None, chunk_rows)
        history = history + [st.loglik / data.n_rows]
        self._online = (running, t, history)
        del self._moments
        self._set_parameters(cov, params, data.dtype)
        self.converged_ = False
        self.n_iter_ = t
        self.lower_bound_ = history[-1]
        self.lower_bounds_ = history
        return self

    # ------------------------------------------------------------------ inference
    def _rows(self, X, what):
        """Per-row answers ('log_prob', 'label' or 'proba') chunk by chunk; a Dask array for Dask input."""
        check_is_fitted(self, "precisions_cholesky_")
        data = self._data(X, reset=False)
        cov = get_covariance_type(self.covariance_type)
        kp = kernel_parameters(cov, *(np.asarray(a, dtype=np.float64) for a in
                                      (self.weights_, self.means_, self.precisions_cholesky_)), data.dtype)
        fn = partial(rows_output, what, cov, kp, self._chunk_rows(data.n_features))
        width = self.n_components if what == "proba" else None
        out_dtype = np.int64 if what == "label" else np.float64
        if hasattr(data, "map_rows"):
            return data.map_rows(fn, width, out_dtype)
        out = np.empty((data.n_rows,) if width is None else (data.n_rows, width), dtype=out_dtype)
        start = 0
        for part in data.map(fn, self._chunk_rows(data.n_features)):
            out[start : start + part.shape[0]] = part
            start += part.shape[0]
        return out

    def score_samples(self, X):
        """log p(x) of every row."""
        return self._rows(X, "log_prob")

    def score(self, X, y=None):
        """Mean log-likelihood per row."""
        return float(self.score_samples(X).mean())

    def predict(self, X):
        """Most probable component of every row."""
        return self._rows(X, "label")

    def predict_proba(self, X):
        """Posterior probability of each component for every row (N, K)."""
        return self._rows(X, "proba")

    def sample(self, n_samples=1):
        """(X, y): n_samples draws from the fitted mixture and their components."""
        check_is_fitted(self, "precisions_cholesky_")
        check_scalar(n_samples, "n_samples", kind=numbers.Integral, low=1)
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, np.asarray(self.weights_, dtype=np.float64))
        cov = get_covariance_type(self.covariance_type)
        c = np.asarray(self.covariances_, dtype=np.float64)
        D = self.means_.shape[1]
        X = np.vstack([rng.multivariate_normal(self.means_[k], cov.component_covariance(c, k, D), int(n))
                       for k, n in enumerate(counts)])
        y = np.concatenate([np.full(n, k, dtype=int) for k, n in enumerate(counts)])
        return X.astype(self.means_.dtype), y

    def _n_parameters(self):
        K, D = self.means_.shape
        return get_covariance_type(self.covariance_type).n_cov_parameters(K, D) + K * D + K - 1

    def bic(self, X):
        """Bayesian information criterion on X (lower is better)."""
        ll = self.score_samples(X)
        return -2 * float(ll.sum()) + self._n_parameters() * np.log(ll.shape[0])

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * float(self.score_samples(X).sum()) + 2 * self._n_parameters()
