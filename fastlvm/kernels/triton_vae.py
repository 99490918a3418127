"""Triton kernels for the fused VAE objective (forward and backward).

Implements the kernel-level API shared with the C++ module (see the functions at the bottom;
the equations are in each kernel's docstring). Plain tensors in, plain tensors out; inputs are
validated and canonicalised by ``fastlvm.functional``.

Conventions for every kernel:
- rows are tiled by ``BLOCK_R`` (or ``BLOCK_B``) and features by ``BLOCK_D``; features are
  looped over in blocks, so any D works and masks cover the remainders;
- "periodic broadcasting": an operand with P rows is read at row ``r % P`` for output row r;
- arithmetic and reductions run in the input dtype (float32 accumulates in float32, float64
  in float64); offsets into (S, B, D) arrays are int64;
- the noise for element (s, b, j) is a pure function of the seed and the flat index
  (s*B + b)*D + j (Philox4x32-10 + Box-Muller, the spec in fastlvm.reference.vae, so every
  backend draws the same numbers), so backward regenerates it instead of storing it.

Block sizes come from a small heuristic (no autotune: the interpreter has no driver to time with).
Under ``TRITON_INTERPRET=1`` (set before importing triton) the kernels run on CPU tensors.
"""

import math

import torch
import triton
import triton.language as tl

# Elements per program tile (16 float32 values per thread at the default 4 warps) and the
# widest feature block; wider features are looped over.
_TILE = 2048
_MAX_BLOCK_D = 256

_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))
_TWO_PI = tl.constexpr(2.0 * math.pi)
_TWO_M52 = tl.constexpr(2.0**-52)
_GAUSSIAN = tl.constexpr(0)
_BERNOULLI = tl.constexpr(1)


def _pow2(n, cap):
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


