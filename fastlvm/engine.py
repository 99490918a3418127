"""The one dispatch point between the estimators and the kernels.

GaussianMixture, KMeans (on the GPU) and the initialisation ask an Engine for the statistics of a
chunk, per-row scores, a chunk size and the threads to use; only this module knows which kernel
answers (on the CPU, K-means and k-means++ use the k-means kernels' LloydState and Rows,
re-exported here). `resolve(backend, X)` picks it: 'cpu' (Numba, fastlvm.kernels.cpu) or 'cuda' (numba.cuda,
fastlvm.kernels.cuda_gmm); 'auto' is 'cuda' for device input (CuPy arrays, torch CUDA tensors,
anything with __cuda_array_interface__ or a DLPack CUDA device) and 'cpu' otherwise.

On 'cuda', device input is read where it lies; host input is copied to the device in sub-chunks
through two pinned buffers on two streams (one copies while the other computes), so device memory
stays flat. Only statistics come back to the host, where the M-step and the Cholesky factors are
computed in float64. numba.cuda and CuPy are imported only when 'cuda' is used.
"""

import sys
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from fastlvm.data.base import Source, _check_shape
from fastlvm.kernels import cpu
from fastlvm.kernels.cpu import _aligned as aligned_array  # noqa: F401  (pooled, 64-byte aligned)
from fastlvm.kernels.kmeans import LloydState, Rows, centre  # noqa: F401  (K-means' CPU kernels)

FULL, TIED, DIAG, SPHERICAL = cpu.FULL, cpu.TIED, cpu.DIAG, cpu.SPHERICAL
BACKENDS = ("auto", "cpu", "cuda")
_INSTALL = "pip install 'fastlvm[cuda]'"
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged (kDLCUDAHost, 3, is host memory)
_PARTIALS_BUDGET = 32 * 2**20  # bytes of per-block partial statistics of one CPU kernel call
_CUDA_PARTIALS_BUDGET = 256 * 2**20  # ... of one GPU launch
MAX_CHUNK_ROWS = 2**18
CUDA_CHUNK_ROWS = 2**20  # rows of one GPU pass over device data
CUDA_STREAM_ROWS = 2**16  # rows of one host-to-device copy when host data is streamed


def single_thread_blas():
    """Context manager limiting BLAS to one thread (small host factorisations next to the kernels'
    worker threads)."""
    return cpu.blas_single_thread()


