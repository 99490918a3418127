"""VQ-VAE (van den Oord et al., 2017) as a torch module: the encoder's output split into vectors,
each rounded to its nearest code of a learned codebook (``fastlvm.functional.vector_quantize``),
and decoded.

Per row, the loss is -log p(x | z_q) + sum over the row's vectors of |sg(z_e) - e|^2 +
commitment |z_e - sg(e)|^2. The codebook learns by that codebook term (``ema_decay=None``), or by
exponential moving averages of the codes' statistics (n_k, s_k) (``codebook_statistics``, the
sufficient statistics of k-means' hard E-step):

    N_k <- decay N_k + (1 - decay) n_k,   m_k <- decay m_k + (1 - decay) s_k,   e_k = m_k / N_k,

so decay = 0 is one Lloyd iteration on the batch. A code whose (moving average) usage falls
below ``dead_code_threshold`` times the mean usage is dead: it is re-seeded on the batch's
worst-quantised vectors, as k-means re-seeds an emptied cluster on the rows farthest from their
centres.
"""

import torch
from torch import nn

import fastlvm.functional as F
from fastlvm.vae.model import VAEModule

USAGE_DECAY = 0.99  # moving average of the codes' usage when the codebook learns by its loss


def _global_rows(t):
    """The rows of t from every process of the torch.distributed group, in rank order (each rank
    holds a contiguous share of the global batch, so this is the global batch's order); t itself
    without a group. Seeding and re-seeding the codebook from these makes every process choose
    the same vectors, the ones one process would choose from the whole batch."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = t.new_zeros((max(counts),) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


class Codebook(nn.Module):
    """M code vectors of dimension Dc, with the moving averages that update and police them.

    ``vectors`` is a Parameter when the codebook learns by its loss term, a buffer under the EMA.
    ``usage`` is the moving average of the codes' counts in both cases; ``ready`` is 0 until
    the first batch has seeded the vectors."""

    def __init__(self, size, dim, ema_decay, dead_code_threshold=0.0, dtype=torch.float32):
        super().__init__()
        self.size, self.dim = size, dim
        self.ema_decay, self.dead_code_threshold = ema_decay, dead_code_threshold
        vectors = torch.zeros(size, dim, dtype=dtype)
        if ema_decay is None:
            self.vectors = nn.Parameter(vectors)
        else:
            self.register_buffer("vectors", vectors)
            self.register_buffer("ema_sum", torch.zeros(size, dim, dtype=torch.float64))
        self.register_buffer("usage", torch.ones(size, dtype=torch.float64))
        self.register_buffer("ready", torch.zeros((), dtype=torch.int64))
        self.reseeded = 0  # codes re-seeded since the counter was last read

    @torch.no_grad()
    def load(self, vectors):
        """Sets the code vectors (and the EMA's sums, with unit usage)."""
        self.vectors.copy_(vectors)
        self.usage.fill_(1.0)
        if self.ema_decay is not None:
            self.ema_sum.copy_(self.vectors.to(torch.float64))
        self.ready.fill_(1)

    @torch.no_grad()
    def seed_from(self, z_e, generator=None):
        """Code vectors drawn from the rows of z_e (without replacement while there are enough)."""
        n = z_e.shape[0]
        if n >= self.size:
            rows = torch.randperm(n, generator=generator, device="cpu")[: self.size]
        else:
            rows = torch.randint(0, n, (self.size,), generator=generator, device="cpu")
        self.load(z_e[rows.to(z_e.device)])

    @torch.no_grad()
    def ema_update(self, counts, sums):
        """One step of the moving averages from a batch's statistics (float64, (M,) and (M, Dc))."""
        decay = self.ema_decay if self.ema_decay is not None else USAGE_DECAY
        counts = counts.to(self.usage.device)
        self.usage.mul_(decay).add_(counts, alpha=1.0 - decay)
        if self.ema_decay is None:
            return
        self.ema_sum.mul_(self.ema_decay).add_(sums.to(self.ema_sum.device), alpha=1.0 - self.ema_decay)
        used = self.usage > 0
        means = self.ema_sum / torch.where(used, self.usage, 1.0)[:, None]
        self.vectors.copy_(torch.where(used[:, None], means.to(self.vectors.dtype), self.vectors))

    @torch.no_grad()
    def reseed_dead(self, z_e, sq_err):
        """Re-seeds the dead codes on the vectors with the largest quantisation errors sq_err among
        z_e, this process's vectors (with a process group, those of the whole global batch)."""
        if self.dead_code_threshold <= 0:
            return 0
        mean = float(self.usage.mean())
        dead = torch.nonzero(self.usage < self.dead_code_threshold * mean).flatten()
        if dead.numel() == 0:  # usage is the same on every process, so they all return here or none
            return 0
        z_e, sq_err = _global_rows(z_e), _global_rows(sq_err)
        if z_e.shape[0] == 0:
            return 0
        worst = torch.argsort(sq_err, descending=True, stable=True)[: dead.numel()]
        worst = worst.repeat(-(-dead.numel() // worst.numel()))[: dead.numel()]  # fewer rows than codes
        new = z_e[worst].to(self.vectors.dtype)
        self.vectors[dead] = new
        self.usage[dead] = mean
        if self.ema_decay is not None:
            self.ema_sum[dead] = new.to(torch.float64) * mean
        self.reseeded += int(dead.numel())
        return int(dead.numel())


class VQVAEModule(VAEModule):
    """Encoder x (B, D) -> (B, codes_per_row * code_dim) = z_e, the codebook, decoder z_q -> x."""

    def __init__(self, encoder, decoder, n_features, codebook_size, code_dim, codes_per_row, commitment,
                 ema_decay, dead_code_threshold, likelihood, decoder_variance, backend="auto", dtype=torch.float32):
        super().__init__(encoder, decoder, n_features, code_dim * codes_per_row, likelihood, decoder_variance,
                         "elbo", backend)
        self.code_dim, self.codes_per_row, self.commitment = code_dim, codes_per_row, commitment
        self.codebook = Codebook(codebook_size, code_dim, ema_decay, dead_code_threshold, dtype)
        self._pending = None

    def encode(self, x):
        return self.encoder(x)

    def quantize(self, z_e):
        """(z_q (B, latent), codes (B, codes_per_row), VQ loss per row as one mean) of z_e (B, latent)."""
        B = z_e.shape[0]
        z_q, codes, loss = F.vector_quantize(z_e.reshape(B, self.codes_per_row, self.code_dim),
                                             self.codebook.vectors, commitment=self.commitment,
                                             backend=self.backend)
        return z_q.reshape(B, -1), codes, loss * self.codes_per_row

    def codes_to_latent(self, codes):
        return self.codebook.vectors[codes].reshape(codes.shape[0], -1)

    def _terms(self, x):
        """(-log p(x | z_q) (B,), VQ loss per row (scalar mean), z_e, z_q, codes)."""
        z_e = self.encode(x)
        if self.training and not int(self.codebook.ready):
            self.codebook.seed_from(_global_rows(z_e.detach().reshape(-1, self.code_dim)))
        z_q, codes, vq_loss = self.quantize(z_e)
        nll = -self.log_px_given_z(x, self.decoder(z_q))
        return nll, vq_loss, z_e, z_q, codes

    def forward(self, x, noise, beta, free_bits, scale, reduce_kl=None):
        """Loss of a batch (mean over rows of -log p(x | z_q) + the VQ terms) scaled by ``scale``, and the
        detached sums (loss, -log p(x | z_q), VQ loss) over its rows; in training, then, the codebook's
        moving averages and dead codes are updated (noise, beta and free bits have no part here)."""
        B = x.shape[0]
        if B == 0:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero, torch.zeros(3, dtype=x.dtype)
        if self._pending is not None:  # re-seeding deferred from the last step (see _update_codebook)
            self.codebook.reseed_dead(*self._pending)
            self._pending = None
        nll, vq_loss, z_e, z_q, codes = self._terms(x)
        loss = nll.mean() + vq_loss
        if self.training:
            self._update_codebook(z_e.detach(), z_q.detach(), codes)
        with torch.no_grad():
            stats = torch.stack((loss.detach() * B, nll.detach().sum(), vq_loss.detach() * B))
        return (loss if scale == 1.0 else loss * scale), stats

    @torch.no_grad()
    def _update_codebook(self, z_e, z_q, codes):
        vectors = z_e.reshape(-1, self.code_dim)
        counts, sums = F.codebook_statistics(vectors, codes.reshape(-1), self.codebook.size, backend=self.backend)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            both = torch.cat((counts[:, None], sums), 1)
            dist.all_reduce(both)
            counts, sums = both[:, 0], both[:, 1:]
        self.codebook.ema_update(counts, sums)
        candidates = (vectors, (vectors - z_q.reshape(-1, self.code_dim)).square().sum(1))
        if self.codebook.ema_decay is None:
            # a learned codebook is saved for this step's backward: it may change only after it
            self._pending = candidates
        else:
            self.codebook.reseed_dead(*candidates)

    def negative_bound(self, x):
        """(loss, -log p(x | z_q), VQ loss) per row: the validation terms."""
        nll, _, z_e, z_q, _ = self._terms(x)
        vq_rows = (1.0 + self.commitment) * (z_e - z_q).square().sum(1)
        return nll + vq_rows, nll, vq_rows

    def epoch_report(self):
        """Entries for the epoch's history: codes re-seeded since the last report."""
        n, self.codebook.reseeded = self.codebook.reseeded, 0
        return {"reseeded_codes": n}
