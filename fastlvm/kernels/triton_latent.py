"""Triton kernels for the latent-space terms: the MMD of InfoVAE and VQ-VAE's nearest-code search.

The kernel-level API of ``fastlvm.functional`` (``mmd_fwd_grad``, ``nearest_codes``,
``codebook_statistics``) for CUDA tensors, re-exported by ``fastlvm.kernels.triton_vae``. Both
kernels run over tiles of pairs with ``tl.dot`` products and the squared norms folded in, and
keep nothing of size rows x rows (or rows x codes): each program holds one tile of rows and
streams over the other operand. Sums leave each program as a partial, reduced on the host in
program order (deterministic). Under ``TRITON_INTERPRET=1`` they run on CPU tensors.
"""

import torch
import triton
import triton.language as tl

_IMQ = tl.constexpr(0)
_RBF = tl.constexpr(1)


def _pow2(n, low=16):
    return max(low, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def _mmd_rows_kernel(a_ptr, other_ptr, grad_ptr, sums_ptr, consts_ptr, NA, NO, D,
                     KIND: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_GRAD: tl.constexpr,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """For a block of rows a_i: S_self = sum_{j != i} k(a_i, a_j), S_other = sum_j k(a_i, o_j),
    and grad_i = 2 g_self sum_j k'(d2_ij)(a_i - a_j) + 2 g_other sum_j k'(d2_ij)(a_i - o_j),
    with d2 = |a|^2 + |b|^2 - 2 a.b (clamped at 0), k = c / (c + d2) (imq) or exp(-d2 / c) (rbf),
    k'(d2) = -k^2 / c or -k / c; sum_j w_j (a_i - b_j) = a_i sum_j w_j - (W B)_i. The constants
    (c, g_self, g_other) come in an array of the rows' dtype (a Python float argument is float32)."""
    pid = tl.program_id(0)
    c = tl.load(consts_ptr)
    g_self = tl.load(consts_ptr + 1)
    g_other = tl.load(consts_ptr + 2)
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < NA, d < D
    a = tl.load(a_ptr + i.to(tl.int64)[:, None] * D + d[None, :], mask=i_mask[:, None] & d_mask[None, :],
                other=0.0)
    a_sq = tl.sum(a * a, axis=1)
    grad = tl.zeros((BLOCK_I, BLOCK_D), dtype=a.dtype)
    sums_self = tl.zeros((BLOCK_I,), dtype=a.dtype)
    sums_other = tl.zeros((BLOCK_I,), dtype=a.dtype)
    for s in tl.static_range(2):
        if s == 0 or HAS_OTHER:
            b_ptr = a_ptr if s == 0 else other_ptr
            n = NA if s == 0 else NO
            g = 2.0 * (g_self if s == 0 else g_other)
            for j0 in range(0, n, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                j_mask = j < n
                b = tl.load(b_ptr + j.to(tl.int64)[:, None] * D + d[None, :],
                            mask=j_mask[:, None] & d_mask[None, :], other=0.0)
                b_sq = tl.sum(b * b, axis=1)
                ab = tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=a.dtype)
                d2 = tl.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * ab, 0.0)
                if KIND == _IMQ:
                    k = c / (c + d2)
                    kp = -k * k / c
                else:
                    k = tl.exp(-d2 / c)
                    kp = -k / c
                live = i_mask[:, None] & j_mask[None, :]
                if s == 0:
                    live = live & (i[:, None] != j[None, :])
                k = tl.where(live, k, 0.0)
                if s == 0:
                    sums_self += tl.sum(k, axis=1)
                else:
                    sums_other += tl.sum(k, axis=1)
                if HAS_GRAD:
                    w = tl.where(live, g * kp, 0.0).to(a.dtype)
                    grad += a * tl.sum(w, axis=1)[:, None] - tl.dot(w, b, input_precision="ieee", out_dtype=a.dtype)
    tl.store(sums_ptr + 2 * pid, tl.sum(sums_self, axis=0))
    tl.store(sums_ptr + 2 * pid + 1, tl.sum(sums_other, axis=0))
    if HAS_GRAD:
        tl.store(grad_ptr + i.to(tl.int64)[:, None] * D + d[None, :], grad,
                 mask=i_mask[:, None] & d_mask[None, :])


def _mmd_side(a, other, kind, c, g_self, g_other, grad):
    """(S_self, S_other) summed in program order; fills grad when given."""
    NA, D = a.shape
    block_d = _pow2(D)
    block_i = 32 if block_d <= 128 else 16
    n_prog = triton.cdiv(NA, block_i)
    sums = torch.empty((n_prog, 2), dtype=a.dtype, device=a.device)
    consts = torch.tensor([c, g_self, g_other], dtype=a.dtype, device=a.device)
    _mmd_rows_kernel[(n_prog,)](
        a, a if other is None else other, a if grad is None else grad, sums, consts, NA,
        0 if other is None else other.shape[0], D,
        KIND=1 if kind == "rbf" else 0, HAS_OTHER=other is not None, HAS_GRAD=grad is not None,
        BLOCK_I=block_i, BLOCK_J=32, BLOCK_D=block_d)
    total = sums.to(torch.float64).sum(0)
    return total[0], total[1]


def mmd_fwd_grad(x, y, kernel, c, need):
    """(MMD^2, grad_x, grad_y): see fastlvm.kernels.cpp.mmd_fwd_grad."""
    n, m = x.shape[0], y.shape[0]
    wxx, wyy, wxy = 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), 1.0 / (n * m)
    gx = torch.empty_like(x) if need[0] else None
    gy = torch.empty_like(y) if need[1] else None
    sxx, sxy = _mmd_side(x, y, kernel, c, 2.0 * wxx, -2.0 * wxy, gx)
    syy, _ = _mmd_side(y, x if need[1] else None, kernel, c, 2.0 * wyy, -2.0 * wxy, gy)
    value = sxx * wxx + syy * wyy - 2.0 * sxy * wxy
    return value.to(x.dtype), gx, gy


