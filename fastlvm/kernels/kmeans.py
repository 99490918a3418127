"""Numba CPU kernels for k-means (Lloyd's algorithm), dense and CSR.

One pass assigns every row to its nearest centre and folds the changes into the per-cluster
weighted sums (the rows whose label changed), without an N x K array (products come in tiles of
rows):

    label_i = argmin_k ||c_k||^2 - 2 x_i . c_k          (ties to the lowest k, as Lloyd's)
    S_k += w_i x_i,  W_k += w_i   for the new label;   S_k -= w_i x_i, W_k -= w_i for the old one

Hamerly's bounds (Hamerly, 2010) skip every row whose label cannot change: u_i >= ||x_i - c_a||
and l_i <= min_{k != a} ||x_i - c_k|| follow the centres' moves (u += p_a, l -= max_{k != a} p_k);
a row is skipped, without reading it, while u_i < max(l_i, s_a) with s_a half the distance from
c_a to its nearest other centre. Bounds are widened by a rounding margin, so a skipped row's
label is the label the full computation gives: the result is Lloyd's. Only rows whose label
changes touch the sums, so a skipped row costs its three bound words.

A pass runs over fixed blocks of rows and notes each block's moves. Dense rows add them up into the
block's own partial sums while the tile is in cache (reduced in block order after the pass: K D
words a block, at most the block's own size up to K = 1024 float32); CSR rows, whose partial sums
would be K times their width a block, leave them to apply_moves, which adds every cluster's rows in
row order. Either way the result does not depend on the number of threads. The kernels are serial
and release the GIL; `_run` calls one per thread (workers.on_workers), each claiming blocks until
none is left: plain threads rather than Numba's parallel loops, which compile several times slower.
Dense rows are scored by the register-blocked SIMD search of `fastlvm.kernels.simd` (four rows,
eight on AVX-512 targets, against a panel of centres, reading X as stored) for any number of
centres: BLAS on tiles of rows, which spends long packing each tile, was 1.05-1.44x as slow on AVX2
(Zen 3) and 1.13-1.72x as slow on AVX-512 (Zen 4) at every shape measured (K = 16 to 1024, D = 8
to 128, float32 and float64). CSR rows are scored by an axpy per non-zero along the transposed
centres, into a tile of products G that the argmin reads while it is in cache.
The kernels over Rows are made per data layout (`_kernels`): a dense fit compiles no CSR code.
"""

import functools
import math
from types import SimpleNamespace

import numba
import numpy as np
from numba import njit
from numba.extending import register_jitable

from fastlvm.kernels.cpu import _aligned, blas_single_thread
from fastlvm.kernels.simd import TILE_ROWS, claim, lanes, nearest_tile, prefetch
from fastlvm.kernels.workers import on_workers

_FASTMATH = {"reassoc", "contract", "arcp"}
_inline = njit(fastmath=_FASTMATH, cache=True, nogil=True, inline="always")
_jit = njit(fastmath=_FASTMATH, cache=True, nogil=True)
_helper = njit(fastmath=_FASTMATH, cache=True, nogil=True, no_cfunc_wrapper=True, no_cpython_wrapper=True)

BLOCK_ROWS = 2048  # rows per block; fixed, so results ignore the thread count
SUB_ROWS = 256  # CSR rows per tile of products inside a block (dense rows: TILE_ROWS, see _full_pass)
# A bounded pass scores a row (its own centre, then the groups its bounds cannot rule out) several
# times slower than a full pass of tiled products does; it pays only while it scores few rows. A
# sample of every SAMPLE_STRIDE-th row predicts the share it would score. After a miss, full passes
# (which then skip the bounds' bookkeeping) run for a while, twice as long after each miss, and
# until a pass changes at most BOUNDED_MAX_SHARE * CHANGED_PER_SCORED of the labels: a bounded
# pass scores every row whose label changes, and, on overlapping clusters (200k x 32, K=16), 3.5 to
# 7.5 times as many (it would score 100%, 94% and 75% of rows while 28%, 14% and 10% of labels
# changed). Setting the bounds costs a full pass 40% more (their 24 bytes a row).
BOUNDED_MAX_SHARE = 0.2
CHANGED_PER_SCORED = 0.25
SAMPLE_STRIDE = 64
MAX_WAIT = 16
# Below this many rows a full pass takes a few milliseconds: the bounds' bookkeeping (and the
# seconds their kernels take to compile on first use) cannot pay, so only full passes run.
BOUNDED_MIN_ROWS = 16 * BLOCK_ROWS


