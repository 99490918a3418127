"""The EM driver and the M-step.

A fit is: data source -> initial parameters -> repeat (statistics -> M-step). `run_em` is the
"repeat": it knows nothing of Gaussians. It calls `step(params)`, which returns the new parameters
and the objective of the old ones (one pass over the data: E-step to statistics, then M-step), and
stops at convergence or after max_iter steps. Its state is a `Run`, the named record that
checkpoints save and restarts compare. `best_of` keeps the best of several initialisations.

Any alternating optimisation of this shape plugs in: K-means is `step` = hard assignment and
centre update with objective -inertia (higher is better), and `converged` = its centre-shift rule.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np

# scikit-learn adds this to every n_k so an empty component divides by a tiny number, not zero.
_NK_FLOOR = 10 * np.finfo(np.float64).eps
# A component with less than this effective row count is treated as collapsed and re-seeded.
COLLAPSE_WEIGHT = 1e-3


@dataclass(frozen=True)
class Run:
    """One initialisation's EM run so far. objective: the value (higher is better; the mean
    log-likelihood or log-posterior per row for a mixture) of the parameters before the last
    step; history: the objective of every step of this run."""

    params: tuple
    objective: float = -math.inf
    n_iter: int = 0
    converged: bool = False
    history: tuple = field(default=())


def change_below(tol):
    """scikit-learn's stopping rule: the objective changed by less than tol in the last step."""
    return lambda previous, current: abs(current.objective - previous.objective) < tol


def run_em(step, run, max_iter, converged, on_step=None):
    """Steps from `run` until converged(previous run, new run) or max_iter steps in all.
    step(params) -> (new params, objective of params); on_step(run) after every step."""
    while not run.converged and run.n_iter < max_iter:
        params, objective = step(run.params)
        new = Run(params, float(objective), run.n_iter + 1, False, run.history + (float(objective),))
        run = replace(new, converged=bool(converged(run, new)))
        if on_step is not None:
            on_step(run)
    return run


def best_of(best, run):
    """The better of two runs (None: no run yet). Ties go to the later run, as scikit-learn's
    restarts do (with max_iter=0 every objective is -inf and the last initialisation is kept)."""
    if best is None or run.objective > best.objective or best.objective == -math.inf:
        return run
    return best


def m_step(stats, cov_type, reg_covar, prior=None):
    """(weights, means, covariances, collapsed) maximising the expected complete-data
    log-likelihood (or log-posterior with a ResolvedPrior). `collapsed` lists components
    with too little weight to estimate; their entries are finite placeholders."""
    n = stats.n + _NK_FLOOR
    K, D = stats.s.shape
    delta = stats.s / n[:, None]
    xbar = stats.shift + delta
    scatter = cov_type.scatter(stats.second, n, delta)
    if prior is None:
        weights = n / n.sum()
        means = xbar
        d = None
    else:
        a = prior.weight_concentration
        weights = (n + a - 1) / (n.sum() + K * (a - 1))
        kappa = prior.mean_precision
        means = (kappa * prior.mean + n[:, None] * xbar) / (kappa + n)[:, None]
        d = xbar - prior.mean
    weights = weights / weights.sum()
    covariances = cov_type.m_step(scatter, n, d, reg_covar, prior, D)
    collapsed = list(np.flatnonzero(stats.n < COLLAPSE_WEIGHT))
    return weights, means, covariances, collapsed
