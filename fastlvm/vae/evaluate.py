"""Per-row bounds of a fitted VAE, without gradients: the ELBO with L samples, and the
importance-weighted estimate of log p(x) computed in blocks of samples (a running log-sum-exp of
``iwae_bound`` over the blocks), so memory does not grow with the number of samples.

The noise of row r, sample s is keyed by (seed, EVAL_STEP, r): the same numbers whatever the
blocking of rows and samples.
"""

import math

import torch

import fastlvm.functional as F
from fastlvm.vae.model import RowNoise

EVAL_STEP = 0xFFFFFFFF


def _decoded(module, x, rows, seed, n_samples, first_sample=0, encoded=None):
    """mu, logvar, eps (S, B, Dz), KL (B,) and log p(x | z_s) (S, B)."""
    mu, logvar = module.encode(x) if encoded is None else encoded
    eps = RowNoise(seed, EVAL_STEP, rows, n_samples, first_sample).eps(module.latent_dim, mu.dtype, mu.device,
                                                                          module.backend)
    _, kl, out = module.decode_samples(eps, mu, logvar)
    return mu, logvar, eps, kl, module.log_px_given_z(x, out)


def elbo_terms(module, x, rows, seed, n_samples):
    """(E_q log p(x|z) estimated with n_samples draws, KL) per row, shape (B,) each."""
    _, _, _, kl, log_px = _decoded(module, x, rows, seed, n_samples)
    return log_px.mean(0), kl


def iwae_rows(module, x, rows, seed, n_samples, sample_block):
    """log (1/S) sum_s p(x, z_s)/q(z_s|x) per row, S = n_samples drawn ``sample_block`` at a time."""
    total = None
    encoded = module.encode(x)
    for s0 in range(0, n_samples, sample_block):
        k = min(sample_block, n_samples - s0)
        mu, logvar, eps, _, log_px = _decoded(module, x, rows, seed, k, s0, encoded)
        part = F.iwae_bound(log_px, mu, logvar, eps, backend=module.backend) + math.log(k)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(n_samples)


def negative_bound(module, x, rows, seed, n_samples):
    """(the objective's negative bound, -E log p(x|z), KL) per row, with beta = 1 and no free bits:
    the validation loss of a fit ('elbo': the L-sample ELBO; 'iwae': the K-sample bound). A module with
    its own ``negative_bound(x)`` (VQ-VAE: no noise, no KL) gives its terms instead."""
    if hasattr(module, "negative_bound"):
        return module.negative_bound(x)
    mu, logvar, eps, kl, log_px = _decoded(module, x, rows, seed, n_samples)
    recon = log_px.mean(0)
    if module.objective == "iwae":
        loss = -F.iwae_bound(log_px, mu, logvar, eps, backend=module.backend)
    else:
        loss = kl - recon
    return loss, -recon, kl
