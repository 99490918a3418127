"""The VAE's view of its data: training batches in a shuffled order and ordered blocks of rows for
evaluation, as torch tensors of the model's dtype on its device, each with its rows' global
indices (the noise of a row is keyed by its index).

- ``InMemory``: a NumPy array or torch tensor, validated whole at the public boundary. A batch is
  one ``index_select`` of a slice of the epoch's permutation into a preallocated buffer: no
  per-row ``__getitem__``, no collate.
- ``Streamed``: a ``fastlvm.data`` source (memmap, h5py/Zarr dataset, chunk callable, or a
  DataLoader read as one), read in shuffled windows of blocks (``fastlvm.data.shuffle``) so
  memory stays flat in N; chunks are checked as they are read.

The held-out (validation) rows are chosen by ``fastlvm.data.shuffle.row_split`` from the row's
global index, the same rule for every kind of input.
"""

import sys
import warnings

import numpy as np
import torch

from fastlvm.data.shuffle import epoch_generator, row_split, shuffled_batches
from fastlvm.data.sources import StreamSource, as_source

# Rows read together from an out-of-core source: blocks of ~4 MB, windows of 16 blocks.
BLOCK_BYTES = 4 << 20
WINDOW_BLOCKS = 16

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def shard(n, rank, world):
    """The [lo, hi) of rank's contiguous share of n rows."""
    return n * rank // world, n * (rank + 1) // world


def check_unit_interval(X, rows=None):
    """Bernoulli data must lie in [0, 1]; names the first row (its global index from ``rows``)
    that does not."""
    for start in range(0, X.shape[0], 65536):
        block = X[start : start + 65536]
        bad = ((block < 0) | (block > 1)).any(1)
        if bool(bad.any()):
            i = start + int(bad.nonzero()[0][0])
            row = i if rows is None else int(rows[i])
            raise ValueError(f"likelihood='bernoulli' needs data in [0, 1]; row {row} has values in "
                             f"[{float(X[i].min())}, {float(X[i].max())}] (use likelihood='gaussian' or "
                             "rescale the data).")


def _tensor_of(A):
    """torch.from_numpy(A), also for read-only arrays (memmaps opened 'r'): they are only read."""
    A = np.ascontiguousarray(A)
    if A.flags.writeable:
        return torch.from_numpy(A)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(A)


def _dataloader_chunks(loader):
    """A chunk callable over a DataLoader's batches (the first tensor of tuple/list items)."""

    def chunks():
        for item in loader:
            if isinstance(item, (tuple, list)):
                item = item[0]
            if isinstance(item, dict):
                raise TypeError("a DataLoader given to VAE.fit must yield tensors or (tensor, ...) tuples, not dicts")
            yield item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)

    return chunks


def as_vae_data(X, dtype, device, bernoulli, n_features=None):
    """InMemory or Streamed data for X, validated (finite values naming the row, width, the
    Bernoulli range); n_features, when given, is the width X must have."""
    dtype = _TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    source = None
    if isinstance(X, torch.utils.data.DataLoader):
        sampler = X.sampler
        source = StreamSource(_dataloader_chunks(X))
        source.random_order = isinstance(sampler, torch.utils.data.RandomSampler)
    elif not isinstance(X, torch.Tensor):
        source = as_source(X)
    if source is not None:
        if n_features is not None and source.n_features != n_features:
            raise ValueError(f"X has {source.n_features} features, but VAE is expecting {n_features} features "
                             "as input.")
        return Streamed(source, dtype, device, bernoulli)
    return InMemory(_in_memory(X, n_features), dtype, device, bernoulli)


def _in_memory(X, n_features):
    """X as a 2-D float tensor (a view of NumPy memory where possible), checked whole."""
    if isinstance(X, torch.Tensor):
        if X.dtype.is_complex or X.dtype == torch.bool:
            raise ValueError(f"X must hold real numbers, got dtype {X.dtype}.")
        T = X.detach()
        if not T.dtype.is_floating_point:
            T = T.to(torch.float64)
    else:
        if "scipy.sparse" in sys.modules and sys.modules["scipy.sparse"].issparse(X):
            raise TypeError("VAE does not take sparse input; pass a dense array.")
        A = np.asarray(X)
        if A.dtype.kind not in "biuf":
            raise ValueError(f"X must hold numbers, got dtype {A.dtype}.")
        if A.dtype.kind != "f" or A.dtype == np.float16:
            A = A.astype(np.float64)
        T = _tensor_of(A)
    if T.dim() != 2:
        raise ValueError(f"Expected 2D array, got {T.dim()}D array instead (shape={tuple(T.shape)}). Reshape your "
                         "data with X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for a single row.")
    N, D = T.shape
    if N < 1:
        raise ValueError(f"Found array with 0 sample(s) (shape=({N}, {D})) while a minimum of 1 is required.")
    if D < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape=({N}, {D})) while a minimum of 1 is required.")
    if n_features is not None and D != n_features:
        raise ValueError(f"X has {D} features, but VAE is expecting {n_features} features as input.")
    finite = torch.isfinite(T).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.argmin(finite.to(torch.uint8)))
        raise ValueError(f"Input X contains NaN or infinity (first at row {row}).")
    return T


