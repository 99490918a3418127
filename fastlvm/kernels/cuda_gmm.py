"""numba.cuda kernels for Gaussian mixtures: the contract of fastlvm.kernels.cpu on a GPU.

The same additive statistics of a chunk of rows under the current parameters,

    n_k = sum_i r_ik    s_k = sum_i r_ik (x_i - c_k)    second_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T

(its diagonal for diag, its trace for spherical; tied: sum_i (x_i - c)(x_i - c)^T, one matrix),
sum_i log p(x_i), and per block of the grid the worst-explained row, soft or hard (one-hot argmax),
or under given responsibilities. Shifts, layouts and kind codes are those of kernels.cpu:
c_k = mu_k for full, the mixture mean c for the others; second is full (K,D,D), tied (1,D,D),
diag (K,1,D), spherical (K,1,1).

How a block works: it takes tiles of TILE_ROWS rows (one thread per row) in turn. The block loads
one component at a time (its mean, and its precision factor when it fits) into shared memory, and
each thread adds log p(x_i, k) to a log-sum-exp kept in registers (a running maximum and sum), so
no N x K array exists; then, component by component, the tile's responsibilities go to
shared memory and the threads switch roles: each owns some entries of the component's statistics
and adds the tile's rows to them in row order. A block's partial statistics live in its own slot
(written by one thread per entry, no atomics); a second kernel sums the slots in block order in
float64. So the result depends neither on the launch order nor on timing. Arithmetic is float64
throughout (data may be float32); the parameters are float64 device arrays.

Everything here runs under NUMBA_ENABLE_CUDASIM=1 in the test suite; see README for what has not
run on a GPU.
"""

import math
from functools import lru_cache

import numpy as np
from numba import cuda, float64, int64

from fastlvm.kernels.cpu import DIAG, FULL, SPHERICAL, TIED

TILE_ROWS = 128  # rows per tile = threads per block
MAX_BLOCKS = 1024  # blocks in a statistics grid: each keeps its own partial statistics


def second_shape(kind, K, D):
    """The layout of the second moment (kernels.cpu's)."""
    return {FULL: (K, D, D), TIED: (1, D, D), DIAG: (K, 1, D), SPHERICAL: (K, 1, 1)}[kind]


_SHARED_BYTES = 48 * 1024  # shared memory a block may use without opting in


def shared_layout(kind, D, tile):
    """(prec_shared, dynamic shared bytes): a block holds the current component's mean, and its
    precision factor too when both fit beside the tile's own arrays (3 * tile doubles)."""
    n_prec = {FULL: D * D, TIED: D * D, DIAG: D, SPHERICAL: 1}[kind]
    with_prec = 8 * (D + n_prec)
    if with_prec + 24 * tile <= _SHARED_BYTES:
        return True, with_prec
    return False, 8 * D


