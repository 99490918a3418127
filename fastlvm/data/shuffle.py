"""Shuffled passes over data sources, for stochastic-gradient fits (the VAE): rows are read in
blocks, a window of blocks at a time, so memory stays flat in N.

An epoch's order is a pure function of (seed, epoch): the blocks of a row-sliceable source are
visited in a random order, ``window_blocks`` of them are read together and their rows permuted,
and batches are cut from the concatenation of the windows (a batch may span two windows). A
stream (a chunk callable) can only be read in its own order: its windows are consecutive chunks,
permuted within. Rows can be split off by a fixed random rule (``row_split``) that depends on the
row's global index only, so the split is the same whatever the block size or the source.
"""

import numpy as np

from fastlvm.data.sources import ArraySource


def epoch_generator(seed, *keys):
    """A NumPy Generator that is a pure function of (seed, keys)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, keys)])))


def _splitmix64(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_split(seed, rows, fraction):
    """True for the rows (global indices) that fall in the held-out fraction: a hash of
    (seed, row) below fraction * 2^64, so each row is held out with probability ``fraction``."""
    rows = np.asarray(rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(rows ^ _splitmix64(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _windows(source, seed, epoch, block_rows, window_blocks):
    """(global rows, rows) of consecutive windows, each permuted, in the epoch's order."""
    rng = epoch_generator(seed, epoch)
    if isinstance(source, ArraySource):
        n_blocks = -(-source.n_rows // block_rows)
        order = rng.permutation(n_blocks)
        for w in range(0, n_blocks, window_blocks):
            starts = np.sort(order[w : w + window_blocks]) * block_rows
            parts = [_block(source, int(a), block_rows) for a in starts]
            yield _permuted(rng, parts)
        return
    parts, held = [], 0
    window_rows = block_rows * window_blocks
    for offset, chunk in source.chunks(block_rows):
        parts.append((np.arange(offset, offset + chunk.shape[0], dtype=np.int64), chunk))
        held += chunk.shape[0]
        if held >= window_rows:
            yield _permuted(rng, parts)
            parts, held = [], 0
    if parts:
        yield _permuted(rng, parts)


def _block(source, start, block_rows):
    """The block of rows at ``start`` as one (global rows, rows) part, validated as read."""
    X = source.read(start, start + block_rows)
    return np.arange(start, start + X.shape[0], dtype=np.int64), X


def _permuted(rng, parts):
    rows = np.concatenate([p[0] for p in parts])
    X = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    perm = rng.permutation(rows.shape[0])
    return rows[perm], X[perm]


def shuffled_batches(source, batch_size, seed, epoch, block_rows, window_blocks=16, keep=None):
    """(global rows, rows) batches of ``batch_size`` rows (the last may be smaller) in a shuffled
    order that is a pure function of (seed, epoch). ``keep(global rows)`` -> bool mask drops rows
    (e.g. a validation split) before batching."""
    carry_rows, carry_X = None, None
    for rows, X in _windows(source, seed, epoch, block_rows, window_blocks):
        if keep is not None:
            mask = keep(rows)
            rows, X = rows[mask], X[mask]
        if carry_rows is not None and carry_rows.shape[0]:
            rows, X = np.concatenate([carry_rows, rows]), np.concatenate([carry_X, X])
        n_full = rows.shape[0] // batch_size * batch_size
        for a in range(0, n_full, batch_size):
            yield rows[a : a + batch_size], X[a : a + batch_size]
        carry_rows, carry_X = rows[n_full:], X[n_full:]
    if carry_rows is not None and carry_rows.shape[0]:
        yield carry_rows, carry_X