class InMemory:
    """Rows of a tensor (CPU or the model's device)."""

    streamed = False

    def __init__(self, X, dtype, device, bernoulli):
        if bernoulli:
            check_unit_interval(X)
        self.X, self.dtype, self.device = X, dtype, torch.device(device)
        self.n_rows, self.n_features = X.shape
        self._direct = X.dtype == dtype and X.device == self.device
        self._buffers = {}

    def _take(self, rows):
        """Rows (np.int64 indices) as a tensor of the model's dtype on its device."""
        index = torch.from_numpy(rows).to(self.X.device)
        n = rows.shape[0]
        buf = self._buffers.get(n)
        if buf is None:
            buf = self._buffers[n] = torch.empty((n, self.n_features), dtype=self.X.dtype, device=self.X.device)
        torch.index_select(self.X, 0, index, out=buf)
        return buf if self._direct else buf.to(device=self.device, dtype=self.dtype)

    def split(self, seed, fraction):
        """(training rows, held-out rows) as sorted int64 arrays."""
        rows = np.arange(self.n_rows, dtype=np.int64)
        held = row_split(seed, rows, fraction) if fraction > 0 else np.zeros(self.n_rows, dtype=bool)
        self.train_rows, self.held_rows = rows[~held], rows[held]
        return self.train_rows.shape[0], self.held_rows.shape[0]

    def train_batches(self, seed, epoch, batch_size, rank, world):
        """(x, global rows) of this rank's share of each global batch, and the global batch size."""
        rows = self.train_rows
        order = rows[epoch_generator(seed, epoch).permutation(rows.shape[0])]
        for a in range(0, order.shape[0], batch_size):
            batch = order[a : a + batch_size]
            lo, hi = shard(batch.shape[0], rank, world)
            mine = batch[lo:hi]
            yield self._take(mine), mine, batch.shape[0]

    def blocks(self, which, block_rows):
        """(x, global rows) in row order over 'all', 'train' or 'held' rows."""
        if which == "all":
            for a in range(0, self.n_rows, block_rows):
                x = self.X[a : a + block_rows]
                yield x.to(device=self.device, dtype=self.dtype), np.arange(a, a + x.shape[0], dtype=np.int64)
            return
        rows = self.train_rows if which == "train" else self.held_rows
        for a in range(0, rows.shape[0], block_rows):
            mine = rows[a : a + block_rows]
            yield self.X[torch.from_numpy(mine).to(self.X.device)].to(device=self.device, dtype=self.dtype), mine


class Streamed:
    """Rows of a fastlvm.data source, read in blocks and checked as read."""

    streamed = True

    def __init__(self, source, dtype, device, bernoulli):
        self.source, self.dtype, self.device, self.bernoulli = source, dtype, torch.device(device), bernoulli
        self.n_rows, self.n_features = source.n_rows, source.n_features
        itemsize = np.dtype(source.dtype).itemsize
        self.block_rows = max(1, min(self.n_rows, BLOCK_BYTES // max(1, self.n_features * itemsize)))
        self.seed, self.fraction = 0, 0.0

    def _checked(self, X, rows):
        if self.bernoulli:
            check_unit_interval(X, rows)
        return _tensor_of(X).to(device=self.device, dtype=self.dtype)

    def _held(self, rows):
        if self.fraction <= 0:
            return np.zeros(rows.shape[0], dtype=bool)
        return row_split(self.seed, rows, self.fraction)

    def split(self, seed, fraction):
        self.seed, self.fraction = seed, fraction
        n_held = 0
        for a in range(0, self.n_rows, 1 << 20):
            n_held += int(self._held(np.arange(a, min(self.n_rows, a + (1 << 20)), dtype=np.int64)).sum())
        return self.n_rows - n_held, n_held

    def train_batches(self, seed, epoch, batch_size, rank, world):
        keep = lambda rows: ~self._held(rows)  # noqa: E731
        for rows, X in shuffled_batches(self.source, batch_size, seed, epoch, self.block_rows, WINDOW_BLOCKS,
                                        keep=keep):
            lo, hi = shard(rows.shape[0], rank, world)
            yield self._checked(X[lo:hi], rows[lo:hi]), rows[lo:hi], rows.shape[0]

    def blocks(self, which, block_rows):
        for offset, chunk in self.source.chunks(min(block_rows, self.block_rows)):
            rows = np.arange(offset, offset + chunk.shape[0], dtype=np.int64)
            if which != "all":
                held = self._held(rows)
                mask = held if which == "held" else ~held
                rows, chunk = rows[mask], chunk[mask]
                if rows.shape[0] == 0:
                    continue
            yield self._checked(chunk, rows), rows
