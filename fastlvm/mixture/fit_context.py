"""One fit of a Gaussian mixture to one data source: the E-step to statistics, the M-step with
re-seeding of collapsed components, and what they share (the data's moments, the resolved prior,
the rows to initialise on). A context lives for one call of fit or partial_fit, so nothing it
caches outlives that call, failed or not.
"""

import warnings
from functools import cached_property, partial
from typing import NamedTuple

import numpy as np

from fastlvm.data.sources import ArraySource
from fastlvm.engine import to_host
from fastlvm.mixture.em import m_step
from fastlvm.mixture.stats import CPU, kernel_parameters, statistics

# scikit-learn's wording, which libraries and tests match on.
ILL_DEFINED_COVARIANCE = (
    "Fitting the mixture model failed because some components have ill-defined empirical covariance "
    "(for instance caused by singleton or collapsed samples). Try to decrease the number of components, "
    "increase reg_covar, or scale the input data."
)
_FLOAT32_ADVICE = " The numerical accuracy can also be improved by passing float64 data instead of float32."


class CollapsedComponentWarning(UserWarning):
    """A component lost (almost) all its weight or its covariance stopped being positive
    definite; it was re-seeded on the worst-explained rows and the fit went on."""


class MixtureParameters(NamedTuple):
    """A mixture's parameters, float64, in scikit-learn's shapes for the covariance type."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray


def _shifted_sums(shift, offset, chunk):
    """(rows, sum of y, sum of y y^T) of a chunk's rows y = x - shift, in float64."""
    y = to_host(chunk) - shift  # float64, as shift is
    return y.shape[0], y.sum(axis=0), y.T @ y


def data_moments(data, chunk_rows):
    """(mean, biased covariance) of a data source in one pass, with moments taken about the first
    row against cancellation. Plain NumPy: it compiles nothing, so a fit compiles only the kernels
    of its own covariance type."""
    shift = np.asarray(data.head()[0], dtype=np.float64)
    n, s, second = (sum(part) for part in zip(*data.map(partial(_shifted_sums, shift), chunk_rows)))
    delta = s / n
    return shift + delta, second / n - np.outer(delta, delta)


class FitContext:
    """data: a Source; cov: a covariance type object; prior: None or a GaussianMixturePrior,
    resolved here against the data's moments; init_rows: sorted indices of the rows to initialise
    on, or None for every row; engine: the kernels (fastlvm.engine)."""

    def __init__(self, data, cov, n_components, chunk_rows, reg_covar, prior=None, init_rows=None, engine=CPU):
        self.engine = engine
        self.data = data
        self.cov = cov
        self.n_components = n_components
        self.chunk_rows = chunk_rows
        self.reg_covar = reg_covar
        self.init_rows = init_rows
        self.prior = None if prior is None else prior.resolve(cov, *self.moments, n_components)

    @cached_property
    def moments(self):
        """(mean, biased covariance) of the data: one pass, taken only when needed."""
        return data_moments(self.data, self.chunk_rows)

    @cached_property
    def init_data(self):
        """The rows to initialise on, as an in-memory array (read when first needed)."""
        data, rows = self.data, self.init_rows
        if rows is None:
            if isinstance(data, ArraySource) and data.trusted:
                return data.array
            rows = np.arange(data.n_rows)
        return data.take(rows, self.chunk_rows)

    # ---------------------------------------------------------------- E-step and M-step
    def statistics(self, params, X=None, hard=False, resp_fn=None):
        """Sufficient statistics of X (default: the data) under params, with the K worst-explained
        rows kept as candidates for re-seeding."""
        w, m, _, P = params
        kp = kernel_parameters(self.cov, w, m, P, self.data.dtype)
        return statistics(self.data if X is None else X, self.cov, kp, self.chunk_rows, hard=hard,
                          n_worst=self.n_components, resp_fn=resp_fn, engine=self.engine)

    def step(self, params):
        """One EM iteration: (new parameters, objective per row of the old ones), the objective being
        the mean log-likelihood, plus the log prior density for MAP-EM."""
        st = self.statistics(params)
        objective = st.loglik
        if self.prior is not None:
            objective += self.prior.log_density(self.cov, params.weights, params.means, params.covariances)
        return self.m_step(st), objective / self.data.n_rows

    def m_step(self, st):
        """Parameters from statistics, then re-seed any component that collapsed."""
        w, m, c, collapsed = m_step(st, self.cov, self.reg_covar, self.prior)
        P, not_pd = self.cov.precision_cholesky(c)
        collapsed = sorted(set(collapsed) | set(not_pd))
        params = MixtureParameters(w, m, c, P)
        return self._reseed(collapsed, not_pd, st, params) if collapsed else params

    def _reseed(self, collapsed, not_pd, st, params):
        """Collapsed components move onto the rows the statistics explained worst, with a positive
        definite covariance borrowed from the healthy components (tied: the data's).

        A covariance that is not positive definite means too little spread for reg_covar; re-seeding
        cannot mend it when there is no healthy component to borrow from, when the data's own
        covariance is not positive definite either, or when there are fewer distinct rows to move
        onto than collapsed components (identical components stay identical under EM). Then the
        data cannot support this many components at this reg_covar: ValueError, as scikit-learn."""
        cov = self.cov
        w, m, c, _ = (a.copy() for a in params)
        K, D = m.shape
        c = cov.borrowed_covariances(c, collapsed, lambda: self.moments[1] + self.reg_covar * np.eye(D))
        if c is None:
            self._ill_defined()
        P, bad = cov.precision_cholesky(c)
        rows = [st.worst_x[row] for _, row in st.worst] or [self.data.head()[0]]
        if bad or not_pd and len(np.unique(np.asarray(rows), axis=0)) < len(collapsed):
            self._ill_defined()
        warnings.warn(f"Component(s) {[int(k) for k in collapsed]} collapsed (too little weight or a covariance "
                      "that is not positive definite); re-seeded on the worst-explained rows.",
                      CollapsedComponentWarning, stacklevel=2)
        for j, k in enumerate(collapsed):
            m[k] = rows[j % len(rows)]
            w[k] = 1.0 / K
        return MixtureParameters(w / w.sum(), m, c, P)

    def _ill_defined(self):
        advice = _FLOAT32_ADVICE if self.data.dtype == np.float32 else ""
        raise ValueError(ILL_DEFINED_COVARIANCE + advice)
