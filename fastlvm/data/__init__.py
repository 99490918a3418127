"""Data sources shared by every estimator: in-memory arrays, memmap/HDF5/Zarr datasets, chunk
callables and Dask arrays, each yielding validated row chunks."""

from fastlvm.data.base import Source
from fastlvm.data.sources import ArraySource, StreamSource, as_source, is_dask_array

__all__ = ["ArraySource", "Source", "StreamSource", "as_source", "is_dask_array"]
