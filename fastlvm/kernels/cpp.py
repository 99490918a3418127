"""The kernel-level API of the VAE objective over the C++ kernels of ``fastlvm._C``.

Torch CPU tensors in and out: inputs arrive contiguous and of one dtype (fastlvm.functional
sees to it); outputs are allocated by ``_C.empty`` (memory kept for reuse once the tensor is
freed: no page faults on the gradients every step) and shared with torch, so no data is copied
either way. Beyond the shared API, the ``*_fwd_grad`` functions compute the
gradients during the forward pass (``need`` says which), for a backward that only scales.
"""

import numpy as np
import torch

try:
    from fastlvm import _C
except ImportError as err:  # pragma: no cover - depends on the installation
    if "FASTLVM_ISA" in str(err):  # built, but the environment asks for an unknown clone
        raise
    raise ImportError(
        "fastlvm._C, the compiled CPU kernels, is not built: reinstall fastlvm from source "
        "(pip install -e .) or pass backend='torch'") from err


# The *_fwd_grad kernels also take operands of a single row (a per-feature parameter) and
# return their gradient summed over the rows (see fastlvm.functional).
FWD_GRAD_SUMS_SINGLE_ROWS = True


def _np(t):
    return None if t is None else t.detach().numpy()


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(like, *shape):
    return torch.from_numpy(_C.empty(shape, np.dtype(_NP_DTYPES[like.dtype])))


def _empty_like(t):
    return _empty(t, *t.shape)


def _empty_if(flag, like, *shape):
    return _empty(like, *shape) if flag else None


def _seed(seed):
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


# -------------------------------------------------------------------- reparameterisation


def _reparam_fwd(mu, logvar, eps, n_samples, seed, rows=None, step=0):
    batch, dim = mu.shape
    z, kl = _empty(mu, n_samples, batch, dim), _empty(mu, batch)
    _C.reparam_fwd(_np(mu), _np(logvar), _np(eps), seed, n_samples, _np(z), _np(kl), _np(rows), step)
    return z, kl


def _reparam_bwd(mu, logvar, eps, n_samples, seed, grad_z, grad_kl, rows=None, step=0):
    grad_mu, grad_logvar = _empty_like(mu), _empty_like(logvar)
    _C.reparam_bwd(_np(mu), _np(logvar), _np(eps), seed, n_samples, _np(grad_z), _np(grad_kl),
                   _np(grad_mu), _np(grad_logvar), _np(rows), step)
    return grad_mu, grad_logvar


def reparam_fwd(mu, logvar, eps):
    """z = mu + exp(logvar/2) eps (S, B, Dz) and kl (B,)."""
    return _reparam_fwd(mu, logvar, eps, eps.shape[0], 0)


def reparam_bwd(mu, logvar, eps, grad_z, grad_kl):
    """(grad_mu, grad_logvar) for the gradients of z (or None) and kl (or None)."""
    return _reparam_bwd(mu, logvar, eps, eps.shape[0], 0, grad_z, grad_kl)


def reparam_noise_fwd(mu, logvar, n_samples, seed, rows=None, step=0):
    """reparam_fwd with eps generated in the kernel: normal_noise(n_samples, B, Dz, seed), or with
    ``rows`` (int64, (B,)) row_noise(seed, step, rows, n_samples, Dz)."""
    return _reparam_fwd(mu, logvar, None, int(n_samples), _seed(seed), rows, step)


def reparam_noise_bwd(mu, logvar, n_samples, seed, grad_z, grad_kl, rows=None, step=0):
    """reparam_bwd regenerating the noise of reparam_noise_fwd."""
    return _reparam_bwd(mu, logvar, None, int(n_samples), _seed(seed), grad_z, grad_kl, rows, step)


def normal_noise(n_samples, batch, dim, seed, dtype=torch.float64, device="cpu"):
    """The standard normals (n_samples, batch, dim) that the noise kernels use for ``seed``."""
    out = torch.empty((n_samples, batch, dim), dtype=dtype, device=device)
    _C.normal_noise(_seed(seed), _np(out))
    return out


def row_noise(seed, step, rows, n_samples, dim, first_sample=0, dtype=torch.float64):
    """Samples first_sample .. first_sample + n_samples - 1 of each row's stream (seed, step, row):
    (n_samples, len(rows), dim), the numbers reparam_noise_fwd(rows=rows, step=step) draws."""
    out = torch.empty((n_samples, rows.shape[0], dim), dtype=dtype, device=rows.device)
    _C.row_noise(_seed(seed), step, _np(rows), first_sample, _np(out))
    return out


# -------------------------------------------------------------------- log-likelihoods


def _rows(*operands):
    return max(t.shape[0] for t in operands if t is not None)


def gaussian_ll_fwd(x, mean, logvar):
    out = _empty(x, _rows(x, mean, logvar))
    _C.gaussian_ll(_np(x), _np(mean), _np(logvar), _np(out))
    return out


