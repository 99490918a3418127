"""Additive sufficient statistics of a Gaussian mixture and the one call that computes them.

For shifts c_k fixed during a pass, a chunk of rows contributes
    n_k = sum_i r_ik,  s_k = sum_i r_ik (x_i - c_k),  second_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T
(or the diagonal / trace of it), plus sum_i log p(x_i). Statistics of disjoint chunks add, so every
data source (array, memmap, stream, Dask) is the same loop over chunks.
"""

from dataclasses import dataclass, field
from functools import partial

import numba
import numpy as np

from fastlvm.kernels import cpu
from fastlvm.data.base import Source, iter_chunks
from fastlvm.data.sources import ArraySource

# Partial statistics of one kernel call stay below this many bytes (they scale with chunk rows).
_PARTIALS_BUDGET = 32 * 2**20
MAX_CHUNK_ROWS = 2**18


def default_chunk_rows(K, D, block_rows):
    """Rows per kernel call: large enough to keep both cores busy, small enough that the
    per-block partial statistics (K D^2 doubles per block for full) stay within budget."""
    per_block = 8 * (K * D * D + K * D + K + 4)
    blocks = max(2, _PARTIALS_BUDGET // per_block)
    return int(min(MAX_CHUNK_ROWS, blocks * block_rows))


@dataclass
class SufficientStatistics:
    n: np.ndarray  # (K,)
    s: np.ndarray  # (K, D), centred on shift
    second: np.ndarray  # kernel layout (see fastlvm.kernels.cpu), centred on shift
    loglik: float  # sum_i log p(x_i) under the parameters of the pass
    n_rows: int
    shift: np.ndarray  # (K, D)
    worst: list = field(default_factory=list)  # (log p(x), row index), lowest first
    worst_x: dict = field(default_factory=dict)  # row index -> that row (float64), for re-seeding

    def __add__(self, other):
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cannot add statistics taken about different shifts")
        worst = sorted(self.worst + other.worst)[: max(len(self.worst), len(other.worst))]
        rows = {**self.worst_x, **other.worst_x}
        return SufficientStatistics(
            self.n + other.n,
            self.s + other.s,
            self.second + other.second,
            self.loglik + other.loglik,
            self.n_rows + other.n_rows,
            self.shift,
            worst,
            {r: rows[r] for _, r in worst if r in rows},
        )

    def scaled(self, factor):
        """The statistics times a positive factor (weighted averages of statistics in online EM)."""
        return SufficientStatistics(self.n * factor, self.s * factor, self.second * factor, self.loglik * factor,
                                    self.n_rows * factor, self.shift, self.worst, self.worst_x)

    def recentred(self, shift):
        """The same statistics centred on another shift b (K, D) instead of a = self.shift: with d = a - b,
            s_b = s_a + n d,    S_b = S_a + s_a d^T + d s_a^T + n d d^T
        per component; diag keeps the diagonal of the update and spherical its trace. The tied type's
        second moment is unweighted about one centre, so its update is the sum of those over k."""
        shift = np.asarray(shift, dtype=np.float64)
        d = self.shift - shift
        cross = self.s[:, :, None] * d[:, None, :]
        update = cross + np.swapaxes(cross, 1, 2) + self.n[:, None, None] * d[:, :, None] * d[:, None, :]
        K = self.n.shape[0]
        rows, cols = self.second.shape[1:]
        if rows == 1 and cols == 1:  # spherical (or D = 1)
            second = self.second + np.trace(update, axis1=1, axis2=2)[:, None, None]
        elif rows == 1:  # diag
            second = self.second + np.diagonal(update, axis1=1, axis2=2)[:, None, :]
        elif self.second.shape[0] == 1 and K > 1:  # tied
            second = self.second + update.sum(axis=0)[None]
        else:  # full (the update is symmetric: right for a full or an upper-triangular layout)
            second = self.second + update
        return SufficientStatistics(self.n, self.s + self.n[:, None] * d, second, self.loglik, self.n_rows,
                                    np.broadcast_to(shift, self.shift.shape).copy(), self.worst, self.worst_x)


def kernel_parameters(cov, weights, means, prec_chol, dtype):
    """(means, prec, log_norm, centre) in the kernels' layout: log_norm_k = log pi_k - D/2 log 2pi
    + log det P_k; centre (the mixture mean) is the shift of the tied, diag and spherical moments."""
    K, D = means.shape
    with np.errstate(divide="ignore"):
        log_w = np.log(weights)
    log_norm = log_w - 0.5 * D * np.log(2 * np.pi) + cov.log_det(prec_chol, D)
    log_norm = np.broadcast_to(log_norm, (K,)).astype(np.float64)
    centre = weights @ means
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
    with cpu.blas_single_thread():
        n, s, second, ll, worst_ll, worst_row = cpu.suff_stats(cov.kind, X, means, prec, log_norm, centre, hard, resp,
                                                                 numba.get_num_threads())
    order = np.argsort(worst_ll, kind="stable")[:n_worst]
    worst = [(float(worst_ll[i]), int(worst_row[i]) + row_offset) for i in order]
    worst_x = {int(worst_row[i]) + row_offset: X[worst_row[i]].astype(np.float64) for i in order}
    shift = means if cov.name == "full" else np.broadcast_to(centre, means.shape)
    return SufficientStatistics(n, s, second, ll, X.shape[0], shift.astype(np.float64), worst, worst_x)


def row_scores(X, cov, kparams, hard=False, want_log_prob=False):
    """(log p(x_i) or max_k log p(x_i, k) when hard, argmax labels, and optionally log p(x_i, k))."""
    means, prec, log_norm, centre = kparams
    N, K = X.shape[0], means.shape[0]
    ll = np.empty(N)
    labels = np.empty(N, dtype=np.int64)
    logp = np.empty((N if want_log_prob else 0, K))
    with cpu.blas_single_thread():
        cpu.row_scores(cov.kind, X, means, prec, log_norm, centre, hard, ll, labels, logp, numba.get_num_threads())
    return ll, labels, (logp if want_log_prob else None)


def _rows_statistics(cov, kparams, chunk_rows, hard, n_worst, resp_fn, row_offset, X):
    """Statistics of the rows of an in-memory X (the rows from row_offset on), in chunks of chunk_rows.
    A module-level function of plain arguments, so Dask can ship it to its workers."""
    total = None
    for start, chunk in iter_chunks(X, chunk_rows, kparams[0].dtype):
        resp = None if resp_fn is None else resp_fn(chunk)
        part = chunk_statistics(chunk, cov, kparams, hard, row_offset + start, n_worst, resp)
        total = part if total is None else total + part
    return total


def statistics(X, cov, kparams, chunk_rows, hard=False, n_worst=0, resp_fn=None):
    """Sum of chunk statistics over the rows of X (an in-memory array or a Source), in row order.
    resp_fn (responsibilities drawn per chunk) is for local sources only."""
    source = X if isinstance(X, Source) else ArraySource(X, trusted=True)
    task = partial(_rows_statistics, cov, kparams, chunk_rows, hard, n_worst, resp_fn)
    total = None
    for part in source.map(task, chunk_rows):
        total = part if total is None else total + part
    return total


def scores(X, cov, kparams, chunk_rows, hard=False, want_log_prob=False):
    """row_scores over the chunks of X, concatenated (N,) / (N,) / (N, K)."""
    parts = [row_scores(c, cov, kparams, hard, want_log_prob) for _, c in iter_chunks(X, chunk_rows, kparams[0].dtype)]
    ll = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    logp = np.concatenate([p[2] for p in parts]) if want_log_prob else None
    return ll, labels, logp


def rows_output(what, cov, kparams, chunk_rows, row_offset, X):
    """One per-row answer for the rows of X: 'log_prob' log p(x_i) (N,), 'label' argmax_k (N,) int64,
    or 'proba' the posterior over components (N, K); only the last builds an N x K array."""
    parts = []
    for _, chunk in iter_chunks(X, chunk_rows, kparams[0].dtype):
        ll, labels, logp = row_scores(chunk, cov, kparams, want_log_prob=what == "proba")
        if what == "proba":
            parts.append(np.exp(logp - ll[:, None]))
        else:
            parts.append(ll if what == "log_prob" else labels)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
