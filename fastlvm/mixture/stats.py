"""Additive sufficient statistics of a Gaussian mixture and the one call that computes them.

For shifts c_k fixed during a pass, a chunk of rows contributes
    n_k = sum_i r_ik,  s_k = sum_i r_ik (x_i - c_k),  second_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T
(or the diagonal / trace of it), plus sum_i log p(x_i). Statistics of disjoint chunks add, so every
data source (array, memmap, stream, Dask) is the same loop over chunks.
"""

from dataclasses import dataclass, field

import numpy as np

from fastlvm.kernels import cpu
from fastlvm.mixture.sources import iter_chunks


@dataclass
class SufficientStatistics:
    n: np.ndarray  # (K,)
    s: np.ndarray  # (K, D), centred on shift
    second: np.ndarray  # kernel layout (see fastlvm.kernels.cpu), centred on shift
    loglik: float  # sum_i log p(x_i) under the parameters of the pass
    n_rows: int
    shift: np.ndarray  # (K, D)
    worst: list = field(default_factory=list)  # (log p(x), row index), lowest first

    def __add__(self, other):
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cannot add statistics taken about different shifts")
        worst = sorted(self.worst + other.worst)[: max(len(self.worst), len(other.worst))]
        return SufficientStatistics(
            self.n + other.n,
            self.s + other.s,
            self.second + other.second,
            self.loglik + other.loglik,
            self.n_rows + other.n_rows,
            self.shift,
            worst,
        )


def kernel_parameters(cov, weights, means, prec_chol, dtype):
    """(means, prec, log_norm, centre) in the kernels' layout: log_norm_k = log pi_k - D/2 log 2pi
    + log det P_k; centre is the tied type's global shift (the mixture mean)."""
    K, D = means.shape
    with np.errstate(divide="ignore"):
        log_w = np.log(weights)
    log_norm = log_w - 0.5 * D * np.log(2 * np.pi) + cov.log_det(prec_chol, D)
    log_norm = np.broadcast_to(log_norm, (K,)).astype(np.float64)
    centre = weights @ means if cov.name == "tied" else np.zeros(D)
    prec = cov.kernel_precision(prec_chol, K)
    return (
        np.ascontiguousarray(means, dtype=dtype),
        np.ascontiguousarray(prec, dtype=dtype),
        np.ascontiguousarray(log_norm),
        np.ascontiguousarray(centre, dtype=dtype),
    )


def chunk_statistics(X, cov, kparams, hard=False, row_offset=0, n_worst=0, resp=None):
    """Statistics of one in-memory chunk X (N, D) under kernel parameters kparams
    (or under given responsibilities resp (N, K))."""
    means, prec, log_norm, centre = kparams
    if resp is None:
        resp = np.empty((0, means.shape[0]))
    n, s, second, ll, worst_ll, worst_row = cpu.suff_stats(
        cov.kind, X, means, prec, log_norm, centre, hard, resp
    )
    order = np.argsort(worst_ll, kind="stable")[:n_worst]
    worst = [(float(worst_ll[i]), int(worst_row[i]) + row_offset) for i in order]
    shift = np.broadcast_to(centre, means.shape) if cov.name == "tied" else means
    return SufficientStatistics(n, s, second, ll, X.shape[0], shift.astype(np.float64), worst)


def row_scores(X, cov, kparams, hard=False, want_log_prob=False):
    """(log p(x_i) or max_k log p(x_i, k) when hard, argmax labels, and optionally log p(x_i, k))."""
    means, prec, log_norm, centre = kparams
    N, K = X.shape[0], means.shape[0]
    ll = np.empty(N)
    labels = np.empty(N, dtype=np.int64)
    logp = np.empty((N if want_log_prob else 0, K))
    cpu.row_scores(cov.kind, X, means, prec, log_norm, centre, hard, ll, labels, logp)
    return ll, labels, (logp if want_log_prob else None)


def statistics(X, cov, kparams, chunk_rows, hard=False, n_worst=0, resp_fn=None):
    """Sum of chunk statistics over the rows of X, chunks taken in row order."""
    total = None
    for start, chunk in iter_chunks(X, chunk_rows, kparams[0].dtype):
        resp = None if resp_fn is None else resp_fn(chunk)
        part = chunk_statistics(chunk, cov, kparams, hard, start, n_worst, resp)
        total = part if total is None else total + part
    return total


def scores(X, cov, kparams, chunk_rows, hard=False, want_log_prob=False):
    """row_scores over the chunks of X, concatenated (N,) / (N,) / (N, K)."""
    parts = [row_scores(c, cov, kparams, hard, want_log_prob) for _, c in iter_chunks(X, chunk_rows, kparams[0].dtype)]
    ll = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    logp = np.concatenate([p[2] for p in parts]) if want_log_prob else None
    return ll, labels, logp
