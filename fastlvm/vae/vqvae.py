"""fastlvm.VQVAE: a vector-quantised autoencoder (van den Oord et al., 2017) with the conventions of
fastlvm.VAE (fit inputs, validation and early stopping, progress, checkpoints, save/load), trained
on ``fastlvm.functional.vector_quantize`` (see ``fastlvm.vae.vq`` for the module and its codebook).
"""

import copy
import math
import numbers

import numpy as np
import torch

from fastlvm._validation import check_scalar
from fastlvm.vae.estimator import VAE
from fastlvm.vae.model import mlp
from fastlvm.vae.vq import VQVAEModule


class VQVAE(VAE):
    """Vector-quantised autoencoder fitted by Adam (codebook by EMA or by its loss term).

    The encoder maps a row to codes_per_row vectors of code_dim; each is replaced by its nearest
    of codebook_size code vectors (squared Euclidean distance), and the decoder maps the
    codes_per_row * code_dim quantised values back to the row's likelihood p(x | z_q). The loss
    per row is -log p(x | z_q) + sum over its vectors of |sg(z_e) - e|^2 + commitment
    |z_e - sg(e)|^2, the gradient passing from z_q straight to z_e. ema_decay: the codebook
    follows exponential moving averages of its codes' counts and sums (with decay 0, every batch
    makes one Lloyd iteration); None learns it by the codebook term instead. A code whose moving
    average usage falls below dead_code_threshold times the mean is re-seeded on the batch's
    worst-quantised vectors (history_ counts them per epoch, "reseeded_codes"). The codebook is
    seeded from the encoder's vectors on the first batch. hidden, likelihood, decoder_variance
    and the training parameters are VAE's; encoder: (B, D) -> (B, codes_per_row * code_dim),
    decoder: (R, codes_per_row * code_dim) -> (R, D) (2 D with decoder_variance="output").

    Fitted attributes: model_, history_ (per epoch: loss, reconstruction = -log p(x | z_q), kl =
    the VQ terms per row, the same for validation, reseeded_codes, seconds, rows_per_s), n_epochs_,
    best_epoch_, code_frequencies_ (each code's share of the training vectors), n_features_in_.
    """

    _KIND = "fastlvm.VQVAE"
    _SUMMARY = "code_frequencies_"
    # The ELBO machinery of VAE that a VQ-VAE does not use, at the values that switch it off.
    objective, n_samples, beta, kl_warmup, free_bits = "elbo", 1, 1.0, 0, 0.0
    regularizer, alpha, lambda_ = "kl", 0.0, 1.0

    def __init__(self, codebook_size=512, code_dim=16, codes_per_row=4, commitment=0.25, ema_decay=0.99, *,
                 dead_code_threshold=0.01, hidden=(512, 256), likelihood="bernoulli", decoder_variance="feature",
                 batch_size=128, max_epochs=100, lr=1e-3, validation_fraction=0.1, early_stopping=True,
                 n_iter_no_change=10, random_state=None, device="cpu", dtype="float32", backend="auto",
                 checkpoint=None, verbose=0, encoder=None, decoder=None):
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.codes_per_row = codes_per_row
        self.commitment = commitment
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.hidden = hidden
        self.likelihood = likelihood
        self.decoder_variance = decoder_variance
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.lr = lr
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.checkpoint = checkpoint
        self.verbose = verbose
        self.encoder = encoder
        self.decoder = decoder

    @property
    def latent_dim(self):
        return self.codes_per_row * self.code_dim

    def _check_params(self):
        I = numbers.Integral  # noqa: E741
        check_scalar(self.codebook_size, "codebook_size", kind=I, low=1)
        check_scalar(self.code_dim, "code_dim", kind=I, low=1)
        check_scalar(self.codes_per_row, "codes_per_row", kind=I, low=1)
        check_scalar(self.commitment, "commitment", low=0)
        if self.ema_decay is not None:
            check_scalar(self.ema_decay, "ema_decay", low=0)
            if self.ema_decay >= 1:
                raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        check_scalar(self.dead_code_threshold, "dead_code_threshold", low=0)
        return super()._check_params()

    def _build_module(self, n_features, hidden, init_seed):
        D, Dz = n_features, self.latent_dim
        out_width = 2 * D if self.likelihood == "gaussian" and self.decoder_variance == "output" else D
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            encoder = copy.deepcopy(self.encoder) if self.encoder is not None else mlp((D, *hidden, Dz))
            decoder = copy.deepcopy(self.decoder) if self.decoder is not None else mlp((Dz, *reversed(hidden),
                                                                                         out_width))
        dtype = self._torch_dtype()
        module = VQVAEModule(encoder, decoder, D, int(self.codebook_size), int(self.code_dim),
                             int(self.codes_per_row), float(self.commitment),
                             None if self.ema_decay is None else float(self.ema_decay),
                             float(self.dead_code_threshold), self.likelihood, self.decoder_variance, self.backend,
                             dtype)
        module = module.to(device=self.device, dtype=dtype)
        module.codebook.usage.data = module.codebook.usage.data.to(torch.float64)  # .to(dtype) cast them
        if self.ema_decay is not None:
            module.codebook.ema_sum.data = module.codebook.ema_sum.data.to(torch.float64)
        _check_widths(module, out_width)
        return module

    def _identity(self, data, hidden):
        identity = self._base_identity(data, hidden)
        for name in ("latent_dim", "n_samples", "beta", "kl_warmup", "free_bits", "objective"):
            identity.pop(name)
        identity.update(codebook_size=int(self.codebook_size), code_dim=int(self.code_dim),
                        codes_per_row=int(self.codes_per_row), commitment=float(self.commitment),
                        ema_decay=None if self.ema_decay is None else float(self.ema_decay),
                        dead_code_threshold=float(self.dead_code_threshold))
        return identity

    def _summary(self, module, data):
        """Each code's share of the training rows' vectors."""
        counts = torch.zeros(int(self.codebook_size), dtype=torch.float64)
        with torch.no_grad():
            for x, _ in data.blocks("train", self._eval_rows(module, 1)):
                codes = module.quantize(module.encode(x))[1]
                counts += torch.bincount(codes.reshape(-1).cpu(), minlength=counts.shape[0]).to(torch.float64)
        return (counts / max(float(counts.sum()), 1.0)).numpy()

    # ------------------------------------------------------------------ public methods

    def transform(self, X):
        """The codes of every row: (N, codes_per_row) int64."""
        return self._map_rows(X, lambda m, x, rows: m.quantize(m.encode(x))[1])

    def encode(self, X):
        """The encoder's vectors before quantisation, z_e: (N, codes_per_row * code_dim)."""
        return self._map_rows(X, lambda m, x, rows: m.encode(x))

    def decode(self, codes):
        """Decoder means E[x | z_q] for rows of codes (N, codes_per_row): probabilities for Bernoulli."""
        module = self._fitted()
        is_torch = isinstance(codes, torch.Tensor)
        C = codes.detach().cpu() if is_torch else torch.from_numpy(np.asarray(codes))
        if C.dim() != 2 or C.shape[1] != self.codes_per_row:
            raise ValueError(f"codes must have shape (n, codes_per_row={self.codes_per_row}), got {tuple(C.shape)}")
        if C.dtype.is_floating_point or C.dtype == torch.bool or C.dtype.is_complex:
            raise TypeError(f"codes must be integers, got {C.dtype}")
        if C.numel() and (int(C.min()) < 0 or int(C.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(C.min())}, {int(C.max())}]")
        C = C.to(device=next(module.parameters()).device, dtype=torch.int64)
        with torch.no_grad():
            module.eval()
            block = self._eval_rows(module, 1)
            parts = [module.decoder_mean(module.decoder(module.codes_to_latent(C[a : a + block])))
                     for a in range(0, C.shape[0], block)]
            out = torch.cat(parts) if parts else torch.empty((0, self.n_features_in_), dtype=self._torch_dtype())
        return out.to(codes.device) if is_torch else out.cpu().numpy()

    def reconstruct(self, X):
        """Decoder means at the quantised encodings: decode(transform(X))."""
        return self._map_rows(X, lambda m, x, rows: m.decoder_mean(m.decoder(m.quantize(m.encode(x))[0])))

    def sample(self, n_samples=1, random_state=None):
        """Decoder means of n_samples rows of codes drawn independently, each position from the codes'
        empirical frequencies over the training rows (code_frequencies_): a VQ-VAE has no prior over
        codes of its own (the paper fits an autoregressive one afterwards)."""
        self._fitted()
        check_scalar(n_samples, "n_samples", kind=numbers.Integral, low=1)
        g = torch.Generator().manual_seed(self._root_seed_of(random_state) if random_state is not None
                                          else int(np.random.SeedSequence().entropy) % 2**63)
        p = torch.from_numpy(np.asarray(self.code_frequencies_, dtype=np.float64))
        codes = torch.multinomial(p, n_samples * self.codes_per_row, replacement=True, generator=g)
        return self.decode(codes.reshape(n_samples, self.codes_per_row).numpy())

    def perplexity(self, X):
        """exp(entropy) of the codes' frequencies over X's vectors: the number of codes in effective use
        (1 when one code takes everything, codebook_size when all are used equally)."""
        codes = _as_tensor(self.transform(X)).reshape(-1).cpu()
        if codes.numel() == 0:
            raise ValueError("X has no rows")
        p = torch.bincount(codes, minlength=int(self.codebook_size)).to(torch.float64) / codes.numel()
        p = p[p > 0]
        return float(math.exp(-float((p * p.log()).sum())))

    def score_samples(self, X, *args, **kwargs):
        raise AttributeError("a VQ-VAE has no likelihood bound of its own; see reconstruct and perplexity")

    elbo = score = active_units = score_samples

    def fit_transform(self, X, y=None):
        return self.fit(X).transform(X)


def _as_tensor(a):
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def _check_widths(module, out_width):
    p = next(module.parameters())
    with torch.no_grad():
        try:
            h = module.encoder(torch.zeros((2, module.n_features), dtype=p.dtype, device=p.device))
            ok = isinstance(h, torch.Tensor) and h.shape == (2, module.latent_dim)
        except RuntimeError as e:
            raise ValueError(f"the encoder fails on rows of {module.n_features} features: {e}") from None
        if not ok:
            raise ValueError(f"the encoder must return (batch, codes_per_row * code_dim) = (batch, "
                             f"{module.latent_dim}); on 2 rows it returned {getattr(h, 'shape', type(h).__name__)}")
        try:
            out = module.decoder(torch.zeros((2, module.latent_dim), dtype=p.dtype, device=p.device))
            ok = isinstance(out, torch.Tensor) and out.shape == (2, out_width)
        except RuntimeError as e:
            raise ValueError(f"the decoder fails on latent rows of {module.latent_dim}: {e}") from None
        if not ok:
            raise ValueError(f"the decoder must return (batch, {out_width}); on 2 latent rows it returned "
                             f"{getattr(out, 'shape', type(out).__name__)}")


__all__ = ["VQVAE"]
