"""The VAE objective in plain PyTorch, written from the densities: what "correct" means.

No fusion, no shortcuts beyond the numerically stable forms a careful reader would write;
autograd supplies every gradient. The fast kernels (C++, Triton) are tested against these
functions, and ``backend='torch'`` in :mod:`fastlvm.functional` runs them.

Imports nothing from the package.
"""

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(mu, logvar, eps):
    """z = mu + sigma * eps with sigma = exp(logvar / 2); eps (B, Dz) or (S, B, Dz)."""
    return mu + torch.exp(0.5 * logvar) * eps


def kl_standard_normal(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row: 0.5 sum_j (exp(lv) + mu^2 - 1 - lv)."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar).sum(-1)


def gaussian_log_likelihood(x, mean, logvar=None):
    """sum_d log N(x_d | mean_d, exp(logvar_d)); logvar None is unit variance. Broadcasts."""
    if logvar is None:
        logvar = torch.zeros((), dtype=mean.dtype, device=mean.device)
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar)).sum(-1)


def softplus(logits):
    """log(1 + exp(l)) = max(l, 0) + log1p(exp(-|l|)), exact for every finite l.

    max(l, 0) is written (l + |l|) / 2 so that autograd's derivative at l = 0 is the true 1/2
    (clamp and relu give 1 and 0 there). torch.nn.functional.softplus returns l itself above
    a threshold, an approximation.
    """
    return 0.5 * (logits + logits.abs()) + torch.log1p(torch.exp(-logits.abs()))


def bernoulli_log_likelihood(x, logits):
    """sum_d log Bernoulli(x_d | sigmoid(l_d)) = sum_d [x_d l_d - softplus(l_d)]. Broadcasts."""
    return (x * logits - softplus(logits)).sum(-1)


def standard_normal_log_prob(z):
    """log N(z | 0, I) summed over the last dimension."""
    return -0.5 * (LOG_2PI + z * z).sum(-1)


def diagonal_normal_log_prob(z, mu, logvar):
    """log N(z | mu, diag exp(logvar)) summed over the last dimension."""
    return gaussian_log_likelihood(z, mu, logvar)


def log_importance_weights(log_px_given_z, mu, logvar, eps):
    """log w_sb = log p(x_b|z_sb) + log p(z_sb) - log q(z_sb|x_b), z_sb = mu_b + sigma_b eps_sb."""
    z = reparameterize(mu, logvar, eps)
    return log_px_given_z + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, mu, logvar)


def iwae_bound(log_px_given_z, mu, logvar, eps):
    """log (1/S) sum_s w_sb over the S samples (dim 0): the importance-weighted bound (B,)."""
    log_w = log_importance_weights(log_px_given_z, mu, logvar, eps)
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


# Counter-based normal noise: the specification every backend reproduces.
#
# The normal for flat element i = s*B*Dz + b*Dz + j is a pure function of (seed, i):
# Philox4x32-10 (Salmon et al., SC'11) with key (seed mod 2^32, seed >> 32) and counter
# (p mod 2^32, p >> 32, 0, 0) for the pair index p = i >> 1 gives words w0..w3;
# the 52-bit integers a1 = w0 << 20 | w1 >> 12 and a2 = w2 << 20 | w3 >> 12 give the uniforms
# u1 = 1 - a1 2^-52 in (0, 1] and u2 = a2 2^-52 in [0, 1);
# Box-Muller: element 2p is r cos(2 pi u2), element 2p+1 is r sin(2 pi u2), r = sqrt(-2 log u1).
# Computed in float64 and rounded to the requested dtype.

_MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a, m):
    """(hi, lo) 32-bit halves of a * m for int64 tensors a < 2^32 and an int m < 2^32.

    Split m in 16-bit halves so that no product leaves int64.
    """
    low = a * (m & 0xFFFF)
    t = a * (m >> 16) + (low >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 words: 4 words -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W[0]) & _MASK32
            k1 = (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _box_muller(words):
    """The normal pairs (..., 2) of Philox words w0..w3 (see above)."""
    w0, w1, w2, w3 = words
    u1 = 1.0 - ((w0 << 20) | (w1 >> 12)).to(torch.float64) * 2.0**-52
    u2 = ((w2 << 20) | (w3 >> 12)).to(torch.float64) * 2.0**-52
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    return torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1)


def _key(seed):
    return seed & _MASK32, (seed >> 32) & _MASK32