def n_groups(n_clusters):
    """Yinyang's groups of centres: about 4 centres a group up to K=64, then about 10."""
    return max(1, -(-n_clusters // (4 if n_clusters <= 64 else 10)))


def _round_up(n, m):
    return -(-n // m) * m


@register_jitable  # plain Python when called from Python: no compile of its own
def n_blocks(n_rows):
    """Blocks of BLOCK_ROWS rows (at least one)."""
    return max(1, (n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS)


def _workers(n_items):
    """Threads for n_items blocks: up to numba.get_num_threads()."""
    return max(1, min(numba.get_num_threads(), n_items))


def _tile_scratch(K, dtype, n_workers, sparse):
    """Each worker's buffers for a pass over tiles of rows, stacked on a leading worker axis: for CSR
    rows (`sparse`) products G (K, SUB_ROWS) and acc (K,) in dtype (empty for dense rows, which the
    SIMD search scores in registers), and per row the nearest centre (int64) and the lowest two
    scores (float64). Made here in NumPy: allocations inside the kernels compile NumPy's allocation
    code once per shape and dtype."""
    n, Kg = n_workers, K if sparse else 0
    return (_aligned((n, Kg, SUB_ROWS), dtype), _aligned((n, Kg), dtype), _aligned((n, SUB_ROWS), np.int64),
            _aligned((n, 2, SUB_ROWS), np.float64))


@_inline
def _tile_worker(scratch, w):
    """Worker w's buffers from _tile_scratch's stacks: G, acc, best, s1, s2."""
    G, acc, best, s = scratch
    return G[w], acc[w], best[w], s[w, 0], s[w, 1]


def _run(kernel, n_items, *args, n_workers=None):
    """kernel(*args, worker, counter) on n_workers threads (default: up to numba.get_num_threads())."""
    on_workers(kernel, n_workers or _workers(n_items), *args)


@_inline
def _dense_sq_distance(X, i, C, k):
    """||x_i - c_k||^2 summed directly (exactly 0 when x_i == c_k)."""
    acc = 0.0
    for d in range(X.shape[1]):
        t = np.float64(X[i, d]) - C[k, d]
        acc += t * t
    return acc


@_inline
def _sparse_sq_distance(data, indices, indptr, i, C, k, x_norm, c_norm):
    acc = 0.0
    for j in range(indptr[i], indptr[i + 1]):
        acc += np.float64(data[j]) * C[k, indices[j]]  # float64: a row on its centre gives ~0
    return max(x_norm - 2.0 * acc + c_norm, 0.0)


@_inline
def _sq_distance(sparse, X, data, indices, indptr, i, C, k, x_norms, c_norms):
    """||x_i - c_k||^2 of a dense or CSR row."""
    if sparse:
        return _sparse_sq_distance(data, indices, indptr, i, C, k, x_norms[i], c_norms[k])
    return _dense_sq_distance(X, i, C, k)


@_inline
def _relabel(labels, i, new, moved, old, n_changed):
    """Row i takes the label `new`, a change, noted as the block's n_changed-th move for _move_sums
    (dense rows) or apply_moves (CSR rows); callers test for the change first, so an unchanged row
    costs one comparison. Returns the new count of moves."""
    moved[n_changed] = i
    old[n_changed] = labels[i]
    labels[i] = new
    return n_changed + 1


@_inline
def _product(X, data, indices, indptr, sparse, i, C, k):
    """x_i . c_k in the rows' dtype."""
    acc = C.dtype.type(0)
    if sparse:
        for j in range(indptr[i], indptr[i + 1]):
            acc += data[j] * C[k, indices[j]]
    else:
        for d in range(C.shape[1]):
            acc += X[i, d] * C[k, d]
    return acc


@_inline
def _largest(a):
    """max(a) of a non-negative array (a loop: np.max compiles for a second or more)."""
    m = 0.0
    for v in a:
        m = max(m, v)
    return m


@_inline
def _low(d2, margin, shrink):
    """A lower bound on a distance from its computed square: less the rounding margin, shrunk so
    that storing it (float32) and later subtractions cannot round it up."""
    return np.sqrt(max(d2 - margin, 0.0)) * shrink


@_inline
def _set_bounds(x_norms, r0, n, s1, s2, base, eps, shrink, upper, lower):
    """The bounds of rows r0 + r, r < n, from their lowest two scores s1, s2 (s2 is overwritten):
    upper = the distance to the nearest centre and every group's lower bound the distance to the
    next nearest, each widened by the rounding margin base + eps ||x||^2. Loops over the tile with
    no store per group in them vectorise, the square roots four at a time; the bounds' 24 bytes a
    row still make a full pass ~40% slower (200k x 32, K=16), so LloydState sets them only when a
    bounded pass may follow."""
    for r in range(n):
        x = x_norms[r0 + r]
        margin = base + eps * x
        upper[r0 + r] = np.sqrt(max(x + s1[r], 0.0) + margin)
        s2[r] = _low(x + s2[r], margin, shrink)
    for r in range(n):
        for g in range(lower.shape[1]):
            lower[r0 + r, g] = s2[r]


@_inline
def _sparse_tile_products(data, indices, indptr, r0, n, CT, G, acc):
    """G[k, r] = x_{r0 + r} . c_k for r < n <= G.shape[1] and CSR rows: one axpy over the K centres
    per non-zero along the transposed centres CT (D, K)."""
    for r in range(n):
        i = r0 + r
        acc[:] = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            v = data[j]
            col = indices[j]
            for k in range(acc.shape[0]):
                acc[k] += v * CT[col, k]
        for k in range(acc.shape[0]):
            G[k, r] = acc[k]


@_inline
def _fold(s, k, best, s1, s2):
    """One more centre k (score s) into a row's best centre, lowest score s1 and next lowest s2."""
    lower = s < s1  # strict: ties keep the lower index
    return (k if lower else best), (s if lower else s1), min(s2, s1 if lower else s)


@_helper
def _nearest_block(G, n, c_norms, best, s1, s2):
    """The nearest-centre search of CSR rows' full passes. For the rows r < n of a tile of products
    G (K, SUB_ROWS), G[k, r] = x_r . c_k: best[r] = argmin_k ||c_k||^2 - 2 x . c_k (ties to the
    lowest k, as argmin), s1[r] its score and s2[r] the next lowest score (inf when K = 1). Sweeps
    of four centres, vectorised over rows (the running minima are read and written once a sweep)."""
    K = G.shape[0]
    for r in range(n):
        best[r] = 0
        s1[r] = c_norms[0] - 2.0 * G[0, r]
        s2[r] = np.inf
    k = 1
    while k + 4 <= K:
        c0, c1, c2, c3 = c_norms[k], c_norms[k + 1], c_norms[k + 2], c_norms[k + 3]
        for r in range(n):
            b, p, q = best[r], s1[r], s2[r]
            b, p, q = _fold(c0 - 2.0 * G[k, r], k, b, p, q)
            b, p, q = _fold(c1 - 2.0 * G[k + 1, r], k + 1, b, p, q)
            b, p, q = _fold(c2 - 2.0 * G[k + 2, r], k + 2, b, p, q)
            best[r], s1[r], s2[r] = _fold(c3 - 2.0 * G[k + 3, r], k + 3, b, p, q)
        k += 4
    for k in range(k, K):
        for r in range(n):
            best[r], s1[r], s2[r] = _fold(c_norms[k] - 2.0 * G[k, r], k, best[r], s1[r], s2[r])


@_jit
def _nearest_rows(X, CT, lane_norms, labels, d2, scratch, worker, counter):
    """The kernel of nearest_centres: labels[i] and d2[i] = ||x_i - c||^2 (in d2's dtype, >= 0) of
    the nearest centre c, for the blocks of dense rows the worker claims, with its buffers
    (_tile_scratch)."""
    N = X.shape[0]
    _, _, best, s1, s2 = _tile_worker(scratch, worker)
    while True:
        b = claim(counter)
        if b >= n_blocks(N):
            break
        for r0 in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS), TILE_ROWS):
            n = min(TILE_ROWS, N - r0)
            nearest_tile(X, r0, n, CT, lane_norms, best, s1, s2)
            for r in range(n):
                i = r0 + r
                x_norm = 0.0
                for d in range(X.shape[1]):
                    x_norm += np.float64(X[i, d]) * X[i, d]
                labels[i] = best[r]
                d2[i] = max(x_norm + s1[r], 0.0)


def centres_in_lanes(C, norms=None):
    """The centres as the SIMD search takes them: panels (KP / W, D, W) of W (the lane count)
    centres transposed and scaled by -2 (exactly), zero past the last centre, and their squared
    norms (KP,) padded with +inf (a padding centre never wins), both in C's dtype; `norms`: the
    squared norms in float64 where the caller has them."""
    K, D = C.shape
    W = lanes(C.dtype)
    KP = _round_up(K, W)
    padded = np.zeros((KP, D), dtype=C.dtype)
    padded[:K] = -2.0 * C
    panels = np.ascontiguousarray(padded.reshape(KP // W, W, D).transpose(0, 2, 1))
    lane_norms = np.full(KP, np.inf, dtype=C.dtype)
    lane_norms[:K] = (np.asarray(C, dtype=np.float64) ** 2).sum(axis=1) if norms is None else norms
    return panels, lane_norms


def _check_dense(name, A):
    if not isinstance(A, np.ndarray) or A.ndim != 2 or A.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a 2-D float32 or float64 NumPy array, got "
                        f"{getattr(A, 'dtype', type(A).__name__)} with shape {getattr(A, 'shape', None)}")
    if not A.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def nearest_centres(X, C):
    """The nearest centre of every row: (labels int64 (N,), squared distances (N,) in X's dtype).

    X (N, D) and C (K, D): C-contiguous float32/float64 arrays of one dtype. The label is the argmin
    over k of ||c_k||^2 - 2 x . c_k (||x||^2 folded in only for the distance), ties to the lowest k;
    products come in tiles of rows, never as an N x K array."""
    _check_dense("X", X)
    _check_dense("C", C)
    if C.dtype != X.dtype or C.shape[1] != X.shape[1] or C.shape[0] == 0:
        raise ValueError(f"C must be a non-empty (K, {X.shape[1]}) array of X's dtype {X.dtype}, got "
                         f"{C.shape} {C.dtype}")
    labels = np.empty(X.shape[0], dtype=np.int64)
    d2 = np.empty(X.shape[0], dtype=X.dtype)
    c_norms = (C.astype(np.float64) ** 2).sum(axis=1)
    CT, lane_norms = centres_in_lanes(C, c_norms)
    scratch = _tile_scratch(C.shape[0], X.dtype, _workers(n_blocks(X.shape[0])), sparse=False)
    _run(_nearest_rows, n_blocks(X.shape[0]), X, CT, lane_norms, labels, d2, scratch)
    return labels, d2


SUM_PARTS = 8  # row ranges summed apart, then in order: a fixed split, so any thread count agrees


@_jit
def _cluster_sums(X, labels, counts, sums, worker, counter):
    N, P = X.shape[0], sums.shape[0]
    while True:
        p = claim(counter)
        if p >= P:
            break
        for i in range(p * N // P, (p + 1) * N // P):
            k = labels[i]
            counts[p, k] += 1.0
            for d in range(X.shape[1]):
                sums[p, k, d] += X[i, d]


def cluster_sums(X, labels, n_clusters):
    """(counts float64 (K,), sums float64 (K, D)) of the rows of X (N, D), C-contiguous float32/float64,
    by label (integers in [0, K))."""
    _check_dense("X", X)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != (X.shape[0],):
        raise ValueError(f"labels must have shape ({X.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_clusters):
        raise ValueError(f"labels must lie in [0, {n_clusters}), got [{labels.min()}, {labels.max()}]")
    P = max(1, min(SUM_PARTS, X.shape[0] // BLOCK_ROWS))
    counts = np.zeros((P, n_clusters))
    sums = np.zeros((P, n_clusters, X.shape[1]))
    _run(_cluster_sums, P, X, labels, counts, sums)
    return counts.sum(axis=0), sums.sum(axis=0)


@_helper
def _note_labels(labels, best, r0, n, moved, old, n_changed):
    """labels[r0 + r] = best[r] for r < n, every row noted at moved/old[n_changed] and kept as a move
    (n_changed advanced) if its label changed: no branch (mispredicted at every change). Returns the
    new n_changed. Unsigned indices: no wraparound code for negative ones."""
    c = np.uint64(n_changed)
    for r in range(np.uint64(n)):
        i = np.uint64(r0) + r
        o, k = labels[i], np.int32(best[r])
        moved[c] = i
        old[c] = o
        labels[i] = k
        c += np.uint64(k != o)
    return np.int64(c)


@_inline
def _move_sums(X, weights, labels, moved, old, start, stop, sums, counts):
    """The moves moved[start:stop] of dense rows (old labels in `old`, < 0 for none), in order, into
    a block's sums (K, D) and counts (K,): once a tile, after its labels, while its rows are in L1
    (added up after the pass, which read the rows again, they made a 200k x 32 float32 fit 1.2x as
    long)."""
    for j in range(start, stop):
        i, k, o = moved[j], labels[moved[j]], old[j]
        w = weights[i]
        counts[k] += w
        if o >= 0:
            counts[o] -= w
            for d in range(X.shape[1]):
                v = w * X[i, d]
                sums[k, d] += v
                sums[o, d] -= v
        else:
            for d in range(X.shape[1]):
                sums[k, d] += w * X[i, d]


@functools.lru_cache(maxsize=None)
def _kernels(sparse):
    """The kernels over Rows (but the full pass, _full_pass), compiled for dense rows (sparse False)
    or CSR rows (True). `sparse` is a constant of these closures (and part of Numba's cache key for
    them): the other layout's branches of the inlined helpers are pruned before typing, so a fit
    compiles only its own."""

    @_jit
    def yinyang_pass(X, data, indices, indptr, weights, x_norms, C, c_norms, half_sep, members, group_start,
                     group_of, moves, group_moves, eps, shrink, labels, upper, lower, moved, old, changed, sums, counts,
                     worker, counter):
        """One assignment pass with Yinyang bounds (Ding et al., 2015) over rows that have a label;
        the moves noted, and for dense rows added up, per block as full_pass does.

        The centres form G groups (members[group_start[g]:group_start[g+1]]); lower[i, g] bounds the
        distance from x_i to every centre of group g but its own. After the centres move,
        u_i += p_a and lower[i, g] -= max_{k in g} p_k (then shrunk by `shrink` against rounding). A row
        is skipped while u_i < max(min_g lower[i, g], s_a) (also after tightening u_i to the exact
        distance), s_a being half the distance from c_a to its nearest other centre (Hamerly, 2010);
        otherwise only the groups with lower[i, g] <= u_i are scored, with the own centre. The label is
        the argmin of ||c_k||^2 - 2 x . c_k over the scored centres (ties to the lowest k): the others
        are farther than the own centre, so it is the label every distance would give."""
        N = labels.shape[0]
        K = C.shape[0]
        G = group_start.shape[0] - 1
        c_max = _largest(c_norms)
        scored = np.zeros(G, dtype=np.bool_)
        scores = np.empty(K)
        while True:
            b = claim(counter)
            if b >= changed.shape[0]:
                break
            n_changed = 0
            block_moved, block_old = moved[b * BLOCK_ROWS :], old[b * BLOCK_ROWS :]
            for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
                a = labels[i]
                u = upper[i] + moves[a]
                gmin = np.inf
                for g in range(G):
                    low = (lower[i, g] - group_moves[g]) * shrink
                    lower[i, g] = low
                    gmin = min(gmin, low)
                gmin = max(gmin, half_sep[a])
                if u < gmin:
                    upper[i] = u
                    continue
                acc_a = _product(X, data, indices, indptr, sparse, i, C, a)
                s_a = c_norms[a] - 2.0 * acc_a
                margin = eps * (x_norms[i] + c_norms[a])
                u = np.sqrt(max(x_norms[i] + s_a, 0.0) + margin)
                if u < gmin:
                    upper[i] = u
                    continue
                best, s_best = a, s_a
                scores[a] = s_a
                for g in range(G):
                    scored[g] = lower[i, g] <= u
                    if not scored[g]:
                        continue
                    for m in range(group_start[g], group_start[g + 1]):
                        k = members[m]
                        if k == a:
                            continue
                        s = c_norms[k] - 2.0 * _product(X, data, indices, indptr, sparse, i, C, k)
                        scores[k] = s
                        if s < s_best or (s == s_best and k < best):
                            best, s_best = k, s
                # new bounds: scored groups from their centres but the best; the own centre, if it
                # is no longer the best, joins its group's bound
                for g in range(G):
                    if not scored[g]:
                        continue
                    low2 = np.inf
                    for m in range(group_start[g], group_start[g + 1]):
                        k = members[m]
                        if k == best:
                            continue
                        low2 = min(low2, scores[k])
                    lower[i, g] = _low(x_norms[i] + low2, eps * (x_norms[i] + c_max), shrink)
                if best != a:
                    ga = group_of[a]
                    if not scored[ga]:
                        lower[i, ga] = min(lower[i, ga], _low(x_norms[i] + s_a, margin, shrink))
                upper[i] = np.sqrt(max(x_norms[i] + s_best, 0.0) + eps * (x_norms[i] + c_norms[best]))
                if best != a:
                    n_changed = _relabel(labels, i, best, block_moved, block_old, n_changed)
            changed[b] = n_changed
            if not sparse:
                sums[b] = 0.0
                counts[b] = 0.0
                _move_sums(X, weights, labels, block_moved, block_old, 0, n_changed, sums[b], counts[b])

    @_jit
    def bounded_hits(X, data, indices, indptr, x_norms, C, c_norms, half_sep, moves, group_moves, eps, shrink,
                     labels, upper, lower, stride, hits, worker, counter):
        """hits[r]: whether a yinyang_pass with these moves would score row i = r * stride (neither the
        loose nor the tightened bound skips it); changes nothing else."""
        n = hits.shape[0]
        while True:
            b = claim(counter)
            if b >= n_blocks(n):
                break
            for r in range(b * BLOCK_ROWS, min(n, (b + 1) * BLOCK_ROWS)):
                i = r * stride
                a = labels[i]
                gmin = np.inf
                for g in range(lower.shape[1]):
                    gmin = min(gmin, (lower[i, g] - group_moves[g]) * shrink)
                gmin = max(gmin, half_sep[a])
                if upper[i] + moves[a] < gmin:
                    continue
                s_a = c_norms[a] - 2.0 * _product(X, data, indices, indptr, sparse, i, C, a)
                hits[r] = np.sqrt(max(x_norms[i] + s_a, 0.0) + eps * (x_norms[i] + c_norms[a])) >= gmin

    @_jit
    def apply_moves(X, data, indices, indptr, weights, labels, moved, old, changed, part_start, sums, worker,
                    counter):
        """The moves of CSR rows that a pass noted into the weighted sums and counts (sums (K, > D),
        a cluster's count in its last column): each row leaves its old cluster (none when < 0) for
        its label. Part p takes the clusters [part_start[p], part_start[p + 1]); every sum receives
        its rows in row order, whatever the parts and threads. One (K, D) array where sums per block
        (dense rows') would take B K D words: 0.5 GB for 100k rows of 20k features, K = 64, zeroed
        and added up at every pass."""
        count = sums.shape[1] - 1
        while True:
            p = claim(counter)
            if p >= part_start.shape[0] - 1:
                break
            lo, hi = part_start[p], part_start[p + 1]
            for b in range(changed.shape[0]):
                for j in range(b * BLOCK_ROWS, b * BLOCK_ROWS + changed[b]):
                    i, o = moved[j], old[j]
                    for k, w in ((labels[i], weights[i]), (o, -weights[i])):
                        if lo <= k < hi:  # o < 0: a first label, no cluster to leave
                            sums[k, count] += w
                            for q in range(indptr[i], indptr[i + 1]):
                                sums[k, indices[q]] += w * data[q]

    @_jit
    def sq_distances(X, data, indices, indptr, x_norms, C, c_norms, labels, out, worker, counter):
        """out[i, k] = ||x_i - c_k||^2, or with labels (N,) out[i, 0] = ||x_i - c_{labels[i]}||^2
        (direct for dense rows, so a row equal to its centre gives exactly 0)."""
        N = out.shape[0]
        own = labels.shape[0] == N
        while True:
            b = claim(counter)
            if b >= n_blocks(N):
                break
            for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
                for j in range(out.shape[1]):
                    out[i, j] = _sq_distance(sparse, X, data, indices, indptr, i, C, labels[i] if own else j, x_norms,
                                             c_norms)

    @_jit
    def row_sq_norms(X, data, indptr, out, worker, counter):
        """out[i] = ||x_i||^2 in float64."""
        N = out.shape[0]
        while True:
            b = claim(counter)
            if b >= n_blocks(N):
                break
            for i in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS)):
                acc = 0.0
                if sparse:
                    for j in range(indptr[i], indptr[i + 1]):
                        acc += np.float64(data[j]) * data[j]
                else:
                    for d in range(X.shape[1]):
                        acc += np.float64(X[i, d]) * X[i, d]
                out[i] = acc

    return SimpleNamespace(yinyang_pass=yinyang_pass, bounded_hits=bounded_hits, apply_moves=apply_moves,
                           sq_distances=sq_distances, row_sq_norms=row_sq_norms)


@functools.lru_cache(maxsize=None)
def _full_pass(sparse):
    """The full pass over Rows of one layout (`sparse`, a constant, as in _kernels)."""

    @_jit
    def full_pass(X, data, indices, indptr, weights, x_norms, C, CT, c_norms, lane_norms, eps, shrink, labels,
                  bounds, d2, upper, lower, moved, old, changed, sums, counts, scratch, worker, counter):
        """Labels of every row of the blocks the worker claims, from tiles of products
        (nearest_tile; CSR: _sparse_tile_products, _nearest_block), if `bounds` their bounds
        (distance to the nearest centre, and to the next nearest as every group's lower bound,
        widened by the rounding margin), if d2 is not empty (N,) each row's squared distance to its
        centre (summed directly, while the tile is in L1: a pass of its own read X again), and per
        block b its changed[b] moves, in row order, from moved[b * BLOCK_ROWS] on (rows; their old
        labels in `old`): for dense rows added up into the block's sums[b] (K, D) and counts[b]
        (K,), for CSR rows left to apply_moves; the worker's buffers from _tile_scratch."""
        N = labels.shape[0]
        G, acc, best, s1, s2 = _tile_worker(scratch, worker)
        c_max = _largest(c_norms)
        while True:
            b = claim(counter)
            if b >= changed.shape[0]:
                break
            n_changed = b * BLOCK_ROWS  # where the block's next move is noted
            if not sparse:
                sums[b] = 0.0
                counts[b] = 0.0
            # Dense rows one search tile at a time: the labels, moves and distances after the
            # search read its rows while they are in L1 (with tiles of SUB_ROWS rows, 32 KB of
            # float32 at D = 32, a 200k x 32 fit's passes took 1.02x as long, float32 and float64,
            # two threads of Zen 4).
            step = SUB_ROWS if sparse else TILE_ROWS
            for r0 in range(b * BLOCK_ROWS, min(N, (b + 1) * BLOCK_ROWS), step):
                n = min(step, N - r0)
                # The moves read the tile's weights, one cache line a move: cold (1.6 MB at 200k rows)
                # and out of the prefetcher's sight, they cost ~0.5 ms of a 3.5 ms pass that moved 6%
                # of the rows. Requested now, they arrive while the tile is scored; so do the labels.
                prefetch(weights, r0, r0 + n)
                prefetch(labels, r0, r0 + n)
                if sparse:
                    _sparse_tile_products(data, indices, indptr, r0, n, CT, G, acc)
                    _nearest_block(G, n, c_norms, best, s1, s2)
                else:
                    nearest_tile(X, r0, n, CT, lane_norms, best, s1, s2)
                if bounds:
                    _set_bounds(x_norms, r0, n, s1, s2, eps * c_max, eps, shrink, upper, lower)
                # A compiled helper of its own: inlined into this pass, which spills its array
                # pointers, the loop took twice the instructions a row (Zen 4, one thread: 9% of the
                # pass against 6%; passes 1.02-1.07x as long, float64 and float32).
                first = n_changed
                n_changed = _note_labels(labels, best, r0, n, moved, old, n_changed)
                if not sparse:
                    _move_sums(X, weights, labels, moved, old, first, n_changed, sums[b], counts[b])
                if d2.shape[0]:
                    for r in range(n):
                        d2[r0 + r] = _sq_distance(sparse, X, data, indices, indptr, r0 + r, C, best[r], x_norms, c_norms)
            changed[b] = n_changed - b * BLOCK_ROWS

    return full_pass


_NO_NORMS = np.empty(0, dtype=np.float64)


class Rows:
    """A dense C-contiguous array or a CSR matrix (anything with data/indices/indptr) as the
    kernels take it, with the rows' squared norms (float64 (N,): given, or computed at their first
    use)."""

    def __init__(self, X, norms=None):
        self.sparse = hasattr(X, "indptr")
        if self.sparse:
            self.dtype = X.data.dtype
            self.X = np.empty((0, 1), dtype=self.dtype)
            self.data, self.indices, self.indptr = X.data, X.indices, X.indptr
        else:
            self.dtype = X.dtype
            self.X = X
            self.data = np.empty(0, dtype=self.dtype)
            self.indices = self.indptr = np.zeros(1, dtype=np.int32)
        self.n_rows, self.n_features = X.shape
        self.kernels = _kernels(self.sparse)
        self._norms = norms

    @property
    def norms(self):
        if self._norms is None:
            self._norms = _aligned(self.n_rows, np.float64)
            _run(self.kernels.row_sq_norms, n_blocks(self.n_rows), self.X, self.data, self.indptr, self._norms)
        return self._norms

    def pass_norms(self, bounds):
        """The norms as a pass reads them: dense rows only for bounds (a pass of its own where
        none were given, which predict and transform never need), CSR rows always."""
        return self.norms if bounds or self.sparse else _NO_NORMS

    @property
    def shape(self):
        return (self.n_rows, self.n_features)

    def args(self):
        return self.X, self.data, self.indices, self.indptr

    def centres(self, C):
        """(C, ||c_k||^2) in the kernels' layout: C (K, D) in the rows' dtype, the norms in float64."""
        Cd = np.ascontiguousarray(C, dtype=self.dtype)
        return Cd, (np.asarray(Cd, dtype=np.float64) ** 2).sum(axis=1)

    def search_centres(self, Cd, c_norms):
        """The centres as the full pass searches them, (CT, lane norms), from Rows.centres' pair:
        for dense rows the panels and lane norms of centres_in_lanes; for CSR rows C transposed (D,
        K) and no lane norms."""
        if self.sparse:
            return np.ascontiguousarray(Cd.T), np.empty(0, dtype=self.dtype)
        return centres_in_lanes(Cd, c_norms)

    def sq_distances(self, C):
        """(N, K) squared distances to the centres C."""
        return self._sq_distances(C, np.empty(0, dtype=np.int32), len(C))

    def own_sq_distances(self, C, labels):
        """(N,) squared distances to each row's own centre C[labels]."""
        return self._sq_distances(C, np.asarray(labels, dtype=np.int32), 1)[:, 0]

    def _sq_distances(self, C, labels, width):
        Cd, c_norms = self.centres(C)
        out = _aligned((self.n_rows, width), np.float64)
        _run(self.kernels.sq_distances, n_blocks(self.n_rows), *self.args(), self.pass_norms(False), Cd, c_norms,
             labels, out)
        return out

    def rows(self, index):
        """Dense float64 copies of the rows at `index`."""
        if not self.sparse:
            return np.asarray(self.X[index], dtype=np.float64)
        out = np.zeros((len(index), self.n_features))
        for r, i in enumerate(index):
            lo, hi = self.indptr[i], self.indptr[i + 1]
            out[r, self.indices[lo:hi]] = self.data[lo:hi]
        return out


class LloydState:
    """Labels, Yinyang bounds and the running weighted sums of one k-means run over Rows."""

    def __init__(self, rows, weights, n_clusters, bounds=True):
        self.rows = rows
        self.weights = weights
        N, K, D = rows.n_rows, n_clusters, rows.n_features
        self.labels = _aligned(N, np.int32)
        self.labels.fill(-1)
        self.n_groups = n_groups(K)
        self.bounded = bounds and N >= BOUNDED_MIN_ROWS  # bounds=False: one pass, whose bounds would go unread
        # The bounds, made by the first full pass that sets them (many fits never do).
        self.upper = _aligned(0, np.float64)
        self.lower = _aligned((0, self.n_groups), np.float32)
        # A cluster's sums and count (its last column) on whole cache lines of their own: apply_moves'
        # threads write clusters side by side. The kernel takes the array whole (C-contiguous).
        self._sums_counts = _aligned((K, _round_up(D + 1, 8)), np.float64, zero=True)
        self.sums, self.counts = self._sums_counts[:, :D], self._sums_counts[:, -1]
        B = n_blocks(N)
        self._n_workers = _workers(B)
        self._scratch = _tile_scratch(K, rows.dtype, self._n_workers, rows.sparse)  # the full pass's, made once
        self._moved = _aligned(N, np.int64)  # a pass's moves, noted per block
        self._old = _aligned(N, np.int32)
        self._changed = np.empty(B, dtype=np.int64)
        # Dense rows: each block's changes of the sums and counts, on cache lines of their own
        # (padding rows): blocks side by side go to different threads. CSR rows: none (apply_moves).
        Kp = 0 if rows.sparse else K
        self._block_sums = _aligned((B if Kp else 0, _round_up(Kp, 8 // math.gcd(D, 8)), D), np.float64)
        self._block_counts = _aligned((B if Kp else 0, _round_up(Kp, 8)), np.float64)
        parts = min(K, self._n_workers)  # apply_moves' parts, ranges of clusters
        self._part_start = np.array([p * K // parts for p in range(parts + 1)], dtype=np.int64)
        # The scores' rounding margin, eps (||x||^2 + max ||c||^2): D roundings of partial sums up to
        # ||c||^2 + 2 |x . c| (the SIMD search sums from ||c||^2) stay within it for D <= 64.
        self.eps = 16.0 * np.finfo(rows.dtype).eps * np.sqrt(D)
        self.shrink = 1.0 - 2.0**-20
        self.groups = None
        self._fresh = False  # whether the bounds hold for the labels and the centres of the last pass
        self._wait = 0  # full passes before the bounds are set again
        self._backoff = 1
        # Of the last pass's labels: 1 before the first pass, which gives every row its first label
        # and so sets no bounds (on overlapping or separated clusters alike, bounds from the first
        # pass made fits 1.00-1.17x as long, 200k x 32, K=16).
        self._changed_share = 1.0
        self.d2 = None

    def _group(self, C):
        """Groups of centres near each other: contiguous runs along the centres' main axis."""
        K, G = C.shape[0], self.n_groups
        centred = C - C.mean(axis=0)
        axis = np.linalg.svd(centred, full_matrices=False)[2][0] if K > 1 else np.zeros(C.shape[1])
        members = np.argsort(centred @ axis, kind="stable").astype(np.int64)
        group_start = np.array([g * K // G for g in range(G + 1)], dtype=np.int64)
        group_of = np.empty(K, dtype=np.int64)
        for g in range(G):
            group_of[members[group_start[g] : group_start[g + 1]]] = g
        self.groups = members, group_start, group_of

    def assign(self, C, moves, distances=False):
        """Assign every row to its nearest centre in C (moves: each centre's move since the last
        call); returns the number of rows whose label changed. Sums and counts follow. With
        `distances`, a full pass also keeps each row's squared distance to its centre in `d2`
        (None after any other pass).

        A full pass (full_pass) scores every row from tiles of products and, when the next pass will
        try them, sets the bounds. A pass after that uses the bounds (yinyang_pass) if a sample
        predicts they skip most rows. BLAS runs on one thread throughout: the host's small products
        here (grouping, separations) gain nothing from threads, while a threaded call leaves
        OpenBLAS's threads spinning beside the workers, which then ran at half speed (10.3 against
        5.7 ms a pass, 200k x 32, K=16, 2 cores)."""
        self.d2 = None
        with blas_single_thread():
            return self._assign(C, moves, distances)

    def _assign(self, C, moves, distances):
        rows = self.rows
        C = np.asarray(C, dtype=np.float64)
        Cd, c_norms = rows.centres(C)
        if self._fresh:
            n_changed = self._bounded_pass(C, Cd, c_norms, np.asarray(moves, dtype=np.float64))
            if n_changed >= 0:
                return self._note(n_changed)
        elif self._wait:
            self._wait -= 1
        self._fresh = (self.bounded and self._wait == 0
                       and self._changed_share <= BOUNDED_MAX_SHARE * CHANGED_PER_SCORED)
        if self._fresh and not self.upper.shape[0]:
            self.upper = _aligned(rows.n_rows, np.float64)
            self.lower = _aligned((rows.n_rows, self.n_groups), np.float32)
        CT, lane_norms = rows.search_centres(Cd, c_norms)
        full_pass = _full_pass(rows.sparse)
        d2 = _aligned(rows.n_rows if distances else 0, np.float64)
        _run(full_pass, self._changed.shape[0], *rows.args(), self.weights, rows.pass_norms(self._fresh), Cd, CT,
             c_norms, lane_norms, self.eps, self.shrink, self.labels, self._fresh, d2, self.upper, self.lower,
             self._moved, self._old, self._changed, self._block_sums, self._block_counts, self._scratch,
             n_workers=self._n_workers)
        self.d2 = d2 if distances else None
        return self._note(self._apply_moves())

    def _note(self, n_changed):
        self._changed_share = n_changed / self.rows.n_rows
        return n_changed

    def _bounded_pass(self, C, Cd, c_norms, moves):
        """A yinyang_pass, if the sample predicts it scores few rows (then the number of changed
        labels); else -1, and full passes for a while."""
        rows = self.rows
        if self.groups is None:  # any grouping: the full pass set every group's bound alike
            self._group(C)
        members, group_start, group_of = self.groups
        group_moves = np.array([moves[members[group_start[g] : group_start[g + 1]]].max()
                                for g in range(self.n_groups)])
        half_sep = _half_separations(C, self.eps)
        hits = np.zeros((rows.n_rows + SAMPLE_STRIDE - 1) // SAMPLE_STRIDE, dtype=np.bool_)
        _run(rows.kernels.bounded_hits, n_blocks(hits.shape[0]), *rows.args(), rows.norms, Cd, c_norms, half_sep, moves, group_moves,
             self.eps, self.shrink, self.labels, self.upper, self.lower, SAMPLE_STRIDE, hits)
        if hits.mean() > BOUNDED_MAX_SHARE:
            self._fresh = False
            self._wait = self._backoff
            self._backoff = min(2 * self._backoff, MAX_WAIT)
            return -1
        self._backoff = 1
        _run(rows.kernels.yinyang_pass, self._changed.shape[0], *rows.args(), self.weights, rows.norms, Cd, c_norms,
             half_sep, members, group_start, group_of, moves, group_moves, self.eps, self.shrink, self.labels,
             self.upper, self.lower, self._moved, self._old, self._changed, self._block_sums, self._block_counts)
        return self._apply_moves()

    def _apply_moves(self):
        """The last pass's moves into the sums and counts; returns their number."""
        n_changed = int(self._changed.sum())
        if not n_changed:
            return 0
        if self.rows.sparse:
            _run(self.rows.kernels.apply_moves, self._part_start.shape[0] - 1, *self.rows.args(), self.weights,
                 self.labels, self._moved, self._old, self._changed, self._part_start, self._sums_counts)
        else:  # blocks in order (NumPy adds along a leading axis one block at a time): any thread count
            K = self.counts.shape[0]
            self.sums += self._block_sums.sum(axis=0)[:K]
            self.counts += self._block_counts.sum(axis=0)[:K]
        return n_changed


def _half_separations(C, eps):
    """s_k = half the distance from c_k to its nearest other centre, rounded down."""
    if C.shape[0] == 1:
        return np.full(1, np.inf)
    norms = (C**2).sum(axis=1)
    total = norms[:, None] + norms[None, :]
    gaps = np.maximum(total - 2.0 * C @ C.T - eps * total, 0.0)
    np.fill_diagonal(gaps, np.inf)
    return 0.5 * np.sqrt(gaps.min(axis=1))


@_jit
def _centre(X, shift, out, write, norms, sums, sq_sums, worker, counter):
    while True:
        b = claim(counter)
        if b >= sq_sums.shape[0]:
            break
        s, q = sums[b], sq_sums[b]
        for i in range(b * BLOCK_ROWS, min(X.shape[0], (b + 1) * BLOCK_ROWS)):
            acc = 0.0
            for d in range(X.shape[1]):
                v = np.float64(X[i, d] - shift[d])
                acc += v * v
                s[d] += v
                q[d] += v * v
            norms[i] = acc
            if write:  # a loop of its own: out may be X, which kept the loop above from vectorising
                for d in range(X.shape[1]):
                    out[i, d] = X[i, d] - shift[d]


def centre(X, shift, out):
    """out = X - shift (a dense array; shift in its dtype; out: X itself, a new array of X's shape
    and dtype, or None to write nothing), in the same read: each row's squared norm (N,) and each
    column's sum and sum of squares (D,) after the shift, in float64 (blocks summed in order). One
    pass over X where a copy, a NumPy subtraction, the column sums and the row norms took four."""
    norms = _aligned(X.shape[0], np.float64)
    # Each block's sums on cache lines of their own (rows padded; the kernel reads D of them):
    # blocks side by side go to different threads, and a line that two of them wrote at every row
    # held the pass to half its one-thread speed.
    D = X.shape[1]
    sums, sq_sums = _aligned((2, n_blocks(X.shape[0]), _round_up(D, 8)), np.float64, zero=True)
    _run(_centre, sq_sums.shape[0], X, np.asarray(shift, dtype=X.dtype), X if out is None else out,
         out is not None, norms, sums, sq_sums)
    return norms, sums.sum(axis=0)[:D], sq_sums.sum(axis=0)[:D]
