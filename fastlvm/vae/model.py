"""The VAE as a torch module: encoder, decoder, the likelihood p(x|z), and the objectives over the
fused kernels of ``fastlvm.functional``.

- Encoder: x (B, D) -> (B, 2 Dz), read as [mu, logvar] of q(z|x) = N(mu, diag exp(logvar)).
- Decoder: z (R, Dz) -> (R, width): Bernoulli logits (width D), a Gaussian mean (width D), or a
  Gaussian mean and log-variance (width 2 D, ``decoder_variance="output"``).
- Objectives, per row (Kingma & Welling, 2014; Burda et al., 2016; Kingma et al., 2016):
  ``"elbo"``: (1/L) sum_l log p(x | z_l) - beta KL(q(z|x) || N(0, I)), z_l = mu + sigma eps_l,
  through ``reparameterize`` (z and the analytic KL in one kernel) and ``negative_elbo`` (the
  loss reduced inside the kernel, gradients computed in its forward pass); with free bits
  lambda > 0 the KL term of a batch is sum_j max(lambda, mean_b KL_bj).
  ``"iwae"``: log (1/K) sum_k p(x, z_k) / q(z_k | x) through ``iwae_bound``.
- InfoVAE regularisers (Zhao et al., 2017): E_q log p(x|z) - (1 - alpha) KL - (alpha + lambda - 1)
  MMD(q(z) || p(z)), the MMD between the batch's samples z and N(0, I) draws through ``mmd``
  (kl_weight = 1 - alpha scales beta's KL term, mmd_weight = alpha + lambda - 1).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

import fastlvm.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
REGULARIZERS = ("kl", "mmd", "kl+mmd")
DECODER_VARIANCES = ("feature", "shared", "output")


@dataclass(frozen=True)
class RowNoise:
    """The noise of a batch: samples first_sample .. first_sample + n_samples - 1 of each row's
    stream, a pure function of (seed, step, the row's global index) (``fastlvm.functional.row_noise``),
    whatever batch, process or block of samples the row is in."""

    seed: int
    step: int
    rows: object  # (B,) int64 global row indices: a NumPy array or a tensor
    n_samples: int
    first_sample: int = 0

    def eps(self, dim, dtype, device, backend="auto"):
        """The noise materialised on ``device``: (n_samples, B, dim)."""
        rows = torch.as_tensor(self.rows).to(device)
        return F.row_noise(rows, self.n_samples, dim, seed=self.seed, step=self.step,
                           first_sample=self.first_sample, dtype=dtype, backend=backend)


def mlp(sizes, activation=nn.ReLU):
    """Linear layers of the given widths with ``activation`` between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def kl_per_dimension(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per row and latent dimension: (B, Dz)."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)


class VAEModule(nn.Module):
    """Encoder, decoder and likelihood parameters; ``forward`` is one training step's loss."""

    def __init__(self, encoder, decoder, n_features, latent_dim, likelihood, decoder_variance,
                 objective="elbo", backend="auto", kl_weight=1.0, mmd_weight=0.0):
        super().__init__()
        self.kl_weight, self.mmd_weight = kl_weight, mmd_weight
        self.encoder, self.decoder = encoder, decoder
        self.n_features, self.latent_dim = n_features, latent_dim
        self.likelihood, self.decoder_variance = likelihood, decoder_variance
        self.objective, self.backend = objective, backend
        self.gaussian = likelihood == "gaussian"
        variance = decoder_variance if self.gaussian else None
        if variance == "feature":
            self.logvar = nn.Parameter(torch.zeros(n_features))
        elif variance == "shared":
            self.logvar = nn.Parameter(torch.zeros(1))
        elif variance is not None and variance != "output":  # a fixed variance
            self.register_buffer("logvar", torch.full((n_features,), math.log(float(variance))))
        else:
            self.logvar = None

    @property
    def decoder_width(self):
        return 2 * self.n_features if self.gaussian and self.decoder_variance == "output" else self.n_features

    # ------------------------------------------------------------------ pieces

    def encode(self, x):
        h = self.encoder(x)
        return h[..., : self.latent_dim], h[..., self.latent_dim :]

    def decoder_terms(self, out):
        """The likelihood's operands for negative_elbo / the log-likelihoods, from decoder outputs."""
        if not self.gaussian:
            return {"logits": out}
        D = self.n_features
        if self.decoder_variance == "output":
            return {"mean": out[..., :D], "logvar": out[..., D:]}
        logvar = self.logvar
        if logvar.shape[0] != D:
            logvar = logvar.expand(D)
        return {"mean": out, "logvar": logvar}

    def decoder_mean(self, out):
        """E[x | z]: probabilities for Bernoulli, the mean for Gaussian."""
        return torch.sigmoid(out) if not self.gaussian else out[..., : self.n_features]

    def log_px_given_z(self, x, out):
        """log p(x | z) for x (B, D) and decoder outputs (..., B, width): shape (..., B)."""
        terms = self.decoder_terms(out)
        if self.gaussian:
            return F.gaussian_log_likelihood(x, terms["mean"], terms["logvar"], backend=self.backend)
        return F.bernoulli_log_likelihood(x, terms["logits"], backend=self.backend)

    def decode_samples(self, eps, mu, logvar):
        """z (S, B, Dz) and kl (B,) from the noise, and the decoder outputs (S, B, width)."""
        z, kl = F.reparameterize(mu, logvar, eps, backend=self.backend)
        return z, kl, self._decode(z)

    def _decode(self, z):
        S, B, Dz = z.shape
        return self.decoder(z.reshape(S * B, Dz)).reshape(S, B, -1)

    # ------------------------------------------------------------------ training objective

    def forward(self, x, noise, beta, free_bits, scale, reduce_kl=None):
        """Loss of a batch scaled by ``scale`` and the detached sums (loss, -log p(x|z), KL) over
        its rows. x (B, D); noise: the batch's RowNoise, drawn inside the reparameterisation
        kernel for the ELBO (materialised for the IWAE, whose bound reads it). An empty batch (a
        rank without rows of a small global batch) gives zero loss with every parameter in its graph, as DistributedDataParallel needs.

        With free bits, ``reduce_kl`` (sums of a (Dz,) tensor over the processes, or None)
        turns the batch's per-dimension KL sums into the global batch's; the caller's ``scale``
        makes the loss the global batch's sum over rows divided by its row count."""
        B = x.shape[0]
        if B == 0:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero, torch.zeros(3, dtype=x.dtype)
        mu, logvar = self.encode(x)
        if self.objective == "iwae":
            eps = noise.eps(self.latent_dim, mu.dtype, mu.device, self.backend)
            z, kl, out = self.decode_samples(eps, mu, logvar)
            log_px = self.log_px_given_z(x, out)
            loss = -F.iwae_bound(log_px, mu, logvar, eps, backend=self.backend).mean()
            with torch.no_grad():
                kl_sum = kl.sum()
                recon_sum = -log_px.mean(0).sum()
        else:
            z, kl = F.reparameterize(mu, logvar, n_samples=noise.n_samples, seed=noise.seed, rows=noise.rows,
                                     step=noise.step, backend=self.backend)
            out = self._decode(z)
            beta = beta * self.kl_weight
            kl_term = kl if beta == 1.0 else beta * kl
            if free_bits > 0.0:
                kl_term, kl_sum = self._free_bits_kl(mu, logvar, beta, free_bits, reduce_kl, B)
            else:
                kl_sum = kl.detach().sum()
            loss = F.negative_elbo(x, kl_term, backend=self.backend, **self.decoder_terms(out))
            with torch.no_grad():
                recon_sum = loss.detach() * B - kl_term.detach().sum()
            if self.mmd_weight and z.shape[0] * z.shape[1] > 1:
                loss = loss + self.mmd_weight * F.mmd(z.reshape(-1, self.latent_dim), backend=self.backend)
        stats = torch.stack((loss.detach() * B, recon_sum, kl_sum))
        return (loss if scale == 1.0 else loss * scale), stats

    def _free_bits_kl(self, mu, logvar, beta, free_bits, reduce_kl, B):
        """Per-row KL terms whose batch mean is beta * sum_j max(free_bits, mean_b KL_bj) (value
        and gradient); a dimension below the threshold gets no gradient."""
        kl_dims = kl_per_dimension(mu, logvar)
        with torch.no_grad():
            sums = kl_dims.sum(0)
            total_rows = torch.tensor(float(B), dtype=sums.dtype)
            if reduce_kl is not None:
                both = reduce_kl(torch.cat((sums, total_rows.view(1))))
                sums, total_rows = both[:-1], both[-1]
            active = sums / total_rows > free_bits
            floor = free_bits * float((~active).sum())
        kl_rows = (kl_dims * active).sum(1) + floor
        return beta * kl_rows, kl_dims.detach().sum()
