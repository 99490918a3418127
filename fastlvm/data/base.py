"""What every data source is: a row count, a width, an arithmetic dtype and passes over row chunks,
with the checks a chunk gets as it is read (shape, dtype, finite values, naming the global row)."""

import numpy as np

from fastlvm._validation import first_non_finite_row


def iter_chunks(X, chunk_rows, dtype):
    """(row offset, C-contiguous chunk of dtype) over the rows of an array-like X."""
    N = X.shape[0]
    for start in range(0, N, chunk_rows):
        chunk = np.ascontiguousarray(X[start : start + chunk_rows], dtype=dtype)
        yield start, chunk


def fit_dtype(dtype):
    """The arithmetic dtype for data of `dtype`: float32 stays, other numbers become float64."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise ValueError(f"Complex data not supported: X has dtype {dtype}.")
    if dtype.kind not in "biuf":
        raise ValueError(f"X must hold numbers, got dtype {dtype}.")
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)


def check_chunk(chunk, row_offset, n_features, dtype):
    """The chunk as a C-contiguous array of `dtype` after checking its shape and values; errors
    name the chunk's (or the offending row's) global row index."""
    if chunk.ndim != 2:
        width = "features" if n_features is None else n_features
        raise ValueError(f"The chunk at row {row_offset} is {chunk.ndim}-D; expected 2-D arrays of "
                         f"shape (rows, {width}).")
    if chunk.shape[0] == 0:
        raise ValueError(f"The chunk at row {row_offset} is empty; every chunk must hold at least one row.")
    if chunk.shape[1] != n_features:
        raise ValueError(f"The chunk at row {row_offset} has {chunk.shape[1]} features, expected {n_features}.")
    out = np.ascontiguousarray(chunk, dtype=dtype)
    bad = first_non_finite_row(out)
    if bad is not None:
        raise ValueError(f"Input X contains NaN or infinity (first at row {row_offset + bad}).")
    return out


def _check_shape(N, D):
    if N < 1:
        raise ValueError(f"Found array with 0 sample(s) (shape=({N}, {D})) while a minimum of 1 is required.")
    if D < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape=({N}, {D})) while a minimum of 1 is required.")


def _select_rows(rows, offset, chunk):
    """The rows of `chunk` whose global indices (sorted) are listed in `rows`."""
    lo, hi = np.searchsorted(rows, [offset, offset + chunk.shape[0]])
    return chunk[rows[lo:hi] - offset]


class Source:
    """What EM needs of its data: the shape, the arithmetic dtype and passes over row chunks."""

    n_rows: int
    n_features: int
    dtype: np.dtype

    @property
    def shape(self):
        return (self.n_rows, self.n_features)

    def map(self, fn, chunk_rows):
        """fn(row_offset, chunk) for consecutive chunks of at most chunk_rows rows, in row order."""
        return (fn(start, chunk) for start, chunk in self.chunks(chunk_rows))

    def take(self, rows, chunk_rows):
        """The rows with the given sorted global indices, as one array (one pass)."""
        return np.concatenate(list(self.map(lambda offset, chunk: _select_rows(rows, offset, chunk), chunk_rows)))

    def head(self):
        """The first row, shape (1, n_features)."""
        return next(iter(self.chunks(1)))[1]