def _grads_like(operands, need):
    return [_empty_like(t) if flag else None for t, flag in zip(operands, need)]


def gaussian_ll_fwd_grad(x, mean, logvar, need, scale=1.0):
    """(out, grad_x, grad_mean, grad_logvar): the gradients of scale * sum(out), None where
    ``need`` is false. An operand with gradient has one row per output row, or a single row."""
    out = _empty(x, _rows(x, mean, logvar))
    grads = _grads_like((x, mean, logvar), need)
    _C.gaussian_ll(_np(x), _np(mean), _np(logvar), _np(out), *map(_np, grads), scale=scale)
    return out, *grads


def gaussian_ll_bwd(x, mean, logvar, grad_out):
    grads = (_empty_like(x), _empty_like(mean),
             None if logvar is None else _empty_like(logvar))
    _C.gaussian_ll_bwd(_np(x), _np(mean), _np(logvar), _np(grad_out), *map(_np, grads))
    return grads


def bernoulli_ll_fwd(x, logits):
    out = _empty(x, _rows(x, logits))
    _C.bernoulli_ll(_np(x), _np(logits), _np(out))
    return out


def bernoulli_ll_fwd_grad(x, logits, need, scale=1.0):
    """(out, grad_x, grad_logits) as gaussian_ll_fwd_grad."""
    out = _empty(x, _rows(x, logits))
    grads = _grads_like((x, logits), need)
    _C.bernoulli_ll(_np(x), _np(logits), _np(out), *map(_np, grads), scale=scale)
    return out, *grads


def bernoulli_ll_bwd(x, logits, grad_out):
    grads = _empty_like(x), _empty_like(logits)
    _C.bernoulli_ll_bwd(_np(x), _np(logits), _np(grad_out), *map(_np, grads))
    return grads


# -------------------------------------------------------------------- importance-weighted bound


def _iwae(log_px_given_z, mu, logvar, eps, with_grad):
    n_samples, batch = log_px_given_z.shape
    bound, w = _empty(mu, batch), _empty(mu, n_samples, batch)
    grads = [_empty_if(with_grad, mu, *mu.shape) for _ in range(2)]
    _C.iwae_fwd(_np(log_px_given_z), _np(mu), _np(logvar), _np(eps), _np(bound), _np(w),
                *map(_np, grads))
    return bound, w, *grads


def iwae_fwd(log_px_given_z, mu, logvar, eps):
    """(bound (B,), normalised weights w (S, B))."""
    return _iwae(log_px_given_z, mu, logvar, eps, False)[:2]


def iwae_fwd_grad(log_px_given_z, mu, logvar, eps):
    """(bound, w, grad_mu, grad_logvar); w is the gradient for log_px_given_z."""
    return _iwae(log_px_given_z, mu, logvar, eps, True)


def iwae_bwd(log_px_given_z, mu, logvar, eps, w, grad_bound):
    grads = _empty_like(log_px_given_z), _empty_like(mu), _empty_like(logvar)
    _C.iwae_bwd(_np(log_px_given_z), _np(mu), _np(logvar), _np(eps), _np(w), _np(grad_bound),
                *map(_np, grads))
    return grads


# -------------------------------------------------------------------- maximum mean discrepancy


def mmd_fwd_grad(x, y, kernel, c, need):
    """(MMD^2 as a 0-d tensor, grad_x, grad_y): unbiased MMD^2 of the rows of x and y with the
    kernel 'imq' c / (c + d2) or 'rbf' exp(-d2 / c), and its gradients where ``need`` says."""
    gx, gy = (_empty_if(flag, t, *t.shape) for flag, t in zip(need, (x, y)))
    value = _C.mmd(_np(x), _np(y), kernel == "rbf", float(c), _np(gx), _np(gy))
    return torch.tensor(value, dtype=x.dtype), gx, gy


# -------------------------------------------------------------------- vector quantisation
# The CPU backend's nearest-code search and codebook statistics are k-means' hard E-step and
# (n_k, sum z): the Numba kernels of fastlvm.kernels.kmeans on zero-copy views of the tensors.


def nearest_codes(z, codebook):
    """(codes int64 (N,), squared distances (N,)) of the rows of z to the codebook's rows."""
    from fastlvm.kernels import kmeans

    codes, d2 = kmeans.nearest_centres(_np(z), _np(codebook))
    return torch.from_numpy(codes), torch.from_numpy(d2)


def codebook_statistics(z, codes, n_codes):
    """(counts float64 (M,), sums float64 (M, Dz)) of the rows of z by code."""
    from fastlvm.kernels import kmeans

    counts, sums = kmeans.cluster_sums(_np(z), _np(codes), n_codes)
    return torch.from_numpy(counts), torch.from_numpy(sums)