def normal_noise(n_samples, batch, dim, seed, dtype=torch.float64, device="cpu"):
    """Standard normal noise (n_samples, batch, dim), a pure function of (seed, element index)."""
    n = n_samples * batch * dim
    pair = torch.arange((n + 1) // 2, dtype=torch.int64, device=device)
    zero = torch.zeros_like(pair)
    eps = _box_muller(philox4x32_10((pair & _MASK32, pair >> 32, zero, zero), _key(seed))).reshape(-1)[:n]
    return eps.reshape(n_samples, batch, dim).to(dtype)


# Row-keyed noise: the stream of global row r at step t. Its element e = s*Dz + j (sample s,
# dimension j) is a pure function of (seed, t, r, e): the pair q = e >> 1 uses the counter
# (q mod 2^32, t mod 2^32, r mod 2^32, r >> 32) under the same key, then Box-Muller as above. A
# row's noise so does not depend on which rows share its batch, on which process holds it, or on
# how samples are blocked.


def row_noise(seed, step, rows, n_samples, dim, first_sample=0, dtype=torch.float64):
    """Samples first_sample .. first_sample + n_samples - 1 of each row's stream:
    (n_samples, len(rows), dim) on the device of ``rows`` (int64)."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    e0, n = first_sample * dim, n_samples * dim
    q = torch.arange(e0 >> 1, (e0 + n + 1) >> 1, dtype=torch.int64, device=rows.device)[None, :]
    r = rows[:, None]
    words = philox4x32_10((q.expand(len(rows), -1) & _MASK32, torch.full_like(r, step & _MASK32).expand(-1, q.shape[1]),
                           (r & _MASK32).expand(-1, q.shape[1]), (r >> 32).expand(-1, q.shape[1])), _key(seed))
    eps = _box_muller(words).reshape(len(rows), -1)[:, (e0 & 1):(e0 & 1) + n]
    return eps.reshape(len(rows), n_samples, dim).transpose(0, 1).to(dtype).contiguous()


# Maximum mean discrepancy (InfoVAE) and vector quantisation (VQ-VAE).


def squared_distances(a, b):
    """|a_i - b_j|^2 for rows a (n, D) and b (m, D): (n, m), written from the differences (exact
    zero on equal rows, and a gradient free of the norm expansion's cancellation)."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def mmd_kernel(sq_dist, kernel, c):
    """k(a, b) of the squared distance: 'imq' c / (c + d2), 'rbf' exp(-d2 / c)."""
    if kernel == "imq":
        return c / (c + sq_dist)
    return torch.exp(-sq_dist / c)


def mmd(x, y, kernel, c):
    """Unbiased (U-statistic) MMD^2 between the rows of x (n, D) and y (m, D):
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    def off_diagonal_mean(a):
        k = mmd_kernel(squared_distances(a, a), kernel, c)
        n = a.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    cross = mmd_kernel(squared_distances(x, y), kernel, c).mean()
    return off_diagonal_mean(x) + off_diagonal_mean(y) - 2.0 * cross


def nearest_codes(z, codebook):
    """argmin_k |z_i - e_k|^2 per row (ties to the lowest k) and the minimum: (codes, d2)."""
    d2 = squared_distances(z, codebook)
    d2_min, codes = d2.min(dim=1)
    return codes, d2_min


def vector_quantize(z_e, codebook, commitment):
    """(z_q, codes, loss) for rows z_e (N, D) (van den Oord et al., 2017): z_q = e_code with the
    straight-through gradient z_e + sg(e - z_e), and the loss, averaged over the N vectors,
    |sg(z_e) - e|^2 + commitment |z_e - sg(e)|^2."""
    codes, _ = nearest_codes(z_e.detach(), codebook.detach())
    e = codebook[codes]
    z_q = z_e + (e - z_e).detach()
    codebook_term = ((z_e.detach() - e) ** 2).sum(-1).mean()
    commitment_term = ((z_e - e.detach()) ** 2).sum(-1).mean()
    return z_q, codes, codebook_term + commitment * commitment_term


def codebook_statistics(z_e, codes, n_codes):
    """(counts (M,), sums (M, D)) in float64: n_k = #{i: code_i = k}, s_k = sum_{code_i = k} z_i."""
    z = z_e.detach().to(torch.float64)
    counts = torch.zeros(n_codes, dtype=torch.float64, device=z.device)
    counts.index_add_(0, codes, torch.ones_like(codes, dtype=torch.float64))
    sums = torch.zeros((n_codes, z.shape[1]), dtype=torch.float64, device=z.device)
    sums.index_add_(0, codes, z)
    return counts, sums
