"""Data sources: anything that yields row chunks. Every pass of EM is one loop over chunks."""

import numpy as np

# Partial statistics of one kernel call stay below this many bytes (they scale with chunk rows).
_PARTIALS_BUDGET = 32 * 2**20
MAX_CHUNK_ROWS = 2**18


def default_chunk_rows(K, D, block_rows):
    """Rows per kernel call: large enough to keep both cores busy, small enough that the
    per-block partial statistics (K D^2 doubles per block for full) stay within budget."""
    per_block = 8 * (K * D * D + K * D + K + 4)
    blocks = max(2, _PARTIALS_BUDGET // per_block)
    return int(min(MAX_CHUNK_ROWS, blocks * block_rows))


def iter_chunks(X, chunk_rows, dtype):
    """(row offset, C-contiguous chunk of dtype) over the rows of an array-like X."""
    N = X.shape[0]
    for start in range(0, N, chunk_rows):
        chunk = np.ascontiguousarray(X[start : start + chunk_rows], dtype=dtype)
        yield start, chunk