@cuda.jit(device=True, inline=True)
def _load_component(kind, k, means, prec, sm, prec_shared):
    """sm[:D] = mu_k and, when prec_shared, sm[D:] = P_k (full/tied D x D row-major, diag D entries,
    spherical one), loaded by all threads of the block together."""
    D = means.shape[1]
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    for e in range(t, D, nt):
        sm[e] = means[k, e]
    if prec_shared:
        if kind == FULL or kind == TIED:
            kk = k if kind == FULL else 0
            for e in range(t, D * D, nt):
                sm[D + e] = prec[kk, e // D, e % D]
        elif kind == DIAG:
            for e in range(t, D, nt):
                sm[D + e] = prec[k, 0, e]
        elif t == 0:
            sm[D] = prec[k, 0, 0]


@cuda.jit(device=True, inline=True)
def _log_prob(kind, X, i, k, sm, prec, prec_shared, log_norm):
    """log p(x_i, k) = log_norm_k - ||P_k^T (x_i - mu_k)||^2 / 2 (P upper triangular; diag: a vector;
    spherical: a scalar), in float64; mu_k (and P_k when prec_shared) read from shared memory sm."""
    D = X.shape[1]
    acc = 0.0
    if kind == FULL or kind == TIED:
        kk = k if kind == FULL else 0
        for j in range(D):
            y = 0.0
            for p in range(j + 1):
                pj = sm[D + p * D + j] if prec_shared else prec[kk, p, j]
                y += pj * (float64(X[i, p]) - sm[p])
            acc += y * y
    elif kind == DIAG:
        for p in range(D):
            v = (sm[D + p] if prec_shared else prec[k, 0, p]) * (float64(X[i, p]) - sm[p])
            acc += v * v
    else:
        for p in range(D):
            v = float64(X[i, p]) - sm[p]
            acc += v * v
        sc = sm[D] if prec_shared else prec[k, 0, 0]
        acc *= sc * sc
    return log_norm[k] - 0.5 * acc


@cuda.jit(device=True, inline=True)
def _row_log_lik(kind, X, i, valid, means, prec, prec_shared, log_norm, hard, sm):
    """(log p(x_i) by a one-pass log-sum-exp in registers, or max_k log p(x_i, k) when hard; the first
    argmax). Every thread of the block calls it (components are loaded together); valid: i < N."""
    m = -math.inf
    s = 0.0
    best = 0
    for k in range(means.shape[0]):
        cuda.syncthreads()
        _load_component(kind, k, means, prec, sm, prec_shared)
        cuda.syncthreads()
        if valid:
            lp = _log_prob(kind, X, i, k, sm, prec, prec_shared, log_norm)
            if lp > m:
                s = s * math.exp(m - lp) + 1.0
                m = lp
                best = k
            elif lp > -math.inf:
                s += math.exp(lp - m)
    if not valid:
        return 0.0, 0
    if hard or s == 0.0:  # s == 0: every log p(x_i, k) is -inf
        return m, best
    return m + math.log(s), best


@lru_cache(maxsize=None)
def stats_kernel(kind, tile):
    """The statistics kernel of one covariance type and tile size (compiled on first launch)."""
    n_second_of = {FULL: 2, TIED: 2, DIAG: 1, SPHERICAL: 0}[kind]  # 2: D*D, 1: D, 0: one entry

    @cuda.jit
    def suff_stats_tiles(X, means, prec, log_norm, shift, hard, resp_in, prec_shared, part_n, part_s, part_second,
                         part_ll, worst_ll, worst_row, out_ll, out_label):
        t = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        N, D = X.shape
        K = means.shape[0]
        given = resp_in.shape[0] == N
        rows_out = out_ll.shape[0] == N
        n_second = D * D if n_second_of == 2 else (D if n_second_of == 1 else 1)
        n_entries = 1 + D + n_second
        ll_s = cuda.shared.array(tile, float64)
        best_s = cuda.shared.array(tile, int64)
        r_s = cuda.shared.array(tile, float64)
        sm = cuda.shared.array(0, float64)  # the current component (shared_layout)
        n_tiles = (N + tile - 1) // tile
        for tl in range(blk, n_tiles, cuda.gridDim.x):
            r0 = tl * tile
            i = r0 + t
            rows = min(tile, N - r0)
            ll = 0.0
            best = 0
            if not given:
                ll, best = _row_log_lik(kind, X, i, i < N, means, prec, prec_shared, log_norm, hard, sm)
                if i < N and rows_out:
                    out_ll[i] = ll
                    out_label[i] = best
            ll_s[t] = ll
            best_s[t] = best
            cuda.syncthreads()
            if t == 0:
                for j in range(rows):
                    part_ll[blk] += ll_s[j]
                    if ll_s[j] < worst_ll[blk]:
                        worst_ll[blk] = ll_s[j]
                        worst_row[blk] = r0 + j
            for k in range(K):
                cuda.syncthreads()  # everyone is done with the previous component and r_s
                if not given and not hard:
                    _load_component(kind, k, means, prec, sm, prec_shared)
                    cuda.syncthreads()
                r = 0.0
                if i < N:
                    if given:
                        r = resp_in[i, k]
                    elif hard:
                        r = 1.0 if best == k else 0.0
                    else:
                        r = math.exp(_log_prob(kind, X, i, k, sm, prec, prec_shared, log_norm) - ll)
                r_s[t] = r
                cuda.syncthreads()
                for e in range(t, n_entries, tile):
                    if e == 0:
                        acc = 0.0
                        for j in range(rows):
                            acc += r_s[j]
                        part_n[blk, k] += acc
                    elif e <= D:
                        p = e - 1
                        acc = 0.0
                        for j in range(rows):
                            acc += r_s[j] * (float64(X[r0 + j, p]) - shift[k, p])
                        part_s[blk, k, p] += acc
                    elif n_second_of == 2:
                        q = e - 1 - D
                        p = q // D
                        c = q - p * D
                        if p <= c and (kind == FULL or k == 0):  # tied: one unweighted matrix
                            acc = 0.0
                            for j in range(rows):
                                w = r_s[j] if kind == FULL else 1.0
                                acc += w * (float64(X[r0 + j, p]) - shift[k, p]) * (float64(X[r0 + j, c]) - shift[k, c])
                            part_second[blk, k, p, c] += acc
                            if p != c:
                                part_second[blk, k, c, p] += acc
                    elif n_second_of == 1:
                        p = e - 1 - D
                        acc = 0.0
                        for j in range(rows):
                            v = float64(X[r0 + j, p]) - shift[k, p]
                            acc += r_s[j] * v * v
                        part_second[blk, k, 0, p] += acc
                    else:
                        acc = 0.0
                        for j in range(rows):
                            tot = 0.0
                            for p in range(D):
                                v = float64(X[r0 + j, p]) - shift[k, p]
                                tot += v * v
                            acc += r_s[j] * tot
                        part_second[blk, k, 0, 0] += acc
            cuda.syncthreads()

    return suff_stats_tiles


@cuda.jit
def _sum_blocks(parts, out):
    """out[m] += sum_b parts[b, m], over b in order (the second stage, float64)."""
    m = cuda.grid(1)
    if m < out.shape[0]:
        acc = 0.0
        for b in range(parts.shape[0]):
            acc += parts[b, m]
        out[m] += acc


@lru_cache(maxsize=None)
def scores_kernel(kind):
    @cuda.jit
    def row_scores_rows(X, means, prec, log_norm, hard, prec_shared, out_ll, out_label, out_logp, proba):
        """Per row: log p(x_i) (hard: max_k log p(x_i, k)), the first argmax, and when out_logp has N
        rows, log p(x_i, k) (proba: the posterior p(k | x_i) instead). Tiles of blockDim rows."""
        N = X.shape[0]
        K = means.shape[0]
        want = out_logp.shape[0] == N
        tile = cuda.blockDim.x
        sm = cuda.shared.array(0, float64)
        for tl in range(cuda.blockIdx.x, (N + tile - 1) // tile, cuda.gridDim.x):
            i = tl * tile + cuda.threadIdx.x
            ll, best = _row_log_lik(kind, X, i, i < N, means, prec, prec_shared, log_norm, hard, sm)
            if i < N:
                out_ll[i] = ll
                out_label[i] = best
            if want:
                for k in range(K):
                    cuda.syncthreads()
                    _load_component(kind, k, means, prec, sm, prec_shared)
                    cuda.syncthreads()
                    if i < N:
                        lp = _log_prob(kind, X, i, k, sm, prec, prec_shared, log_norm)
                        out_logp[i, k] = math.exp(lp - ll) if proba else lp
            cuda.syncthreads()

    return row_scores_rows


class Accumulator:
    """Float64 device sums of the statistics of successive launches (one per stream, so that
    streams never write the same memory): partial slots are summed into it in block order."""

    def __init__(self, kind, K, D, n_blocks, stream=0):
        self.kind, self.stream = kind, stream
        sec = second_shape(kind, K, D)
        self.part_n = cuda.device_array((n_blocks, K), np.float64, stream=stream)
        self.part_s = cuda.device_array((n_blocks, K, D), np.float64, stream=stream)
        self.part_second = cuda.device_array((n_blocks,) + sec, np.float64, stream=stream)
        self.n = cuda.to_device(np.zeros(K), stream=stream)
        self.s = cuda.to_device(np.zeros(K * D), stream=stream)
        self.second = cuda.to_device(np.zeros(int(np.prod(sec))), stream=stream)
        self.ll, self.worst_ll, self.worst_row = [], [], []
        self.shape = (K, D, sec)

    def add(self, X, params, hard, resp_in, tile=None, row_offset=0, out_ll=None, out_label=None):
        """Adds the statistics of the device rows X under params (means, prec, log_norm, shift as
        float64 device arrays)."""
        N = X.shape[0]
        tile = tile or TILE_ROWS
        n_blocks = min(self.part_n.shape[0], (N + tile - 1) // tile)
        st = self.stream
        for a in (self.part_n, self.part_s, self.part_second):
            _fill(a, 0.0, st)
        b_ll = cuda.to_device(np.zeros(n_blocks), stream=st)
        b_worst = cuda.to_device(np.full(n_blocks, np.inf), stream=st)
        b_row = cuda.to_device(np.zeros(n_blocks, dtype=np.int64), stream=st)
        none_f = cuda.device_array(0, np.float64, stream=st)
        none_i = cuda.device_array(0, np.int64, stream=st)
        prec_shared, shared_bytes = shared_layout(self.kind, X.shape[1], tile)
        stats_kernel(self.kind, tile)[n_blocks, tile, st, shared_bytes](
            X, *params, bool(hard), resp_in, prec_shared, self.part_n, self.part_s, self.part_second, b_ll, b_worst,
            b_row,
            none_f if out_ll is None else out_ll, none_i if out_label is None else out_label)
        K, D, sec = self.shape
        for parts, out in ((self.part_n, self.n), (self.part_s, self.s), (self.part_second, self.second)):
            flat = parts.reshape(parts.shape[0], out.shape[0])[:n_blocks]
            _sum_blocks[(out.shape[0] + TILE_ROWS - 1) // TILE_ROWS, TILE_ROWS, st](flat, out)
        self.ll.append(b_ll)
        self.worst_ll.append(b_worst)
        self.worst_row.append((b_row, row_offset))

    def result(self):
        """(n, s, second, loglik, worst_ll, worst_row) on the host, as kernels.cpu.suff_stats."""
        K, D, sec = self.shape
        st = self.stream
        n = self.n.copy_to_host(stream=st)
        s = self.s.copy_to_host(stream=st).reshape(K, D)
        second = self.second.copy_to_host(stream=st).reshape(sec)
        ll = [a.copy_to_host(stream=st) for a in self.ll]
        worst = [a.copy_to_host(stream=st) for a in self.worst_ll]
        rows = [r.copy_to_host(stream=st) + off for r, off in self.worst_row]
        cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
        return n, s, second, float(cat(ll, np.float64).sum()), cat(worst, np.float64), cat(rows, np.int64)


@cuda.jit
def _fill_kernel(flat, value):
    for m in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        flat[m] = value


def _fill(a, value, stream=0):
    flat = a.reshape(-1)
    _fill_kernel[max(1, min(MAX_BLOCKS, (flat.shape[0] + TILE_ROWS - 1) // TILE_ROWS)), TILE_ROWS, stream](flat, value)


def suff_stats(kind, X, params, hard, resp_in, tile=None, out_ll=None, out_label=None):
    """Statistics of the device rows X (N, D) in one launch and its reduction; params as in
    Accumulator.add. Returns what kernels.cpu.suff_stats returns; with out_ll / out_label (device,
    (N,)) also every row's log-likelihood and label (K-means' assignment)."""
    N, D = X.shape
    K = params[0].shape[0]
    tile = tile or TILE_ROWS
    acc = Accumulator(kind, K, D, min(MAX_BLOCKS, (N + tile - 1) // tile))
    acc.add(X, params, hard, resp_in, tile, 0, out_ll, out_label)
    return acc.result()


def row_scores(kind, X, params, hard, out_ll, out_label, out_logp, proba=False):
    """Per-row outputs into device arrays (see scores_kernel); params: (means, prec, log_norm)."""
    N, threads = X.shape[0], TILE_ROWS
    blocks = max(1, min(MAX_BLOCKS * 4, (N + threads - 1) // threads))
    prec_shared, shared_bytes = shared_layout(kind, X.shape[1], threads)
    scores_kernel(kind)[blocks, threads, 0, shared_bytes](X, *params, bool(hard), prec_shared, out_ll, out_label,
                                                          out_logp, bool(proba))


@cuda.jit
def _non_finite_rows(X, first):
    """first[0] = min index of a row holding NaN or inf (N when none); min by a lock-free integer
    atomic, which is exact whatever the order."""
    for i in range(cuda.grid(1), X.shape[0], cuda.gridsize(1)):
        for p in range(X.shape[1]):
            v = X[i, p]
            if not (v - v == 0):
                cuda.atomic.min(first, 0, i)
                break


def first_non_finite_row(X):
    """Index of the first row of the device array X holding NaN or inf, or None."""
    N, threads = X.shape[0], TILE_ROWS
    first = cuda.to_device(np.array([N], dtype=np.int64))
    _non_finite_rows[max(1, min(MAX_BLOCKS, (N + threads - 1) // threads)), threads](X, first)
    row = int(first.copy_to_host()[0])
    return None if row == N else row


@cuda.jit
def _gather(X, index, out):
    for m in range(cuda.grid(1), out.shape[0] * out.shape[1], cuda.gridsize(1)):
        i = m // out.shape[1]
        out[i, m - i * out.shape[1]] = X[index[i], m - i * out.shape[1]]


def take_rows(X, index):
    """X[index] of the device array X, as a host array."""
    threads = TILE_ROWS
    out = cuda.device_array((len(index), X.shape[1]), X.dtype)
    if len(index):
        blocks = max(1, min(MAX_BLOCKS, (out.shape[0] * out.shape[1] + threads - 1) // threads))
        _gather[blocks, threads](X, cuda.to_device(index), out)
    return out.copy_to_host()