# ----------------------------------------------------------------------------- device input
def is_device_array(X):
    """True for arrays in GPU memory: anything with __cuda_array_interface__ (CuPy, numba, torch CUDA
    tensors), or with a DLPack device of type CUDA."""
    if isinstance(X, np.ndarray):
        return False
    if _is_numba_device(X):
        return True
    try:
        if hasattr(X, "__cuda_array_interface__"):
            return True
    except Exception:  # noqa: BLE001  (a CPU torch tensor raises on the attribute)
        return False
    device = getattr(X, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return int(device()[0]) in _DLPACK_CUDA
    except Exception:  # noqa: BLE001
        return False


def _cuda():
    """numba.cuda, after checking that it can run (a GPU and driver, or the simulator)."""
    try:
        from numba import cuda
    except ImportError as err:  # pragma: no cover - numba is a dependency
        raise ImportError(f"backend='cuda' needs numba's CUDA target ({_INSTALL}): {err}") from None
    if not cuda.is_available():
        raise RuntimeError("backend='cuda' needs an NVIDIA GPU with its driver, but numba.cuda finds none "
                           f"(numba.cuda.is_available() is False). Install the CUDA extra with {_INSTALL}, or "
                           "use backend='cpu'.")
    return cuda


def _cupy(why):
    try:
        import cupy
    except ImportError:
        raise ImportError(f"{why} needs CuPy, which is not installed ({_INSTALL}).") from None
    return cupy


def _with_interface(X):
    """X, or for a DLPack-only device array, the CuPy array that takes it over without a copy."""
    if _is_numba_device(X) or hasattr(X, "__cuda_array_interface__"):
        return X
    return _cupy("DLPack device input").from_dlpack(X)


def device_view(X):
    """A numba.cuda view of the device array X, without a copy."""
    cuda = _cuda()
    X = _with_interface(X)
    if _is_numba_device(X):
        return X
    if hasattr(cuda, "as_cuda_array"):
        return cuda.as_cuda_array(X)
    # The simulator (NUMBA_ENABLE_CUDASIM=1) has no device memory: its "device" arrays are host ones.
    return cuda.to_device(np.asarray(X))


def like_input(out, X):
    """The device array `out` as the array type of the input X: CuPy in, CuPy out; torch in, torch
    out (same device); a numba device array otherwise."""
    package = type(X).__module__.split(".")[0]
    if package == "cupy":
        return sys.modules["cupy"].asarray(out)
    if package == "torch":
        return sys.modules["torch"].as_tensor(out, device=X.device)
    return out


def on_host(X):
    """(X, namespace): under scikit-learn's array_api_dispatch, a host array of another namespace (a
    torch CPU tensor, array_api_strict, ...) as a NumPy array, and its (xp, device) for the answers
    (to_namespace), as scikit-learn's estimators answer it; anything else as it is, and None.
    Device arrays keep fastlvm's own device path."""
    if X is None or isinstance(X, np.ndarray) or is_device_array(X) or not hasattr(X, "shape"):
        return X, None
    from sklearn import get_config

    if not get_config().get("array_api_dispatch", False):
        return X, None
    from sklearn.utils._array_api import get_namespace_and_device

    xp, is_array_api, device = get_namespace_and_device(X)
    if not is_array_api or "numpy" in xp.__name__:
        return X, None
    try:
        host = np.asarray(X)
    except (TypeError, RuntimeError, ValueError):  # a namespace without __array__ (array_api_strict)
        host = np.from_dlpack(X)
    return host, (xp, device)


def to_namespace(a, namespace):
    """The NumPy array a in the namespace and on the device that on_host found."""
    xp, device = namespace
    return xp.asarray(a, device=device)


def to_host(a):
    """A NumPy copy of a numba device array; host arrays as they are."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def to_numpy(a):
    """A NumPy array of any array fastlvm returns: numba, CuPy and torch device arrays are copied."""
    package = type(a).__module__.split(".")[0]
    if package == "cupy":
        return a.get()
    if package == "torch":
        return a.detach().cpu().numpy()
    return to_host(a)


class DeviceSource(Source):
    """Rows in GPU memory, read in place: chunks are numba.cuda views. Validated once (2-D, float32 or
    float64, finite) by a device kernel; `input` keeps the caller's array, whose type the outputs
    take (a DLPack-only array's is CuPy's)."""

    trusted = True

    def __init__(self, X):
        from fastlvm.kernels import cuda_gmm

        self.input = _with_interface(X)
        self.array = device_view(self.input)
        shape = tuple(self.array.shape)
        if len(shape) != 2:
            raise ValueError(f"Expected 2D array, got {len(shape)}D array instead (shape={shape}).")
        _check_shape(*shape)
        if np.dtype(self.array.dtype) not in (np.float32, np.float64):
            raise TypeError(f"Device input must be float32 or float64, got dtype {np.dtype(self.array.dtype)}; "
                            "cast it on the device first.")
        self.n_rows, self.n_features = shape
        self.dtype = np.dtype(self.array.dtype)
        bad = cuda_gmm.first_non_finite_row(self.array)
        if bad is not None:
            raise ValueError(f"Input X contains NaN or infinity (first at row {bad}).")

    def chunks(self, chunk_rows):
        for a in range(0, self.n_rows, chunk_rows):
            yield a, self.array[a : a + chunk_rows]

    def head(self):
        return self.array[:1].copy_to_host()

    def take(self, rows, chunk_rows):
        """The rows with the given indices, gathered on the device and copied to the host."""
        from fastlvm.kernels import cuda_gmm

        return cuda_gmm.take_rows(self.array, np.asarray(rows, dtype=np.int64))


# ----------------------------------------------------------------------------- the engines
class Engine(Protocol):
    """What the estimators ask of the kernels. `backend` names it: 'cpu' or 'cuda'."""

    backend: str

    def chunk_rows(self, K, D):
        """Rows per kernel call for K components of D features."""

    def threads(self):
        """Host threads a kernel call uses."""

    def suff_stats(self, kind, X, kparams, shift, hard=False, resp=None):
        """(n, s, second, loglik, worst_ll, worst_row) of the rows X under kparams = (means, prec,
        log_norm, centre) in the kernels' layout, centred on shift (K, D); see kernels.cpu.suff_stats.
        resp: given responsibilities (N, K) or None."""

    def row_scores(self, kind, X, kparams, hard=False, want_log_prob=False):
        """(log p(x_i) or max_k log p(x_i, k) when hard, argmax labels, and optionally log p(x_i, k)),
        on the host."""

    def rows_output(self, what, kind, kparams, X, dtype=np.float64):
        """One per-row answer for the rows X: 'log_prob' log p(x_i) (N,), 'label' argmax_k (N,) int64,
        or 'proba' the posterior over components (N, K), densities in dtype. Host rows give host
        arrays; device rows give a device array."""


@dataclass(frozen=True)
class CpuEngine:
    """The Numba CPU kernels (fastlvm.kernels.cpu). Small and picklable (Dask ships it to workers)."""

    backend: ClassVar[str] = "cpu"

    def chunk_rows(self, K, D):
        """Large enough to keep every core busy, small enough that the per-block partial statistics
        (K D^2 doubles per block for full) stay within budget."""
        per_block = 8 * (K * D * D + K * D + K + 4)
        blocks = max(2, _PARTIALS_BUDGET // per_block)
        return int(min(MAX_CHUNK_ROWS, blocks * cpu.BLOCK_ROWS))

    def threads(self):
        import numba

        return numba.get_num_threads()

    def suff_stats(self, kind, X, kparams, shift, hard=False, resp=None):
        means, prec, log_norm, centre = kparams  # shift: the kernel's own rule gives the same
        resp = np.empty((0, means.shape[0])) if resp is None else resp
        with cpu.blas_single_thread():
            return cpu.suff_stats(kind, X, means, prec, log_norm, centre, hard, resp, self.threads())

    def row_scores(self, kind, X, kparams, hard=False, want_log_prob=False):
        means, prec, log_norm, centre = kparams
        N, K = X.shape[0], means.shape[0]
        ll = np.empty(N)
        labels = np.empty(N, dtype=np.int64)
        logp = np.empty((N if want_log_prob else 0, K))
        with cpu.blas_single_thread():
            cpu.row_scores(kind, X, means, prec, log_norm, centre, hard, ll, labels, logp, self.threads())
        return ll, labels, (logp if want_log_prob else None)

    def rows_output(self, what, kind, kparams, X, dtype=np.float64):
        ll, labels, logp = self.row_scores(kind, X, kparams, want_log_prob=what == "proba")
        if what == "proba":
            return np.exp(logp - ll[:, None]).astype(dtype, copy=False)
        return ll.astype(dtype, copy=False) if what == "log_prob" else labels


@dataclass(frozen=True)
class CudaEngine:
    """The numba.cuda kernels (fastlvm.kernels.cuda_gmm), on device rows or host rows streamed to the
    device; also K-means' assignment step on the GPU."""

    backend: ClassVar[str] = "cuda"

    def chunk_rows(self, K, D):
        return CUDA_CHUNK_ROWS  # large passes: a launch bounds its own partial statistics

    def threads(self):
        return 1

    def suff_stats(self, kind, X, kparams, shift, hard=False, resp=None):
        return _cuda_stats(kind, X, _device_params(kparams, shift), hard, resp)[:6]

    def assign(self, X, centres):
        """K-means' hard E-step: (sums (K, D), counts (K,), labels (N,), squared distance of every row
        to its centre (N,)), by the GMM kernel's hard mode with unit spherical components."""
        K, D = centres.shape
        C = np.asarray(centres, dtype=np.float64)
        centre = C.mean(axis=0)
        params = _device_params((C, np.ones((K, 1, 1)), np.zeros(K), centre), np.broadcast_to(centre, (K, D)))
        n, s, _, _, _, _, ll, labels = _cuda_stats(SPHERICAL, X, params, True, None, rows_out=True)
        return s + n[:, None] * centre, n, labels, -2.0 * ll

    def row_scores(self, kind, X, kparams, hard=False, want_log_prob=False):
        ll, labels, logp = _cuda_scores(kind, X, kparams, hard, "log_prob_k" if want_log_prob else None)
        return ll.copy_to_host(), labels.copy_to_host(), (logp.copy_to_host() if want_log_prob else None)

    def rows_output(self, what, kind, kparams, X, dtype=np.float64):
        ll, labels, proba = _cuda_scores(kind, X, kparams, False, "proba" if what == "proba" else None, dtype)
        out = proba if what == "proba" else (ll if what == "log_prob" else labels)
        return out if is_device_array(X) else out.copy_to_host()


def column_moments(engine, X):
    """(mean, biased variance) of every column of the rows X by one pass of the diag kernel with one
    component, taken about the first row against cancellation."""
    first = to_host(X[:1]).astype(np.float64)
    D = first.shape[1]
    n, s, second, *_ = engine.suff_stats(DIAG, X, (first, np.ones((1, 1, D)), np.zeros(1), first[0]), first, True)
    delta = s[0] / n[0]
    return first[0] + delta, np.maximum(second[0, 0] / n[0] - delta**2, 0.0)


def to_device(a):
    """A numba.cuda copy of the host array a."""
    return _cuda().to_device(np.ascontiguousarray(a))


def resolve(backend, X=None):
    """The Engine for `backend` ('auto', 'cpu' or 'cuda') and the input X (None: not known yet)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = X is not None and is_device_array(X)
    if backend == "auto":
        backend = "cuda" if device else "cpu"
    if backend == "cpu" and device:
        raise ValueError("backend='cpu' was given device (GPU) input; move it to the host first, or use "
                         "backend='cuda' or 'auto'.")
    if backend == "cuda":
        _cuda()
        return CudaEngine()
    return CpuEngine()


# ----------------------------------------------------------------------------- the cuda path
def _is_numba_device(X):
    """A numba.cuda device array (the simulator's included)."""
    return bool(getattr(X, "__cuda_ndarray__", False))


def _on_device(X):
    """A numba.cuda array of the rows X: X itself for device input, a view of it, or None for host rows."""
    if _is_numba_device(X):
        return X
    if is_device_array(X):
        return device_view(X)
    return None


def _device_params(kparams, shift):
    """(means, prec, log_norm, shift) as float64 device arrays (the GPU kernels' arguments)."""
    cuda = _cuda()
    means, prec, log_norm, _ = kparams
    return tuple(cuda.to_device(np.ascontiguousarray(a, dtype=np.float64)) for a in (means, prec, log_norm, shift))


def _n_blocks(kind, K, D, N):
    from fastlvm.kernels import cuda_gmm

    per_block = 8 * (K * (1 + D) + int(np.prod(cuda_gmm.second_shape(kind, K, D))))
    tiles = (N + cuda_gmm.TILE_ROWS - 1) // cuda_gmm.TILE_ROWS
    return max(1, min(cuda_gmm.MAX_BLOCKS, tiles, _CUDA_PARTIALS_BUDGET // per_block))


def _cuda_stats(kind, X, params, hard, resp, rows_out=False):
    """Statistics of device rows in one launch, or of host rows streamed in sub-chunks: two pinned
    buffers, two device buffers and two streams take sub-chunks in turn, each stream with its own
    float64 accumulator (summed at the end), so the result does not depend on timing. With rows_out,
    also every row's log-likelihood and label (host arrays)."""
    from fastlvm.kernels import cuda_gmm

    cuda = _cuda()
    N, D = X.shape
    K = params[0].shape[0]
    dev = _on_device(X)
    none_resp = cuda.device_array((0, K), np.float64)
    if dev is not None:
        acc = cuda_gmm.Accumulator(kind, K, D, _n_blocks(kind, K, D, N))
        out_ll = out_label = None
        if rows_out:
            out_ll, out_label = cuda.device_array(N, np.float64), cuda.device_array(N, np.int64)
        r = none_resp if resp is None else cuda.to_device(np.ascontiguousarray(resp, dtype=np.float64))
        acc.add(dev, params, hard, r, out_ll=out_ll, out_label=out_label)
        rows = (out_ll.copy_to_host(), out_label.copy_to_host()) if rows_out else ()
        return acc.result() + rows
    sub = min(N, CUDA_STREAM_ROWS)
    streams = [cuda.stream(), cuda.stream()]
    pinned = [cuda.pinned_array((sub, D), X.dtype) for _ in streams]
    buffers = [cuda.device_array((sub, D), X.dtype, stream=s) for s in streams]
    accs = [cuda_gmm.Accumulator(kind, K, D, _n_blocks(kind, K, D, sub), s) for s in streams]
    ll_parts, label_parts = [], []
    for j, start in enumerate(range(0, N, sub)):
        b, stop = j % 2, min(N, start + sub)
        n = stop - start
        streams[b].synchronize()  # this buffer's previous copy and launch are done
        pinned[b][:n] = X[start:stop]
        buffers[b][:n].copy_to_device(pinned[b][:n], stream=streams[b])
        r = none_resp if resp is None else cuda.to_device(np.ascontiguousarray(resp[start:stop], dtype=np.float64),
                                                          stream=streams[b])
        out_ll = out_label = None
        if rows_out:
            out_ll = cuda.device_array(n, np.float64, stream=streams[b])
            out_label = cuda.device_array(n, np.int64, stream=streams[b])
            ll_parts.append((out_ll, streams[b]))
            label_parts.append((out_label, streams[b]))
        accs[b].add(buffers[b][:n], params, hard, r, row_offset=start, out_ll=out_ll, out_label=out_label)
    results = [a.result() for a in accs[: min(2, (N + sub - 1) // sub)]]
    total = results[0]
    if len(results) == 2:
        other = results[1]
        total = (total[0] + other[0], total[1] + other[1], total[2] + other[2], total[3] + other[3],
                 np.concatenate([total[4], other[4]]), np.concatenate([total[5], other[5]]))
    rows = ()
    if rows_out:
        rows = (np.concatenate([a.copy_to_host(stream=s) for a, s in ll_parts]),
                np.concatenate([a.copy_to_host(stream=s) for a, s in label_parts]))
    return total + rows


def _cuda_scores(kind, X, kparams, hard, extra, dtype=np.float64):
    """Device arrays (ll, labels, extra) for the rows X: extra is None, 'log_prob_k' (N, K) or 'proba'."""
    from fastlvm.kernels import cuda_gmm

    cuda = _cuda()
    N = X.shape[0]
    K = kparams[0].shape[0]
    dev = _on_device(X)
    if dev is None:
        dev = cuda.to_device(np.ascontiguousarray(X))
    means, prec, log_norm, _ = _device_params(kparams, kparams[0])
    ll = cuda.device_array(N, dtype)
    labels = cuda.device_array(N, np.int64)
    out = cuda.device_array((N if extra else 0, K), dtype)
    cuda_gmm.row_scores(kind, dev, (means, prec, log_norm), hard, ll, labels, out, proba=extra == "proba")
    return ll, labels, (out if extra else None)