@triton.jit
def _nearest_kernel(z_ptr, cb_ptr, cb_sq_ptr, codes_ptr, d2_ptr, N, M, D,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """codes_i = argmin_k |e_k|^2 - 2 z_i.e_k over tiles of codes (ties to the lowest k: a
    later tile wins only when strictly lower), d2_i = |z_i|^2 + that minimum."""
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < N, d < D
    z = tl.load(z_ptr + i.to(tl.int64)[:, None] * D + d[None, :], mask=i_mask[:, None] & d_mask[None, :],
                other=0.0)
    best = tl.full((BLOCK_N,), float("inf"), dtype=z.dtype)
    best_k = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for k0 in range(0, M, BLOCK_M):
        k = k0 + tl.arange(0, BLOCK_M)
        k_mask = k < M
        e = tl.load(cb_ptr + k.to(tl.int64)[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0)
        e_sq = tl.load(cb_sq_ptr + k, mask=k_mask, other=float("inf"))
        score = e_sq[None, :] - 2.0 * tl.dot(z, tl.trans(e), input_precision="ieee", out_dtype=z.dtype)
        score = tl.where(k_mask[None, :], score, float("inf"))
        low = tl.min(score, axis=1)
        arg = tl.min(tl.where(score == low[:, None], k[None, :], M), axis=1).to(tl.int64)
        better = low < best
        best_k = tl.where(better, arg, best_k)
        best = tl.where(better, low, best)
    z_sq = tl.sum(z * z, axis=1)
    tl.store(codes_ptr + i, best_k, mask=i_mask)
    tl.store(d2_ptr + i, tl.maximum(z_sq + best, 0.0), mask=i_mask)


def nearest_codes(z, codebook):
    """(codes int64 (N,), squared distances (N,)) of the rows of z to the codebook's rows."""
    N, D = z.shape
    M = codebook.shape[0]
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    d2 = torch.empty(N, dtype=z.dtype, device=z.device)
    cb_sq = (codebook * codebook).sum(1)
    block_d = _pow2(D)
    block_n = 64 if block_d <= 64 else 32
    _nearest_kernel[(triton.cdiv(N, block_n),)](z, codebook, cb_sq, codes, d2, N, M, D, BLOCK_N=block_n,
                                               BLOCK_M=32, BLOCK_D=block_d)
    return codes, d2


def codebook_statistics(z, codes, n_codes):
    """(counts float64 (M,), sums float64 (M, Dz)) by index_add on the device."""
    counts = torch.zeros(n_codes, dtype=torch.float64, device=z.device)
    counts.index_add_(0, codes, torch.ones(codes.shape, dtype=torch.float64, device=z.device))
    sums = torch.zeros((n_codes, z.shape[1]), dtype=torch.float64, device=z.device)
    sums.index_add_(0, codes, z.to(torch.float64))
    return counts, sums
