"""Row-keyed normal noise: the noise of a row is a pure function of (seed, step, global row index).

``fastlvm.functional.reparameterize`` draws its noise inside the kernel from one seed per call,
indexed by the element's place in the (S, B, Dz) output: a row's noise there depends on its
position in the batch, so it would change with the batch composition, with the number of
processes that share a batch, and with blocking. The kernels take no per-row key, so the trainer
draws the noise here and passes it to ``reparameterize`` as ``eps`` (the fused kernel reads it
once; the cost is B·S·Dz numbers per step, small beside the MLP).

The stream is the one of ``fastlvm.reference.vae.normal_noise`` (Philox4x32-10 and Box-Muller on
52-bit uniforms) with a different counter: element e = s·Dz + j of row r at step t uses the pair
p = e >> 1 and the counter (p, t, r mod 2^32, r >> 32) under the key (seed mod 2^32, seed >> 32);
even e takes the cosine, odd e the sine. So a row's numbers do not depend on which rows share its
batch, on which process holds it, on the thread count, or on how samples are blocked.

(A row-keyed variant of the C++/Triton noise kernels would let the noise stay in-kernel; this
Numba function is the stand-in until the kernels offer one.)
"""

import math

import numpy as np
import torch
from numba import njit

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)
_S32, _S20, _S12 = np.uint64(32), np.uint64(20), np.uint64(12)
_TWO_M52 = 2.0**-52
_TWO_PI = 2.0 * math.pi


@njit(cache=True, nogil=True)
def _philox(c0, c1, c2, c3, k0, k1):
    for r in range(10):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ k0), p1 & _MASK, ((p0 >> _S32) ^ c3 ^ k1), p0 & _MASK
    return c0, c1, c2, c3


@njit(cache=True, nogil=True)
def _fill(out, seed, step, rows, first_sample):
    n_samples, batch, dim = out.shape
    flat = out.reshape(n_samples, batch * dim)  # (contiguous) element e of row b at flat[s, b*dim+j]
    k0 = seed & _MASK
    k1 = seed >> _S32
    t = step & _MASK
    e0 = first_sample * dim
    n = n_samples * dim
    for b in range(batch):
        row = np.uint64(rows[b])
        r0, r1 = row & _MASK, row >> _S32
        # pairs p covering elements e0 .. e0 + n - 1 of this row; write the ones in range
        for p in range((e0 >> 1), ((e0 + n + 1) >> 1)):
            w0, w1, w2, w3 = _philox(np.uint64(p) & _MASK, t, r0, r1, k0, k1)
            u1 = 1.0 - np.float64((w0 << _S20) | (w1 >> _S12)) * _TWO_M52
            u2 = np.float64((w2 << _S20) | (w3 >> _S12)) * _TWO_M52
            radius = math.sqrt(-2.0 * math.log(u1))
            angle = _TWO_PI * u2
            for half in range(2):
                i = 2 * p + half - e0
                if 0 <= i < n:
                    s = i // dim
                    flat[s, b * dim + i - s * dim] = radius * (math.cos(angle) if half == 0 else math.sin(angle))


def row_noise(seed, step, rows, n_samples, dim, dtype=torch.float32, first_sample=0, out=None):
    """Standard normals (n_samples, len(rows), dim) for samples first_sample, first_sample + 1, ...
    of the given global rows at ``step``, as a torch CPU tensor (written into ``out`` if given)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if out is None:
        out = torch.empty((n_samples, rows.shape[0], dim), dtype=dtype)
    if out.numel():
        _fill(out.numpy(), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), np.uint64(int(step) & 0xFFFFFFFF), rows,
              int(first_sample))
    return out
