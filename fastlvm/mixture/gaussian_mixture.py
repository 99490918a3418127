"""GaussianMixture: scikit-learn's estimator API over fastlvm's fused EM kernel.

One EM iteration is one pass over the rows: the kernel turns each chunk into sufficient
statistics under the current parameters (E-step), their sum gives the new parameters in closed
form (M-step, fastlvm.mixture.em). No N x K array is allocated during a fit.
"""

import numbers
import sys
import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm._validation import check_finite, check_scalar
from fastlvm.kernels import cpu
from fastlvm.mixture.covariance import get_covariance_type
from fastlvm.mixture.em import m_step
from fastlvm.mixture.init import kmeans_plusplus, random_rows
from fastlvm.mixture.kmeans import KMeans
from fastlvm.mixture.prior import GaussianMixturePrior
from fastlvm.mixture.sources import default_chunk_rows
from fastlvm.mixture.stats import kernel_parameters, scores, statistics

_INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
_BACKENDS = ("auto", "cpu")


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
    """

    def __init__(self, n_components=1, *, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans", weights_init=None, means_init=None,
                 precisions_init=None, random_state=None, warm_start=False, verbose=0,
                 verbose_interval=10, prior=None, chunk_size=None, backend="auto"):
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

    def _validate_X(self, X, reset):
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2 if reset else 1,
                          ensure_all_finite=False, order="C", reset=reset)
        check_finite(X)
        return X

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Estimate the parameters by EM; the best of n_init initialisations is kept."""
        X = self._validate_X(X, reset=not (self.warm_start and hasattr(self, "converged_")))
        cov, w_init, m_init, P_init = self._check_params(X)
        K, (N, D) = self.n_components, X.shape
        chunk_rows = self.chunk_size or default_chunk_rows(K, D, cpu.BLOCK_ROWS)
        rng = check_random_state(self.random_state)
        self._moments = None
        prior = self._resolve_prior(X, cov, chunk_rows)
        continuing = self.warm_start and hasattr(self, "converged_")
        best = None
        for init in range(1 if continuing else self.n_init):
            if continuing:
                params = tuple(np.asarray(a, dtype=np.float64) for a in
                               (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_))
            else:
                params = self._initial_parameters(X, cov, rng, chunk_rows, prior, w_init, m_init, P_init)
            if self.verbose:
                print(f"Initialization {init}", file=sys.stderr)
            result = self._run_em(X, cov, params, prior, chunk_rows)
            if best is None or result[1] > best[1]:
                best = result
        params, lower_bound, n_iter, converged, history = best
        if not converged and self.max_iter > 0:
            warnings.warn(
                f"Best of {1 if continuing else self.n_init} initialisations did not converge in "
                f"{self.max_iter} iterations. Try a larger max_iter or tol, or check the data.",
                ConvergenceWarning,
            )
        w, m, c, P = params
        dtype = X.dtype
        self.weights_ = w.astype(dtype)
        self.means_ = m.astype(dtype)
        self.covariances_ = c.astype(dtype)
        self.precisions_cholesky_ = P.astype(dtype)
        self.precisions_ = cov.precisions(P).astype(dtype)
        self.converged_ = converged
        self.n_iter_ = n_iter
        self.lower_bound_ = float(lower_bound)
        self.lower_bounds_ = history
        del self._moments
        return self

    def fit_predict(self, X, y=None):
        """Fit, then label X with the fitted model (scikit-learn's final E-step)."""
        return self.fit(X, y).predict(X)

    def _run_em(self, X, cov, params, prior, chunk_rows):
        lower_bound = -np.inf
        history = []
        converged = False
        n_iter = 0
        t_start = time.perf_counter()
        for n_iter in range(1, self.max_iter + 1):
            t0 = time.perf_counter()
            previous = lower_bound
            params, lower_bound = self._em_step(X, cov, params, prior, chunk_rows)
            history.append(lower_bound)
            change = lower_bound - previous
            self._report(n_iter, lower_bound, change, time.perf_counter() - t0, time.perf_counter() - t_start)
            if abs(change) < self.tol:
                converged = True
                break
        if self.verbose >= 2:
            print(file=sys.stderr)
        if self.verbose:
            state = "converged" if converged else "did not converge"
            print(f"Initialization {state}. lower bound {lower_bound:.6f}", file=sys.stderr)
        return params, lower_bound, n_iter, converged, history

    def _report(self, n_iter, lower_bound, change, dt, elapsed):
        if self.verbose >= 2:
            done = int(30 * n_iter / self.max_iter)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {n_iter}/{self.max_iter} "
                  f"lower bound {lower_bound:.6f} ({elapsed:.2f} s)", end="", file=sys.stderr, flush=True)
        elif self.verbose == 1 and n_iter % self.verbose_interval == 0:
            print(f"  Iteration {n_iter}: lower bound {lower_bound:.6f}, change {change:.3g}, "
                  f"{dt:.3f} s", file=sys.stderr)

    def _em_step(self, X, cov, params, prior, chunk_rows):
        """One E-step pass to statistics, then the M-step. Returns (new params, objective per row
        under the old params)."""
        w, m, c, P = params
        K, N = self.n_components, X.shape[0]
        st = statistics(X, cov, kernel_parameters(cov, w, m, P, X.dtype), chunk_rows, n_worst=K)
        objective = st.loglik
        if prior is not None:
            objective += prior.log_density(cov, w, m, c)
        return self._new_parameters(X, cov, st, prior, chunk_rows), objective / N

    def _new_parameters(self, X, cov, st, prior, chunk_rows):
        """M-step, then re-seed any component that collapsed."""
        w, m, c, collapsed = m_step(st, cov, self.reg_covar, prior)
        P, bad = cov.precision_cholesky(c)
        collapsed = sorted(set(collapsed) | set(bad))
        if collapsed:
            w, m, c, P = self._reseed(X, cov, collapsed, st.worst, (w, m, c, P), chunk_rows)
        return w, m, c, P

    def _reseed(self, X, cov, collapsed, worst, params, chunk_rows):
        w, m, c, P = (a.copy() for a in params)
        K, D = m.shape
        warnings.warn(f"Component(s) {collapsed} collapsed (too little weight or a covariance that is "
                      "not positive definite); re-seeded on the worst-explained rows.",
                      CollapsedComponentWarning)
        if cov.name == "tied":
            if not np.all(np.isfinite(c)) or cov.precision_cholesky(c)[1]:
                c = self._data_moments(X, chunk_rows)[1] + self.reg_covar * np.eye(D)
        else:
            healthy = [k for k in range(K) if k not in collapsed]
            if healthy:  # an average of positive definite covariances is positive definite
                replacement = np.mean(c[healthy], axis=0)
            else:
                replacement = cov.from_full(self._data_moments(X, chunk_rows)[1] + self.reg_covar * np.eye(D))
            c[collapsed] = replacement
        rows = [row for _, row in worst] or [0]
        for j, k in enumerate(collapsed):
            m[k] = X[rows[j % len(rows)]]
            w[k] = 1.0 / K
        w = w / w.sum()
        P, bad = cov.precision_cholesky(c)
        if bad:
            raise FloatingPointError(f"re-seeded covariance of component(s) {bad} is not positive definite; "
                                     "increase reg_covar")
        return w, m, c, P

    def _data_moments(self, X, chunk_rows):
        """(mean, biased covariance) of the data by one pass of the one-component full kernel."""
        if self._moments is None:
            full = get_covariance_type("full")
            shift = np.asarray(X[:1], dtype=np.float64)
            kp = kernel_parameters(full, np.ones(1), shift, np.eye(X.shape[1])[None], X.dtype)
            st = statistics(X, full, kp, chunk_rows, hard=True)
            N = float(X.shape[0])
            delta = st.s[0] / N
            self._moments = (st.shift[0] + delta, full.scatter(st.second, np.array([N]), delta[None])[0] / N)
        return self._moments

    def _resolve_prior(self, X, cov, chunk_rows):
        if self.prior is None:
            return None
        prior = self.prior if isinstance(self.prior, GaussianMixturePrior) else GaussianMixturePrior(**self.prior)
        mean, data_cov = self._data_moments(X, chunk_rows)
        return prior.resolve(cov, mean, data_cov, self.n_components)

    def _initial_parameters(self, X, cov, rng, chunk_rows, prior, w_init, m_init, P_init):
        K, D = self.n_components, X.shape[1]
        if w_init is not None and m_init is not None and P_init is not None:
            return w_init, m_init, cov.covariance_from_precision_cholesky(P_init), P_init
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
            centres = np.repeat(self._data_moments(X, chunk_rows)[0][None], K, axis=0)

            def resp_fn(chunk):
                r = seed_rng.uniform(size=(chunk.shape[0], K))
                return r / r.sum(axis=1, keepdims=True)

        centres = np.asarray(centres, dtype=np.float64)
        # Hard assignment of every row to its nearest centre (unit isotropic components).
        kp = kernel_parameters(cov, np.full(K, 1.0 / K), centres, cov.isotropic(K, D), X.dtype)
        st = statistics(X, cov, kp, chunk_rows, hard=True, n_worst=K, resp_fn=resp_fn)
        w, m, c, P = self._new_parameters(X, cov, st, prior, chunk_rows)
        if w_init is not None:
            w = w_init
        if m_init is not None:
            m = m_init
        if P_init is not None:
            P = P_init
            c = cov.covariance_from_precision_cholesky(P)
        return w, m, c, P

    # ------------------------------------------------------------------ inference
    def _fitted_scores(self, X, want_log_prob=False):
        check_is_fitted(self, "precisions_cholesky_")
        X = self._validate_X(X, reset=False)
        cov = get_covariance_type(self.covariance_type)
        kp = kernel_parameters(cov, *(np.asarray(a, dtype=np.float64) for a in
                                      (self.weights_, self.means_, self.precisions_cholesky_)), X.dtype)
        chunk_rows = self.chunk_size or default_chunk_rows(self.n_components, X.shape[1], cpu.BLOCK_ROWS)
        return scores(X, cov, kp, chunk_rows, want_log_prob=want_log_prob)

    def score_samples(self, X):
        """log p(x) of every row."""
        return self._fitted_scores(X)[0]

    def score(self, X, y=None):
        """Mean log-likelihood per row."""
        return float(self.score_samples(X).mean())

    def predict(self, X):
        """Most probable component of every row."""
        return self._fitted_scores(X)[1]

    def predict_proba(self, X):
        """Posterior probability of each component for every row (N, K)."""
        ll, _, logp = self._fitted_scores(X, want_log_prob=True)
        return np.exp(logp - ll[:, None])

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
        return -2 * ll.sum() + self._n_parameters() * np.log(ll.shape[0])

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * self.score_samples(X).sum() + 2 * self._n_parameters()
