"""Dask arrays as a data source: each block's statistics (or per-row answers) are computed by a
task on the Dask workers of the current client (Dask's default scheduler without one); the
client sums the blocks' statistics in block order and runs the M-step.

Tasks receive only the block and plain arrays (the kernel parameters), hold no state between
passes, and are recomputed by Dask when a worker dies, so a lost worker cannot change the fit.
"""

from functools import partial

import numpy as np

from fastlvm.data.base import Source, _check_shape, _select_rows, check_chunk, fit_dtype


def _import_dask():
    try:
        import dask
        import dask.array
    except ImportError as e:  # pragma: no cover - dask is an optional extra
        raise ImportError("Dask input needs the 'dask' extra: pip install 'fastlvm[dask]'") from e
    return dask


def _identity(x):
    return x


def _apply(fn, row_offset, block, n_features, dtype):
    """fn(row_offset, block) after validating the block (errors name the global row)."""
    return fn(row_offset, check_chunk(np.asarray(block), row_offset, n_features, dtype))


def _apply_rows(fn, n_features, dtype, out_shape, out_dtype, block, block_info=None):
    """map_blocks body: fn's per-row answer for one block (empty blocks give empty answers)."""
    if block.shape[0] == 0:
        return np.empty((0,) + out_shape, dtype=out_dtype)
    offset = block_info[0]["array-location"][0][0]
    return fn(offset, check_chunk(block, offset, n_features, dtype))


class DaskSource(Source):
    """The rows of a 2-D dask.array (rechunked to whole rows), one task per non-empty block."""

    def __init__(self, X):
        _import_dask()
        if X.ndim != 2:
            raise ValueError(f"Expected 2D array, got {X.ndim}D dask array instead.")
        self.dtype = fit_dtype(X.dtype)
        if any(np.isnan(c) for c in X.chunks[0]):
            X = X.compute_chunk_sizes()
        if len(X.chunks[1]) > 1:
            X = X.rechunk({1: -1})
        self.n_rows, self.n_features = (int(v) for v in X.shape)
        _check_shape(self.n_rows, self.n_features)
        self.array = X
        self.offsets = np.concatenate([[0], np.cumsum(X.chunks[0])[:-1]]).astype(np.int64)

    def _blocks(self):
        """(row offset, rows, delayed block) of the non-empty blocks."""
        blocks = self.array.to_delayed().ravel()
        return [(int(o), n, b) for o, n, b in zip(self.offsets, self.array.chunks[0], blocks) if n > 0]

    def map(self, fn, chunk_rows):
        """fn(row offset, block) on the workers, for every block (fn loops over chunk_rows itself);
        the results come back in block order."""
        dask = _import_dask()
        shared = dask.delayed(_identity)(fn)  # one copy of fn (and its arrays) in the graph
        tasks = [dask.delayed(_apply)(shared, o, b, self.n_features, self.dtype) for o, _, b in self._blocks()]
        return list(dask.compute(*tasks))

    def take(self, rows, chunk_rows):
        dask = _import_dask()
        tasks = []
        for o, n, b in self._blocks():
            lo, hi = np.searchsorted(rows, [o, o + n])
            if hi > lo:
                tasks.append(dask.delayed(_apply)(partial(_select_rows, rows[lo:hi]), o, b, self.n_features,
                                                  self.dtype))
        return np.concatenate(dask.compute(*tasks))

    def head(self):
        return check_chunk(np.asarray(self.array[:1].compute()), 0, self.n_features, self.dtype)

    def map_rows(self, fn, width, out_dtype):
        """A lazy dask array of fn(row offset, block) per block: (N,) when width is None, else (N, width)."""
        X = self.array
        out_shape = () if width is None else (width,)
        body = partial(_apply_rows, fn, self.n_features, self.dtype, out_shape, out_dtype)
        if width is None:
            return X.map_blocks(body, drop_axis=1, chunks=(X.chunks[0],), dtype=out_dtype)
        return X.map_blocks(body, chunks=(X.chunks[0], (width,)), dtype=out_dtype)
