"""Data sources: anything that yields row chunks. Every pass of a fit is one loop over chunks.

A source knows n_rows, n_features and dtype (the arithmetic dtype of a fit: float32 data stays
float32, any other numeric dtype becomes float64), and `map(fn, chunk_rows)` returns
fn(row_offset, chunk) for consecutive chunks, in row order. The kinds:

- ArraySource: anything with a 2-D shape and a NumPy dtype that can be sliced by rows
  (ndarray, np.memmap, h5py and Zarr datasets, ...). One chunk is read at a time.
- StreamSource: a callable returning a fresh iterable of 2-D arrays on every call (data made on
  the fly; EM makes several passes, so each call must yield the same rows again).
- DaskSource (fastlvm.data.dask_source): one task per block, run on the Dask workers.

Chunks are validated as they are read (shape, dtype, finite values, naming the global row) except
for in-memory arrays that were validated whole at the public boundary (`trusted`).
"""

import sys

import numpy as np

from fastlvm.data.base import Source, _check_shape, check_chunk, fit_dtype


class ArraySource(Source):
    """Rows of anything sliceable by rows: X[a:b] is read for one chunk at a time."""

    def __init__(self, X, trusted=False):
        shape = tuple(X.shape)
        if len(shape) != 2:
            raise ValueError(f"Expected 2D array, got {len(shape)}D array instead (shape={shape}).")
        _check_shape(*shape)
        self.array = X
        self.trusted = trusted
        self.n_rows, self.n_features = shape
        self.dtype = fit_dtype(X.dtype)

    def chunks(self, chunk_rows):
        for a in range(0, self.n_rows, chunk_rows):
            yield a, self.read(a, a + chunk_rows)

    def read(self, start, stop):
        """Rows start:stop as a C-contiguous array of the source's dtype, checked unless trusted."""
        raw = self.array[start:stop]
        if self.trusted:
            return np.ascontiguousarray(raw, dtype=self.dtype)
        return check_chunk(np.asarray(raw), start, self.n_features, self.dtype)

    def take(self, rows, chunk_rows):
        if self.trusted:
            return np.ascontiguousarray(self.array[rows], dtype=self.dtype)
        return super().take(rows, chunk_rows)


class StreamSource(Source):
    """Rows yielded by `make_chunks()`, a callable returning a fresh iterable of 2-D arrays per pass.

    The first pass (at construction) learns the row count, width and dtype and validates every
    chunk; later passes must yield the same number of rows, of the same width and dtype."""

    def __init__(self, make_chunks):
        self.make_chunks = make_chunks
        self.n_rows = self.n_features = self.dtype = self._raw_dtype = None
        n = 0
        for offset, chunk in self.chunks(sys.maxsize):
            n = offset + chunk.shape[0]
        if n == 0:
            raise ValueError("The chunk source yielded no rows.")
        self.n_rows = n

    def chunks(self, chunk_rows):
        offset = 0
        iterable = self.make_chunks()
        try:
            iterator = iter(iterable)
        except TypeError:
            raise TypeError("A chunk source must be a callable returning an iterable of 2-D arrays, but it "
                            f"returned {type(iterable).__name__}.") from None
        for raw in iterator:
            chunk = np.asarray(raw)
            if self._raw_dtype is None:  # the first chunk of the first pass sets width and dtype
                if chunk.ndim == 2:
                    self.n_features = chunk.shape[1]
                self.dtype = fit_dtype(chunk.dtype)
                self._raw_dtype = chunk.dtype
            elif chunk.dtype != self._raw_dtype:
                raise ValueError(f"The chunk at row {offset} has dtype {chunk.dtype}, but the first chunk had "
                                 f"{self._raw_dtype}; every chunk must have the same dtype.")
            chunk = check_chunk(chunk, offset, self.n_features, self.dtype)
            for a in range(0, chunk.shape[0], chunk_rows):
                yield offset + a, chunk[a : a + chunk_rows]
            offset += chunk.shape[0]
        if self.n_rows is not None and offset != self.n_rows:
            raise ValueError(f"The chunk source yielded {offset} rows on this pass but {self.n_rows} on the first; "
                             "it must return a fresh iterable with the same rows on every call.")


def is_dask_array(X):
    """True for a dask.array.Array (without importing Dask when it was never imported)."""
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(X, da.Array)


def _row_sliceable(X):
    """Duck-typed out-of-core arrays (h5py, Zarr, ...): a shape, a NumPy dtype and indexing."""
    if isinstance(X, np.ndarray) or not all(hasattr(X, a) for a in ("shape", "dtype", "__getitem__")):
        return False
    if not isinstance(X.dtype, np.dtype) or "scipy.sparse" in sys.modules and sys.modules["scipy.sparse"].issparse(X):
        return False
    return True


def as_source(X):
    """A streaming source for X, or None when X is ordinary in-memory data (validated whole)."""
    if isinstance(X, Source):
        return X
    if is_dask_array(X):
        from fastlvm.data.dask_source import DaskSource

        return DaskSource(X)
    if isinstance(X, np.memmap) or _row_sliceable(X):
        return ArraySource(X)
    if callable(X) and not hasattr(X, "shape"):
        return StreamSource(X)
    return None
