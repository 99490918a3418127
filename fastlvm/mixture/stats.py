"""Additive sufficient statistics of a Gaussian mixture and the one call that computes them.

For shifts c_k fixed during a pass, a chunk of rows contributes
    n_k = sum_i r_ik,  s_k = sum_i r_ik (x_i - c_k),  second_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T
(or the diagonal / trace of it), plus sum_i log p(x_i). Statistics of disjoint chunks add, so every
data source (array, memmap, stream, Dask) is the same loop over chunks.
"""

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from fastlvm.data.base import Source, iter_chunks
from fastlvm.data.sources import ArraySource
from fastlvm.engine import CpuEngine, is_device_array, to_host

CPU = CpuEngine()


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
    cov: object = None  # the covariance type (it knows the layout of second)

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
            self.cov,
        )

    def scaled(self, factor):
        """The statistics times a positive factor (weighted averages of statistics in online EM)."""
        return SufficientStatistics(self.n * factor, self.s * factor, self.second * factor, self.loglik * factor,
                                    self.n_rows * factor, self.shift, self.worst, self.worst_x, self.cov)

    def recentred(self, shift):
        """The same statistics centred on another shift b (K, D) instead of a = self.shift: with d = a - b,
            s_b = s_a + n d,    S_b = S_a + s_a d^T + d s_a^T + n d d^T
        per component; the covariance type applies the update to its layout of the second moment."""
        shift = np.asarray(shift, dtype=np.float64)
        d = self.shift - shift
        cross = self.s[:, :, None] * d[:, None, :]
        update = cross + np.swapaxes(cross, 1, 2) + self.n[:, None, None] * d[:, :, None] * d[:, None, :]
        return SufficientStatistics(self.n, self.s + self.n[:, None] * d, self.cov.recentre_second(self.second, update),
                                    self.loglik, self.n_rows, np.broadcast_to(shift, self.shift.shape).copy(),
                                    self.worst, self.worst_x, self.cov)


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


def chunk_statistics(X, cov, kparams, hard=False, row_offset=0, n_worst=0, resp=None, engine=CPU):
    """Statistics of one chunk X (N, D), in host or (cuda) device memory, under kernel parameters
    kparams (or under given responsibilities resp (N, K))."""
    means, _, _, centre = kparams
    shift = cov.statistics_shift(means, centre).astype(np.float64)
    n, s, second, ll, worst_ll, worst_row = engine.suff_stats(cov.kind, X, kparams, shift, hard, resp)
    order = np.argsort(worst_ll, kind="stable")[:n_worst]
    worst = [(float(worst_ll[i]), int(worst_row[i]) + row_offset) for i in order]
    worst_x = {int(worst_row[i]) + row_offset: to_host(X[int(worst_row[i])]).astype(np.float64) for i in order}
    return SufficientStatistics(n, s, second, ll, X.shape[0], shift, worst, worst_x, cov)


def _chunks(X, chunk_rows, dtype):
    """(offset, chunk) over X; device rows (already a chunk of the source) as they are."""
    if is_device_array(X):
        return [(0, X)]
    return iter_chunks(X, chunk_rows, dtype)


def _rows_statistics(engine, cov, kparams, chunk_rows, hard, n_worst, resp_fn, row_offset, X):
    """Statistics of the rows of an in-memory X (the rows from row_offset on), in chunks of chunk_rows.
    A module-level function of plain arguments, so Dask can ship it to its workers."""
    total = None
    for start, chunk in _chunks(X, chunk_rows, kparams[0].dtype):
        resp = None if resp_fn is None else resp_fn(chunk)
        part = chunk_statistics(chunk, cov, kparams, hard, row_offset + start, n_worst, resp, engine)
        total = part if total is None else total + part
    return total


def statistics(X, cov, kparams, chunk_rows, hard=False, n_worst=0, resp_fn=None, engine=CPU):
    """Sum of chunk statistics over the rows of X (an in-memory array or a Source), in row order.
    resp_fn (responsibilities drawn per chunk) is for local sources only."""
    source = X if isinstance(X, Source) else ArraySource(X, trusted=True)
    task = partial(_rows_statistics, engine, cov, kparams, chunk_rows, hard, n_worst, resp_fn)
    total = None
    for part in source.map(task, chunk_rows):
        total = part if total is None else total + part
    return total


def rows_output(what, engine, cov, kparams, chunk_rows, dtype, row_offset, X):
    """One per-row answer for the rows of X, in dtype (labels int64): 'log_prob' log p(x_i) (N,), 'label'
    argmax_k (N,), or 'proba' the posterior over components (N, K); only the last builds an N x K
    array. Device rows give a device array of the engine's."""
    parts = [engine.rows_output(what, cov.kind, kparams, chunk, dtype)
             for _, chunk in _chunks(X, chunk_rows, kparams[0].dtype)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