def _blocks(rows, cols):
    """(BLOCK_R, BLOCK_D) for a rows x cols problem: features first, rows fill the tile."""
    block_d = _pow2(cols, _MAX_BLOCK_D)
    return _pow2(rows, max(1, _TILE // block_d)), block_d


# ---------------------------------------------------------------------------------------------
# Element-wise pieces (one place for each equation)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _log1p(u):
    # tl.math has no log1p and libdevice does not run under the interpreter. Goldberg's trick
    # log(1+u) * u / ((1+u) - 1) cancels the rounding of 1+u: a few ulps for any u >= 0.
    w = 1.0 + u
    d = w - 1.0
    tiny = d == 0.0
    return tl.where(tiny, u, tl.log(w) * (u / tl.where(tiny, 1.0, d)))


@triton.jit
def _box_muller(w0, w1, w2, w3, odd, dtype: tl.constexpr):
    """Philox words -> one normal of the Box-Muller pair: the 52-bit integers
    a1 = w0 << 20 | w1 >> 12, a2 = w2 << 20 | w3 >> 12 give u1 = 1 - a1 2^-52 in (0, 1] and
    u2 = a2 2^-52; r cos(2 pi u2) for the even element, r sin(2 pi u2) for the odd one, with
    r = sqrt(-2 log u1). In float64, rounded to dtype."""
    a1 = (w0.to(tl.uint64) << 20) | (w1.to(tl.uint64) >> 12)
    a2 = (w2.to(tl.uint64) << 20) | (w3.to(tl.uint64) >> 12)
    u1 = 1.0 - a1.to(tl.float64) * _TWO_M52
    theta = _TWO_PI * (a2.to(tl.float64) * _TWO_M52)
    r = tl.sqrt(-2.0 * tl.log(u1))
    return tl.where(odd, r * tl.sin(theta), r * tl.cos(theta)).to(dtype)


@triton.jit
def _noise(seed, i, dtype: tl.constexpr):
    """The standard normal for flat index i (int64): the noise spec of fastlvm.reference.vae.

    Philox4x32-10 with key (seed lo, seed hi) and counter (p lo, p hi, 0, 0) for the pair
    p = i >> 1 -- exactly tl.randint4x(seed, p).
    """
    w0, w1, w2, w3 = tl.randint4x(seed, i >> 1)
    return _box_muller(w0, w1, w2, w3, (i & 1) == 1, dtype)


@triton.jit
def _row_noise(seed, step, row, e, dtype: tl.constexpr):
    """The standard normal for element e of the stream of global row ``row`` at ``step`` (row
    (BLOCK_B, 1) and e (1, BLOCK_D), int64): counter (q mod 2^32, step, row lo, row hi) for the
    pair q = e >> 1 (fastlvm.reference.vae.row_noise)."""
    zero = row * 0 + e * 0
    q = zero + (e >> 1)
    r = zero + row
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (zero + step).to(tl.uint32)
    c2 = (r & 0xFFFFFFFF).to(tl.uint32)
    c3 = (r >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    return _box_muller(w0, w1, w2, w3, ((zero + e) & 1) == 1, dtype)


@triton.jit
def _ll_elem(x, a, lv, KIND: tl.constexpr):
    """Per-element log-likelihood: Gaussian N(x; a, exp(lv)) or Bernoulli(x; logits=a)."""
    if KIND == _GAUSSIAN:
        diff = x - a
        return -_HALF_LOG_2PI - 0.5 * lv - 0.5 * diff * diff * tl.exp(-lv)
    else:
        # x*l - softplus(l), softplus(l) = max(l, 0) + log1p(exp(-|l|))
        return x * a - tl.maximum(a, 0.0) - _log1p(tl.exp(-tl.abs(a)))


@triton.jit
def _ll_elem_grad(x, a, lv, g, KIND: tl.constexpr):
    """g times the partial derivatives of ``_ll_elem`` with respect to (x, a, lv)."""
    if KIND == _GAUSSIAN:
        diff = x - a
        t = diff * tl.exp(-lv)
        return -g * t, g * t, g * (0.5 * diff * t - 0.5)
    else:
        # x - sigmoid(l) with t = sigmoid(-|l|) = e/(1+e): x - 1 + t for l >= 0, x - t below; no
        # overflow, and no cancellation of a tiny t against 1 when x is 1 (or 0) and the model is right
        e = tl.exp(-tl.abs(a))
        t = e / (1.0 + e)
        return g * a, g * tl.where(a >= 0.0, (x - 1.0) + t, x - t), g * 0.0


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _normal_kernel(out_ptr, N, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _noise(seed, offs, out_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _row_noise_kernel(out_ptr, rows_ptr, S, B, D, first_sample, seed, step, BLOCK_B: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """out[s, b, j] = element (first_sample + s) D + j of the stream of row rows[b] at step."""
    b, b_mask, b64 = _rows(B, BLOCK_B)
    row = _row_keys(rows_ptr, b, b_mask, True)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = b_mask[:, None] & (d < D)[None, :]
        for s in range(S):
            e = ((first_sample + s) * D + d).to(tl.int64)[None, :]
            tl.store(out_ptr + _sample_index(s, B, b64, d, D), _row_noise(seed, step, row, e, out_ptr.dtype.element_ty),
                     mask=m)


@triton.jit
def _rows(B, BLOCK_B: tl.constexpr):
    """This program's block of rows b: (b, mask, b as int64)."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    return b, b < B, b.to(tl.int64)


@triton.jit
def _posterior_tile(mu_ptr, lv_ptr, b64, b_mask, d0, D, BLOCK_D: tl.constexpr):
    """The (rows, features d0 ...) tile of q(z|x): (mask, d, index, mu, lv, sigma = exp(lv/2))."""
    d = d0 + tl.arange(0, BLOCK_D)
    m = b_mask[:, None] & (d < D)[None, :]
    idx = b64[:, None] * D + d[None, :]
    mu = tl.load(mu_ptr + idx, mask=m, other=0.0)
    lv = tl.load(lv_ptr + idx, mask=m, other=0.0)
    return m, d, idx, mu, lv, tl.exp(0.5 * lv)


@triton.jit
def _sample_index(s, B, b64, d, D):
    """Flat index of (s, b, d) in an (S, B, D) array, int64."""
    return ((s * B + b64) * D)[:, None] + d[None, :]


@triton.jit
def _eps(eps_ptr, seed, off, m, row, step, e, dtype: tl.constexpr, NOISE: tl.constexpr, ROWS: tl.constexpr):
    """eps at flat indices off: generated when NOISE -- from the flat stream, or with ROWS from the
    stream of each row (row: (BLOCK_B, 1) global indices; e: (1, BLOCK_D) element indices in the
    row's stream) -- else read."""
    if NOISE:
        if ROWS:
            return _row_noise(seed, step, row, e, dtype)
        else:
            return _noise(seed, off, dtype)
    else:
        return tl.load(eps_ptr + off, mask=m, other=0.0)


@triton.jit
def _row_keys(rows_ptr, b, b_mask, ROWS: tl.constexpr):
    """Global row indices (BLOCK_B, 1) of this program's rows (zeros without ROWS)."""
    if ROWS:
        return tl.load(rows_ptr + b, mask=b_mask, other=0)[:, None]
    else:
        return (b * 0).to(tl.int64)[:, None]


@triton.jit
def _reparam_fwd_kernel(mu_ptr, lv_ptr, eps_ptr, z_ptr, kl_ptr, rows_ptr, S, B, D, seed, step,
                        NOISE: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[s,b,j] = mu[b,j] + exp(lv[b,j]/2) * eps[s,b,j];  kl[b] = 0.5 sum_j (exp(lv) + mu^2 - 1 - lv)."""
    b, b_mask, b64 = _rows(B, BLOCK_B)
    row = _row_keys(rows_ptr, b, b_mask, ROWS)
    dtype = mu_ptr.dtype.element_ty
    kl = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
    for d0 in range(0, D, BLOCK_D):
        m, d, idx, mu, lv, std = _posterior_tile(mu_ptr, lv_ptr, b64, b_mask, d0, D, BLOCK_D)
        kl += tl.where(m, 0.5 * (std * std + mu * mu - 1.0 - lv), 0.0)
        for s in range(S):
            off = _sample_index(s, B, b64, d, D)
            e = (s * D + d).to(tl.int64)[None, :]
            tl.store(z_ptr + off, mu + std * _eps(eps_ptr, seed, off, m, row, step, e, dtype, NOISE, ROWS), mask=m)
    tl.store(kl_ptr + b, tl.sum(kl, axis=1), mask=b_mask)


@triton.jit
def _reparam_bwd_kernel(mu_ptr, lv_ptr, eps_ptr, gz_ptr, gkl_ptr, gmu_ptr, glv_ptr, rows_ptr, S, B, D, seed,
                        step, NOISE: tl.constexpr, ROWS: tl.constexpr, HAS_GZ: tl.constexpr,
                        HAS_GKL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_mu = sum_s gz + gkl*mu;  grad_lv = 0.5*exp(lv/2) * sum_s gz*eps + 0.5*gkl*(exp(lv) - 1)."""
    b, b_mask, b64 = _rows(B, BLOCK_B)
    row = _row_keys(rows_ptr, b, b_mask, ROWS)
    dtype = mu_ptr.dtype.element_ty
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + b, mask=b_mask, other=0.0)[:, None]
    for d0 in range(0, D, BLOCK_D):
        m, d, idx, mu, lv, std = _posterior_tile(mu_ptr, lv_ptr, b64, b_mask, d0, D, BLOCK_D)
        gmu = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
        gz_eps = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
        if HAS_GZ:
            for s in range(S):
                off = _sample_index(s, B, b64, d, D)
                gz = tl.load(gz_ptr + off, mask=m, other=0.0)
                gmu += gz
                e = (s * D + d).to(tl.int64)[None, :]
                gz_eps += gz * _eps(eps_ptr, seed, off, m, row, step, e, dtype, NOISE, ROWS)
        glv = 0.5 * std * gz_eps
        if HAS_GKL:
            gmu += gkl * mu
            glv += 0.5 * gkl * (std * std - 1.0)
        tl.store(gmu_ptr + idx, gmu, mask=m)
        tl.store(glv_ptr + idx, glv, mask=m)


@triton.jit
def _ll_fwd_kernel(x_ptr, a_ptr, lv_ptr, out_ptr, gx_ptr, ga_ptr, glv_ptr, scale_ptr, Px, Pa, Pl, R, D,
                   KIND: tl.constexpr, HAS_LV: tl.constexpr, ANY_GRAD: tl.constexpr,
                   GRAD_X: tl.constexpr, GRAD_A: tl.constexpr, GRAD_LV: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = sum_j ll(x[r % Px, j], a[r % Pa, j], lv[r % Pl, j]).

    With GRAD_*, also writes scale * d out[r] / d operand[r, j] while the inputs are loaded
    (for operands with R rows: no sum over repeats), so a backward pass only rescales.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    x_row = ((r % Px).to(tl.int64) * D)[:, None]
    a_row = ((r % Pa).to(tl.int64) * D)[:, None]
    l_row = ((r % Pl).to(tl.int64) * D)[:, None]
    g_row = (r.to(tl.int64) * D)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=a_ptr.dtype.element_ty)
    if ANY_GRAD:
        scale = tl.load(scale_ptr)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D))[None, :]
        m = r_mask[:, None] & (d < D)
        x = tl.load(x_ptr + x_row + d, mask=m, other=0.0)
        a = tl.load(a_ptr + a_row + d, mask=m, other=0.0)
        lv = tl.zeros([BLOCK_R, BLOCK_D], dtype=a.dtype)
        if HAS_LV:
            lv = tl.load(lv_ptr + l_row + d, mask=m, other=0.0)
        acc += tl.where(m, _ll_elem(x, a, lv, KIND), 0.0)
        if ANY_GRAD:
            gx, ga, glv = _ll_elem_grad(x, a, lv, scale, KIND)
            if GRAD_X:
                tl.store(gx_ptr + g_row + d, gx, mask=m)
            if GRAD_A:
                tl.store(ga_ptr + g_row + d, ga, mask=m)
            if GRAD_LV:
                tl.store(glv_ptr + g_row + d, glv, mask=m)
    tl.store(out_ptr + r, tl.sum(acc, axis=1), mask=r_mask)


@triton.jit
def _ll_bwd_kernel(x_ptr, a_ptr, lv_ptr, g_ptr, gx_ptr, ga_ptr, glv_ptr, Px, Pa, Pl, P, R, D,
                   KIND: tl.constexpr, HAS_LV: tl.constexpr,
                   WRITE_X: tl.constexpr, WRITE_A: tl.constexpr, WRITE_LV: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradients of the operands with period P: grad[p, j] = sum_k g[r] * d ll(r, j) / d operand,
    over the rows r = k*P + p, k < R/P (one launch per distinct period; WRITE_* pick the operands).

    The tile is (BLOCK_K repeats, BLOCK_P rows, BLOCK_D features), summed over the repeats.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    K = R // P
    dtype = a_ptr.dtype.element_ty
    acc_x = tl.zeros([BLOCK_P, BLOCK_D], dtype=dtype)
    acc_a = tl.zeros([BLOCK_P, BLOCK_D], dtype=dtype)
    acc_lv = tl.zeros([BLOCK_P, BLOCK_D], dtype=dtype)
    d3 = d[None, None, :]
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        r = k[:, None] * P + p[None, :]
        r_mask = (k < K)[:, None] & (p < P)[None, :]
        m = r_mask[:, :, None] & (d3 < D)
        x = tl.load(x_ptr + ((r % Px).to(tl.int64) * D)[:, :, None] + d3, mask=m, other=0.0)
        a = tl.load(a_ptr + ((r % Pa).to(tl.int64) * D)[:, :, None] + d3, mask=m, other=0.0)
        lv = tl.zeros([BLOCK_K, BLOCK_P, BLOCK_D], dtype=dtype)
        if HAS_LV:
            lv = tl.load(lv_ptr + ((r % Pl).to(tl.int64) * D)[:, :, None] + d3, mask=m, other=0.0)
        g = tl.load(g_ptr + r, mask=r_mask, other=0.0)[:, :, None]
        gx, ga, glv = _ll_elem_grad(x, a, lv, g, KIND)
        acc_x += tl.sum(tl.where(m, gx, 0.0), axis=0)
        acc_a += tl.sum(tl.where(m, ga, 0.0), axis=0)
        acc_lv += tl.sum(tl.where(m, glv, 0.0), axis=0)
    out = p.to(tl.int64)[:, None] * D + d[None, :]
    out_mask = (p < P)[:, None] & (d < D)[None, :]
    if WRITE_X:
        tl.store(gx_ptr + out, acc_x, mask=out_mask)
    if WRITE_A:
        tl.store(ga_ptr + out, acc_a, mask=out_mask)
    if WRITE_LV:
        tl.store(glv_ptr + out, acc_lv, mask=out_mask)


@triton.jit
def _iwae_fwd_kernel(lpx_ptr, mu_ptr, lv_ptr, eps_ptr, bound_ptr, w_ptr, S, B, D,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """log w[s,b] = log_px[s,b] + sum_j (0.5*lv - 0.5*z^2 + 0.5*eps^2),  z = mu + exp(lv/2)*eps;
    bound[b] = logsumexp_s log w[s,b] - log S;  w = softmax over s.

    Streams over s with an online log-sum-exp; log w is parked in w's own storage and
    normalised in a second pass, so nothing beyond the (S, B) arrays is allocated.
    """
    b, b_mask, b64 = _rows(B, BLOCK_B)
    dtype = mu_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = b_mask[:, None] & (d < D)[None, :]
        acc += 0.5 * tl.load(lv_ptr + b64[:, None] * D + d[None, :], mask=m, other=0.0)
    half_sum_lv = tl.sum(acc, axis=1)  # the s-independent part of log p(z) - log q(z|x)

    run_max = tl.full([BLOCK_B], float("-inf"), dtype=dtype)
    run_sum = tl.zeros([BLOCK_B], dtype=dtype)
    for s in range(S):
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
        for d0 in range(0, D, BLOCK_D):
            m, d, idx, mu, lv, std = _posterior_tile(mu_ptr, lv_ptr, b64, b_mask, d0, D, BLOCK_D)
            eps = tl.load(eps_ptr + _sample_index(s, B, b64, d, D), mask=m, other=0.0)
            z = mu + std * eps
            acc += 0.5 * (eps * eps - z * z)  # masked lanes are 0
        log_w = tl.load(lpx_ptr + s * B + b, mask=b_mask, other=0.0) + half_sum_lv + tl.sum(acc, axis=1)
        tl.store(w_ptr + s * B + b, log_w, mask=b_mask)
        new_max = tl.maximum(run_max, log_w)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid inf - inf
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(log_w - shift)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    n = tl.zeros([BLOCK_B], dtype=dtype) + S
    tl.store(bound_ptr + b, lse - tl.log(n), mask=b_mask)
    for s in range(S):
        log_w = tl.load(w_ptr + s * B + b, mask=b_mask, other=0.0)
        tl.store(w_ptr + s * B + b, tl.exp(log_w - lse), mask=b_mask)


@triton.jit
def _iwae_bwd_kernel(mu_ptr, lv_ptr, eps_ptr, w_ptr, gb_ptr, glpx_ptr, gmu_ptr, glv_ptr, S, B, D,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """With d log w / d z = -z and sum_s w = 1:
    grad_log_px[s,b] = gb*w[s,b];  grad_mu = -gb * sum_s w*z;  grad_lv = gb * (0.5 - 0.5*exp(lv/2) * sum_s w*z*eps).
    """
    b, b_mask, b64 = _rows(B, BLOCK_B)
    dtype = mu_ptr.dtype.element_ty
    gb = tl.load(gb_ptr + b, mask=b_mask, other=0.0)
    for s in range(S):
        w = tl.load(w_ptr + s * B + b, mask=b_mask, other=0.0)
        tl.store(glpx_ptr + s * B + b, gb * w, mask=b_mask)
    gb = gb[:, None]
    for d0 in range(0, D, BLOCK_D):
        m, d, idx, mu, lv, std = _posterior_tile(mu_ptr, lv_ptr, b64, b_mask, d0, D, BLOCK_D)
        wz = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
        wz_eps = tl.zeros([BLOCK_B, BLOCK_D], dtype=dtype)
        for s in range(S):
            w = tl.load(w_ptr + s * B + b, mask=b_mask, other=0.0)[:, None]
            eps = tl.load(eps_ptr + _sample_index(s, B, b64, d, D), mask=m, other=0.0)
            wz_s = w * (mu + std * eps)
            wz += wz_s
            wz_eps += wz_s * eps
        tl.store(gmu_ptr + idx, -gb * wz, mask=m)
        tl.store(glv_ptr + idx, gb * (0.5 - 0.5 * std * wz_eps), mask=m)


# ---------------------------------------------------------------------------------------------
# Launch wrappers: the kernel-level API (names and signatures shared with fastlvm._C)
# ---------------------------------------------------------------------------------------------


def _check_seed(seed):
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _row_grid(rows, block):
    return (max(1, triton.cdiv(rows, block)),)


def normal_noise(shape_S, B, Dz, seed, dtype=torch.float64, device=None):
    """eps (S, B, Dz): the standard normals the noise kernels use for this seed."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty((shape_S, B, Dz), dtype=dtype, device=device)
    n = out.numel()
    block = _pow2(n, _TILE)
    _normal_kernel[_row_grid(n, block)](out, n, _check_seed(seed), BLOCK=block)
    return out


def row_noise(seed, step, rows, n_samples, dim, first_sample=0, dtype=torch.float64):
    """Samples first_sample .. first_sample + n_samples - 1 of each row's stream (seed, step, row):
    (n_samples, len(rows), dim), the numbers reparam_noise_fwd(rows=rows, step=step) draws."""
    rows = rows.contiguous()
    B = rows.shape[0]
    out = torch.empty((n_samples, B, dim), dtype=dtype, device=rows.device)
    block_b, block_d = _blocks(B, dim)
    _row_noise_kernel[_row_grid(B, block_b)](out, rows, n_samples, B, dim, int(first_sample), _check_seed(seed),
                                             int(step), BLOCK_B=block_b, BLOCK_D=block_d)
    return out


def _reparam_fwd(mu, logvar, eps, S, seed, rows=None, step=0):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    B, D = mu.shape
    z = mu.new_empty((S, B, D))
    kl = mu.new_empty((B,))
    noise = eps is None
    block_b, block_d = _blocks(B, D)
    _reparam_fwd_kernel[_row_grid(B, block_b)](
        mu, logvar, mu if noise else eps.contiguous(), z, kl, mu if rows is None else rows.contiguous(),
        S, B, D, seed, int(step), NOISE=noise, ROWS=rows is not None, BLOCK_B=block_b, BLOCK_D=block_d)
    return z, kl


def _reparam_bwd(mu, logvar, eps, S, seed, grad_z, grad_kl, rows=None, step=0):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    B, D = mu.shape
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(mu)
    noise = eps is None
    block_b, block_d = _blocks(B, D)
    _reparam_bwd_kernel[_row_grid(B, block_b)](
        mu, logvar, mu if noise else eps.contiguous(),
        mu if grad_z is None else grad_z.contiguous(),
        mu if grad_kl is None else grad_kl.contiguous(),
        grad_mu, grad_logvar, mu if rows is None else rows.contiguous(), S, B, D, seed, int(step),
        NOISE=noise, ROWS=rows is not None, HAS_GZ=grad_z is not None, HAS_GKL=grad_kl is not None,
        BLOCK_B=block_b, BLOCK_D=block_d)
    return grad_mu, grad_logvar


def reparam_fwd(mu, logvar, eps):
    """z = mu + exp(logvar/2) * eps  (S, B, Dz) and kl (B,) = KL(N(mu, exp(logvar)) || N(0, I))."""
    return _reparam_fwd(mu, logvar, eps, eps.shape[0], 0)


def reparam_bwd(mu, logvar, eps, grad_z, grad_kl):
    """(grad_mu, grad_logvar) of reparam_fwd given grad_z (S, B, Dz) and grad_kl (B,), each or None."""
    return _reparam_bwd(mu, logvar, eps, eps.shape[0], 0, grad_z, grad_kl)


def reparam_noise_fwd(mu, logvar, n_samples, seed, rows=None, step=0):
    """reparam_fwd with eps generated in the kernel: normal_noise(n_samples, B, Dz, seed), or with
    ``rows`` (int64, (B,)) row_noise(seed, step, rows, n_samples, Dz)."""
    return _reparam_fwd(mu, logvar, None, int(n_samples), _check_seed(seed), rows, step)


def reparam_noise_bwd(mu, logvar, n_samples, seed, grad_z, grad_kl, rows=None, step=0):
    """reparam_bwd of reparam_noise_fwd; the noise is regenerated, never stored."""
    return _reparam_bwd(mu, logvar, None, int(n_samples), _check_seed(seed), grad_z, grad_kl, rows, step)


def _ll_fwd(x, a, logvar, kind, need=(False, False, False), scale=1.0):
    """(out, grad_x, grad_a, grad_lv): the gradients of scale * out where ``need`` asks."""
    x, a = x.contiguous(), a.contiguous()
    lv = a if logvar is None else logvar.contiguous()
    D = a.shape[1]
    R = max(x.shape[0], a.shape[0], lv.shape[0])
    out = a.new_empty((R,))
    grads = [a.new_empty((R, D)) if flag else None for flag in need]
    # a tensor, not a float argument: Triton passes Python floats as float32
    scale_t = torch.full((1,), scale, dtype=a.dtype, device=a.device) if any(need) else a
    block_r, block_d = _blocks(R, D)
    _ll_fwd_kernel[_row_grid(R, block_r)](
        x, a, lv, out, *(a if g is None else g for g in grads), scale_t,
        x.shape[0], a.shape[0], lv.shape[0], R, D,
        KIND=kind, HAS_LV=logvar is not None, ANY_GRAD=any(need),
        GRAD_X=need[0], GRAD_A=need[1], GRAD_LV=need[2], BLOCK_R=block_r, BLOCK_D=block_d)
    return (out, *grads)


def _check_need(operands, need):
    """Forward-pass gradients are per output row: each operand asked for must have all R rows."""
    rows = max(t.shape[0] for t in operands if t is not None)
    for t, flag in zip(operands, need):
        if flag and (t is None or t.shape[0] != rows):
            raise ValueError(f"a forward-pass gradient needs the operand's {rows} rows, got "
                             f"{None if t is None else tuple(t.shape)}; use the *_bwd kernel")
    return tuple(bool(flag) for flag in need) + (False,) * (3 - len(need))


def _ll_bwd(x, a, logvar, grad_out, kind):
    x, a, g = x.contiguous(), a.contiguous(), grad_out.contiguous()
    lv = a if logvar is None else logvar.contiguous()
    D = a.shape[1]
    R = g.shape[0]
    grads = [torch.empty_like(x), torch.empty_like(a), None if logvar is None else torch.empty_like(lv)]
    periods = [x.shape[0], a.shape[0], None if logvar is None else lv.shape[0]]
    # One launch per distinct period: each sums its operands' gradients over their repeats.
    for P in dict.fromkeys(p for p in periods if p is not None):
        writes = [p == P for p in periods]
        K = R // P
        block_p, block_d = _blocks(P, D)
        block_k = _pow2(K, max(1, _TILE // (block_p * block_d)))
        grid = (max(1, triton.cdiv(P, block_p)), max(1, triton.cdiv(D, block_d)))
        _ll_bwd_kernel[grid](
            x, a, lv, g, grads[0], grads[1], grads[2] if grads[2] is not None else grads[1],
            x.shape[0], a.shape[0], lv.shape[0], P, R, D,
            KIND=kind, HAS_LV=logvar is not None,
            WRITE_X=writes[0], WRITE_A=writes[1], WRITE_LV=writes[2],
            BLOCK_K=block_k, BLOCK_P=block_p, BLOCK_D=block_d)
    return tuple(grads)


def gaussian_ll_fwd(x, mean, logvar):
    """out[r] = sum_d log N(x[r % Px, d]; mean[r % Pm, d], exp(logvar[r % Pl, d])) (logvar None: 0)."""
    return _ll_fwd(x, mean, logvar, _GAUSSIAN.value)[0]


def gaussian_ll_fwd_grad(x, mean, logvar, need, scale=1.0):
    """(out, grad_x, grad_mean, grad_logvar): out and, where ``need`` (three flags) asks, the
    gradient of scale * out[r] with respect to that operand's row r (None elsewhere)."""
    return _ll_fwd(x, mean, logvar, _GAUSSIAN.value, _check_need((x, mean, logvar), need), scale)


def gaussian_ll_bwd(x, mean, logvar, grad_out):
    """(grad_x, grad_mean, grad_logvar or None), each summed over its periodic repeats."""
    return _ll_bwd(x, mean, logvar, grad_out, _GAUSSIAN.value)


def bernoulli_ll_fwd(x, logits):
    """out[r] = sum_d x*l - softplus(l), x = x[r % Px], l = logits[r % Pl]."""
    return _ll_fwd(x, logits, None, _BERNOULLI.value)[0]


def bernoulli_ll_fwd_grad(x, logits, need, scale=1.0):
    """(out, grad_x, grad_logits) as gaussian_ll_fwd_grad, with ``need`` two flags."""
    out, grad_x, grad_logits, _ = _ll_fwd(x, logits, None, _BERNOULLI.value,
                                          _check_need((x, logits), need), scale)
    return out, grad_x, grad_logits


def bernoulli_ll_bwd(x, logits, grad_out):
    """(grad_x, grad_logits) = (g*l, g*(x - sigmoid(l))), each summed over its periodic repeats."""
    grad_x, grad_logits, _ = _ll_bwd(x, logits, None, grad_out, _BERNOULLI.value)
    return grad_x, grad_logits


def iwae_fwd(log_px_given_z, mu, logvar, eps):
    """(bound (B,), w (S, B)): importance-weighted bound and normalised weights."""
    lpx, mu, logvar, eps = (t.contiguous() for t in (log_px_given_z, mu, logvar, eps))
    S, B = lpx.shape
    D = mu.shape[1]
    bound = mu.new_empty((B,))
    w = mu.new_empty((S, B))
    block_b, block_d = _blocks(B, D)
    _iwae_fwd_kernel[_row_grid(B, block_b)](
        lpx, mu, logvar, eps, bound, w, S, B, D, BLOCK_B=block_b, BLOCK_D=block_d)
    return bound, w


def iwae_bwd(log_px_given_z, mu, logvar, eps, w, grad_bound):
    """(grad_log_px (S, B), grad_mu (B, Dz), grad_logvar (B, Dz)) of iwae_fwd's bound."""
    mu, logvar, eps, w, gb = (t.contiguous() for t in (mu, logvar, eps, w, grad_bound))
    S, B = w.shape
    D = mu.shape[1]
    grad_lpx = torch.empty_like(w)
    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(mu)
    block_b, block_d = _blocks(B, D)
    _iwae_bwd_kernel[_row_grid(B, block_b)](
        mu, logvar, eps, w, gb, grad_lpx, grad_mu, grad_logvar, S, B, D,
        BLOCK_B=block_b, BLOCK_D=block_d)
    return grad_lpx, grad_mu, grad_logvar


# The latent-space terms (MMD, vector quantisation) live in their own module; this backend
# serves them too.
from fastlvm.kernels.triton_latent import codebook_statistics, mmd_fwd_grad, nearest_codes  # noqa: E402,F401
