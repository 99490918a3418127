"""fastlvm.VAE: a variational autoencoder with scikit-learn's estimator conventions, trained on
the fused objective of ``fastlvm.functional``.

NumPy in, NumPy out; torch in, torch out. ``fit`` takes in-memory arrays and tensors, the
out-of-core inputs of ``GaussianMixture.fit`` (np.memmap, h5py/Zarr datasets, chunk callables)
and torch DataLoaders. See ``fastlvm.vae.trainer`` for the loop and ``fastlvm.vae.model`` for the
objectives.
"""

import copy
import json
import numbers
import os

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from fastlvm._validation import check_scalar
from fastlvm.vae import state as state_file
from fastlvm.vae.data import InMemory, as_vae_data
from fastlvm.vae.evaluate import elbo_terms, iwae_rows
from fastlvm.vae.model import DECODER_VARIANCES, LIKELIHOODS, REGULARIZERS, VAEModule, kl_per_dimension, mlp
from fastlvm.vae.trainer import Trainer, distributed

MODEL_KIND = "fastlvm.VAE"
MODEL_FORMAT = 1
_OBJECTIVES = ("elbo", "iwae")
_BACKENDS = ("auto", "cpp", "triton", "torch")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Evaluation blocks: rows x samples x (widest layer) numbers of the model's dtype at most this
# many bytes (score_samples' default memory bound).
EVAL_BYTES = 64 << 20


def _seed_words(root, tag, n=1):
    """n 63-bit seeds that are a pure function of (root seed, tag)."""
    words = np.random.SeedSequence([int(root), tag]).generate_state(n, np.uint64)
    return [int(w) >> 1 for w in words]


class VAE(BaseEstimator):
    """Variational autoencoder fitted by Adam on the ELBO or the importance-weighted bound.

    latent_dim: Dz. hidden: widths of the MLP's hidden layers (ReLU); the decoder mirrors them.
    ``hidden=()`` makes encoder and decoder linear. likelihood: "bernoulli" (data in [0, 1]) or
    "gaussian", whose variance is ``decoder_variance``: "feature" (one learned variance per
    feature), "shared" (one learned variance), "output" (the decoder outputs a log-variance per
    row and feature: width 2 D), or a float (fixed). objective: "elbo" (n_samples = L draws per
    row, beta, kl_warmup epochs of linear warm-up of beta from 0, free_bits nats per latent
    dimension below which its KL is not penalised) or "iwae" (k = n_samples; beta, kl_warmup and
    free_bits must keep their defaults). regularizer: "kl" (the ELBO's), or InfoVAE's (Zhao et al., 2017)
    "mmd" or "kl+mmd": maximise E_q log p(x|z) - (1 - alpha) KL(q(z|x) || p(z)) - (alpha + lambda_ - 1)
    MMD(q(z) || p(z)), the MMD (inverse multiquadric kernel, fastlvm.functional.mmd) between the batch's
    samples z and as many N(0, I) draws; "mmd" is alpha = 1 (no KL term: the MMD alone keeps the
    aggregate posterior near the prior, without pushing each q(z|x) to it, so latent codes stay
    informative). alpha and lambda_ belong to the InfoVAE regularisers; beta, warm-up and free bits
    still shape the KL term. The validation loss stays the beta = 1 ELBO. validation_fraction of the rows are held out (chosen by a
    hash of the row index); early stopping keeps the best epoch by validation loss (training loss
    without validation rows) after n_iter_no_change epochs without improvement. dtype: "float32" or
    "float64"; backend: the kernels of fastlvm.functional ('auto', 'cpp', 'triton', 'torch').
    checkpoint: a path written atomically after every epoch; a later fit with the same path resumes.
    verbose: 1 prints a line per epoch, 2 draws a tqdm bar. encoder, decoder: torch modules that
    replace the MLPs (encoder: (B, D) -> (B, 2 Dz) = [mu, logvar]; decoder: (R, Dz) -> (R, D), or
    (R, 2 D) with decoder_variance="output"); they are copied, not trained in place.

    Fitted attributes: model_ (the torch module), history_ (per epoch: loss, reconstruction, kl,
    val_loss, val_reconstruction, val_kl, beta, seconds, rows_per_s), n_epochs_, best_epoch_,
    kl_per_dim_ (mean KL per latent dimension over the training rows), n_features_in_.
    """

    _KIND = MODEL_KIND
    _SUMMARY = "kl_per_dim_"  # a per-fit array computed over the training rows, saved with the model

    def __init__(self, latent_dim=16, *, hidden=(512, 256), likelihood="bernoulli", decoder_variance="feature",
                 objective="elbo", n_samples=1, beta=1.0, kl_warmup=0, free_bits=0.0, batch_size=128,
                 max_epochs=100, lr=1e-3, validation_fraction=0.1, early_stopping=True, n_iter_no_change=10,
                 random_state=None, device="cpu", dtype="float32", backend="auto", checkpoint=None, verbose=0,
                 encoder=None, decoder=None, regularizer="kl", alpha=0.0, lambda_=1.0):
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.likelihood = likelihood
        self.decoder_variance = decoder_variance
        self.objective = objective
        self.n_samples = n_samples
        self.beta = beta
        self.kl_warmup = kl_warmup
        self.free_bits = free_bits
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
        self.regularizer = regularizer
        self.alpha = alpha
        self.lambda_ = lambda_

    # ------------------------------------------------------------------ parameters

    def _check_params(self):
        I = numbers.Integral  # noqa: E741
        check_scalar(self.latent_dim, "latent_dim", kind=I, low=1)
        hidden = self.hidden
        if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if not isinstance(hidden, (tuple, list)) or any(
                isinstance(h, bool) or not isinstance(h, I) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a tuple of positive layer widths, got {self.hidden!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        variance = self.decoder_variance
        if isinstance(variance, str):
            if variance not in DECODER_VARIANCES:
                raise ValueError(f"decoder_variance must be one of {DECODER_VARIANCES} or a positive float, "
                                 f"got {variance!r}")
        else:
            check_scalar(variance, "decoder_variance", low=0, low_inclusive=False)
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {self.objective!r}")
        check_scalar(self.n_samples, "n_samples", kind=I, low=1)
        check_scalar(self.beta, "beta", low=0)
        check_scalar(self.kl_warmup, "kl_warmup", low=0)
        check_scalar(self.free_bits, "free_bits", low=0)
        if self.objective == "iwae" and (self.beta != 1 or self.kl_warmup != 0 or self.free_bits != 0):
            raise ValueError("beta, kl_warmup and free_bits shape the ELBO's KL term; objective='iwae' takes "
                             f"none (got beta={self.beta}, kl_warmup={self.kl_warmup}, free_bits={self.free_bits})")
        self._regularizer_weights()
        check_scalar(self.batch_size, "batch_size", kind=I, low=1)
        check_scalar(self.max_epochs, "max_epochs", kind=I, low=0)
        check_scalar(self.lr, "lr", low=0, low_inclusive=False)
        check_scalar(self.validation_fraction, "validation_fraction", low=0)
        if self.validation_fraction >= 1:
            raise ValueError(f"validation_fraction must be < 1, got {self.validation_fraction!r}")
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise TypeError(f"early_stopping must be a bool, got {self.early_stopping!r}")
        check_scalar(self.n_iter_no_change, "n_iter_no_change", kind=I, low=1)
        check_scalar(self.verbose, "verbose", kind=I, low=0)
        if self.dtype not in _DTYPES and self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device, got {self.device!r}") from None
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be None, a str or an os.PathLike, got {type(self.checkpoint).__name__}")
        for name in ("encoder", "decoder"):
            module = getattr(self, name)
            if module is not None and not isinstance(module, torch.nn.Module):
                raise TypeError(f"{name} must be None or a torch.nn.Module, got {type(module).__name__}")
        return tuple(int(h) for h in hidden)

    def _regularizer_weights(self):
        """(weight of the KL term, weight of the MMD term) of Zhao et al.'s objective."""
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        check_scalar(self.alpha, "alpha", high=1)
        check_scalar(self.lambda_, "lambda_", low=0)
        if self.regularizer == "kl":
            if self.alpha != 0 or self.lambda_ != 1:
                raise ValueError("alpha and lambda_ weigh InfoVAE's MMD term; regularizer='kl' takes neither (got "
                                 f"alpha={self.alpha}, lambda_={self.lambda_}); use regularizer='kl+mmd'")
            return 1.0, 0.0
        if self.objective != "elbo":
            raise ValueError(f"regularizer={self.regularizer!r} shapes the ELBO; objective='iwae' takes none")
        alpha = 1.0 if self.regularizer == "mmd" else float(self.alpha)
        if self.regularizer == "mmd" and self.alpha not in (0, 1):
            raise ValueError(f"regularizer='mmd' is alpha = 1 (no KL term), got alpha={self.alpha}; "
                             "use regularizer='kl+mmd' for another alpha")
        mmd_weight = alpha + float(self.lambda_) - 1.0
        if mmd_weight < 0:
            raise ValueError(f"alpha + lambda_ - 1 weighs the MMD and must be >= 0, got {mmd_weight}")
        return 1.0 - alpha, mmd_weight

    def _torch_dtype(self):
        return _DTYPES[self.dtype] if isinstance(self.dtype, str) else self.dtype

    def _dtype_name(self):
        return "float32" if self._torch_dtype() == torch.float32 else "float64"

    def _root_seed(self):
        if self.random_state is None:
            return int(np.random.SeedSequence().entropy) & 0x7FFFFFFFFFFFFFFF
        if isinstance(self.random_state, numbers.Integral) and not isinstance(self.random_state, bool):
            if self.random_state < 0:
                raise ValueError(f"random_state must be non-negative, got {self.random_state}")
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    # ------------------------------------------------------------------ building the module

    def _build_module(self, n_features, hidden, init_seed):
        D, Dz = n_features, self.latent_dim
        variance = self.decoder_variance
        out_width = 2 * D if self.likelihood == "gaussian" and variance == "output" else D
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            encoder = copy.deepcopy(self.encoder) if self.encoder is not None else mlp((D, *hidden, 2 * Dz))
            decoder = copy.deepcopy(self.decoder) if self.decoder is not None else mlp((Dz, *reversed(hidden),
                                                                                         out_width))
        kl_weight, mmd_weight = self._regularizer_weights()
        module = VAEModule(encoder, decoder, D, Dz, self.likelihood, variance, self.objective, self.backend,
                           kl_weight, mmd_weight)
        module = module.to(device=self.device, dtype=self._torch_dtype())
        _check_module_widths(module, out_width)
        return module

    def _identity(self, data, hidden):
        identity = self._base_identity(data, hidden)
        identity.update(regularizer=self.regularizer, alpha=float(self.alpha), lambda_=float(self.lambda_))
        return identity

    def _base_identity(self, data, hidden):
        return {"latent_dim": int(self.latent_dim), "hidden": list(hidden), "likelihood": self.likelihood,
                "decoder_variance": self.decoder_variance, "objective": self.objective,
                "n_samples": int(self.n_samples), "beta": float(self.beta), "kl_warmup": float(self.kl_warmup),
                "free_bits": float(self.free_bits), "batch_size": int(self.batch_size), "lr": float(self.lr),
                "validation_fraction": float(self.validation_fraction), "dtype": self._dtype_name(),
                "n_features": int(data.n_features), "n_rows": int(data.n_rows),
                "custom_encoder": self.encoder is not None, "custom_decoder": self.decoder is not None}

    # ------------------------------------------------------------------ fit

    def fit(self, X, y=None):
        """Fits the VAE to X (rows are observations); returns self."""
        hidden = self._check_params()
        bernoulli = self.likelihood == "bernoulli"
        data = as_vae_data(X, self._dtype_name(), self.device, bernoulli)
        if getattr(getattr(data, "source", None), "random_order", False) and self.validation_fraction > 0:
            raise ValueError("the DataLoader shuffles (a RandomSampler), so its rows change places between passes "
                             "and the validation rows would change with them; give a DataLoader with "
                             "shuffle=False (fastlvm shuffles the rows itself) or validation_fraction=0.")
        rank, world, _ = distributed()

        checkpoint = None if self.checkpoint is None else os.fspath(self.checkpoint)
        saved_seed = _checkpoint_seed(checkpoint) if checkpoint is not None else None
        # random_state=None resumes with the checkpoint's seed; a given one must match it
        root = saved_seed if saved_seed is not None and self.random_state is None else self._root_seed()
        if world > 1:  # every rank must use rank 0's seed (random_state=None draws one per process)
            root_t = torch.tensor([root], dtype=torch.int64)
            torch.distributed.broadcast(root_t, 0)
            root = int(root_t)
        init_seed, split_seed, shuffle_seed, noise_seed, eval_seed = _seed_words(root, 1, 5)

        n_train, n_held = data.split(split_seed, float(self.validation_fraction))
        if self.validation_fraction > 0 and n_held == 0:
            raise ValueError(f"validation_fraction={self.validation_fraction} holds out none of the {data.n_rows} "
                             "rows; use more rows or validation_fraction=0.")
        need = max(int(self.batch_size), world)
        if n_train < need:
            raise ValueError(f"X has {data.n_rows} rows, {n_train} of them for training after validation_fraction="
                             f"{self.validation_fraction}: fewer than a batch needs (batch_size={self.batch_size}"
                             f"{f', {world} processes' if world > 1 else ''}).")

        module = self._build_module(data.n_features, hidden, init_seed)
        cfg = {"lr": float(self.lr), "device": self.device, "dtype": self._torch_dtype(),
               "n_samples": int(self.n_samples), "beta": float(self.beta), "kl_warmup": float(self.kl_warmup),
               "free_bits": float(self.free_bits), "batch_size": int(self.batch_size),
               "max_epochs": int(self.max_epochs), "early_stopping": bool(self.early_stopping),
               "n_iter_no_change": int(self.n_iter_no_change), "verbose": int(self.verbose),
               "has_validation": n_held > 0, "steps_per_epoch": -(-n_train // int(self.batch_size)),
               "eval_rows": self._eval_rows(module, int(self.n_samples))}
        seeds = {"shuffle": shuffle_seed, "noise": noise_seed, "eval": eval_seed}
        identity = self._identity(data, hidden)
        identity["seed"] = str(root)
        trainer = Trainer(module, data, cfg, seeds, identity, checkpoint)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed ^ 0x5DEECE66D)  # the global stream of user modules (dropout)
            trainer.resume()
            trainer.run()
        module.eval()
        summary = self._summary(module, data)

        # Only now is anything assigned: a fit that raised leaves the estimator as it was.
        self.model_ = module
        self.n_features_in_ = data.n_features
        self.history_ = trainer.history
        self.n_epochs_ = trainer.epoch
        self.best_epoch_ = trainer.best_epoch
        setattr(self, self._SUMMARY, summary)
        self.seed_ = root
        self._eval_seed = eval_seed
        return self

    def _summary(self, module, data):
        """The fitted attribute named by _SUMMARY: the mean KL per latent dimension."""
        total, count = None, 0
        with torch.no_grad():
            for x, _ in data.blocks("train", self._eval_rows(module, 1)):
                mu, logvar = module.encode(x)
                part = kl_per_dimension(mu, logvar).sum(0).to(torch.float64).cpu()
                total = part if total is None else total + part
                count += x.shape[0]
        return (total / count).numpy()

    # ------------------------------------------------------------------ evaluation plumbing

    def _fitted(self):
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                                 "appropriate arguments before using this estimator.")
        return self.model_

    def _eval_rows(self, module, n_samples, max_bytes=EVAL_BYTES):
        """Rows per evaluation block with n_samples samples each within about max_bytes."""
        return max(1, _row_sample_budget(module, max_bytes) // n_samples)

    def _data(self, X):
        module = self._fitted()
        data = as_vae_data(X, self._dtype_name(), self.device, False, n_features=self.n_features_in_)
        if not isinstance(data, InMemory):
            data.split(0, 0.0)
        return module, data

    def _map_rows(self, X, fn, n_samples=1):
        """fn(module, x, rows) -> tensor or tuple of tensors per block, concatenated, in X's kind."""
        module, data = self._data(X)
        parts = []
        with torch.no_grad():
            module.eval()
            for x, rows in data.blocks("all", self._eval_rows(module, n_samples)):
                out = fn(module, x, rows)
                parts.append(out if isinstance(out, tuple) else (out,))
        outs = tuple(torch.cat(p) for p in zip(*parts))
        outs = tuple(_like_input(o, X) for o in outs)
        return outs if len(outs) > 1 else outs[0]

    def _noise_seed(self, random_state):
        if random_state is None:
            return self._eval_seed
        return _seed_words(self._root_seed_of(random_state), 2)[0]

    @staticmethod
    def _root_seed_of(random_state):
        if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
            return int(random_state)
        return int(check_random_state(random_state).randint(0, 2**31 - 1))

    # ------------------------------------------------------------------ public methods

    def transform(self, X):
        """Posterior means E_q[z | x], shape (N, latent_dim)."""
        return self._map_rows(X, lambda m, x, rows: m.encode(x)[0])

    def fit_transform(self, X, y=None):
        return self.fit(X).transform(X)

    def encode(self, X):
        """(mu, logvar) of q(z | x), each (N, latent_dim)."""
        return self._map_rows(X, lambda m, x, rows: m.encode(x))

    def decode(self, Z):
        """Decoder means E[x | z] for latent rows Z (N, latent_dim): probabilities for Bernoulli."""
        module = self._fitted()
        is_torch = isinstance(Z, torch.Tensor)
        T = Z.detach() if is_torch else torch.from_numpy(np.asarray(Z, dtype=np.float64))
        if T.dim() != 2 or T.shape[1] != self.latent_dim:
            raise ValueError(f"Z must have shape (n, latent_dim={self.latent_dim}), got {tuple(T.shape)}")
        if not bool(torch.isfinite(T).all()):
            row = int(torch.argmin(torch.isfinite(T).all(1).to(torch.uint8)))
            raise ValueError(f"Input Z contains NaN or infinity (first at row {row}).")
        T = T.to(device=next(module.parameters()).device, dtype=self._torch_dtype())
        with torch.no_grad():
            module.eval()
            block = self._eval_rows(module, 1)
            out = torch.cat([module.decoder_mean(module.decoder(T[a : a + block]))
                             for a in range(0, T.shape[0], block)]) if T.shape[0] else \
                torch.empty((0, self.n_features_in_), dtype=self._torch_dtype())
        return out.to(Z.device) if is_torch else out.cpu().numpy()

    def reconstruct(self, X):
        """Decoder means at the posterior means: decode(transform(X))."""
        return self._map_rows(X, lambda m, x, rows: m.decoder_mean(m.decoder(m.encode(x)[0])))

    def sample(self, n_samples=1, random_state=None):
        """Decoder means E[x | z] of n_samples draws z ~ N(0, I): (n_samples, n_features) NumPy."""
        self._fitted()
        check_scalar(n_samples, "n_samples", kind=numbers.Integral, low=1)
        g = torch.Generator().manual_seed(self._root_seed_of(random_state) if random_state is not None
                                          else int(np.random.SeedSequence().entropy) % 2**63)
        Z = torch.randn((n_samples, self.latent_dim), generator=g, dtype=torch.float64)
        return self.decode(Z.numpy())

    def elbo(self, X, n_samples=None, random_state=None):
        """The ELBO of every row (beta = 1), E_q log p(x|z) estimated with n_samples draws
        (default: the estimator's n_samples) and the analytic KL."""
        n = int(self.n_samples if n_samples is None else n_samples)
        check_scalar(n, "n_samples", kind=numbers.Integral, low=1)
        seed = self._noise_seed(random_state)

        def fn(module, x, rows):
            recon, kl = elbo_terms(module, x, rows, seed, n)
            return recon - kl

        return self._map_rows(X, fn, n)

    def score_samples(self, X, n_samples=1000, random_state=None, max_bytes=EVAL_BYTES):
        """Importance-weighted estimate of log p(x) per row with n_samples samples (iwae_bound).

        Rows and samples are processed in blocks whose decoder activations take about max_bytes:
        memory is bounded by max_bytes, not by N * n_samples * D."""
        check_scalar(n_samples, "n_samples", kind=numbers.Integral, low=1)
        check_scalar(max_bytes, "max_bytes", kind=numbers.Integral, low=1)
        module = self._fitted()
        seed = self._noise_seed(random_state)
        budget = _row_sample_budget(module, max_bytes)  # (row, sample) pairs in a block
        sample_block = min(n_samples, budget)
        row_block = max(1, budget // sample_block)
        module, data = self._data(X)
        parts = []
        with torch.no_grad():
            module.eval()
            for x, rows in data.blocks("all", row_block):
                parts.append(iwae_rows(module, x, rows, seed, n_samples, sample_block))
        return _like_input(torch.cat(parts), X)

    def score(self, X, y=None, n_samples=1000):
        """Mean of score_samples: the estimated log p(x) per row."""
        return float(_as_tensor(self.score_samples(X, n_samples=n_samples)).to(torch.float64).mean())

    def active_units(self, X, threshold=0.01):
        """Number of latent dimensions with Cov_x(E_q[z | x]) > threshold (Burda et al., 2016)."""
        module, data = self._data(X)
        s1 = s2 = None
        n = 0
        with torch.no_grad():
            module.eval()
            for x, _ in data.blocks("all", self._eval_rows(module, 1)):
                mu = module.encode(x)[0].to(torch.float64).cpu()
                if s1 is None:
                    shift = mu[0].clone()  # moments about the first row, against cancellation
                    s1, s2 = torch.zeros_like(shift), torch.zeros_like(shift)
                d = mu - shift
                s1 += d.sum(0)
                s2 += (d * d).sum(0)
                n += mu.shape[0]
        var = s2 / n - (s1 / n) ** 2
        return int((var > threshold).sum())

    # ------------------------------------------------------------------ files

    def save(self, path):
        """Writes the fitted model to path: a JSON config and the tensors in one .npz, no pickle
        (written to a temporary file and renamed)."""
        module = self._fitted()
        params = {k: v for k, v in self.get_params().items() if k not in ("encoder", "decoder")}
        params["dtype"] = self._dtype_name()
        params["device"] = str(params["device"])
        params["checkpoint"] = None if params["checkpoint"] is None else os.fspath(params["checkpoint"])
        params["hidden"] = list(self._check_params())
        if not isinstance(params["random_state"], (int, type(None))) or isinstance(params["random_state"], bool):
            params["random_state"] = None
        config = {"format": MODEL_FORMAT, "params": params, "custom_encoder": self.encoder is not None,
                  "custom_decoder": self.decoder is not None, "n_features_in_": int(self.n_features_in_),
                  "history_": self.history_, "n_epochs_": int(self.n_epochs_), "best_epoch_": int(self.best_epoch_),
                  self._SUMMARY: [float(v) for v in getattr(self, self._SUMMARY)], "seed_": str(self.seed_),
                  "eval_seed": str(self._eval_seed)}
        json.dumps(config)  # fail before writing anything
        state_file.write(path, self._KIND, config, state_file.state_tensors("model/", module.state_dict()))

    @classmethod
    def load(cls, path, encoder=None, decoder=None):
        """A VAE saved by ``save``. A model fitted with user encoder/decoder modules needs modules
        of the same architecture here (their weights are replaced by the saved ones). A damaged
        file or another kind of file raises ValueError; the file is only read."""
        config, tensors = state_file.read(path, cls._KIND, f"{cls._KIND} model file")
        try:
            if config["format"] != MODEL_FORMAT:
                raise ValueError(f"format {config['format']}, expected {MODEL_FORMAT}")
            params = dict(config["params"])
            params["hidden"] = tuple(params["hidden"])
            for name, module, custom in (("encoder", encoder, config["custom_encoder"]),
                                         ("decoder", decoder, config["custom_decoder"])):
                if custom and module is None:
                    raise TypeError(f"{path!r} was fitted with a user {name}: pass a module of the same "
                                    f"architecture, VAE.load(path, {name}=...)")
                params[name] = module if custom else None
            vae = cls(**params)
            hidden = vae._check_params()
            module = vae._build_module(config["n_features_in_"], hidden, 0)
            module.load_state_dict(state_file.load_state_dict("model/", tensors))
        except TypeError:
            raise
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{os.fspath(path)!r} is not a usable {cls._KIND} model file "
                             f"({type(e).__name__}: {e}).") from None
        module.eval()
        vae.model_ = module
        vae.n_features_in_ = config["n_features_in_"]
        vae.history_ = config["history_"]
        vae.n_epochs_ = config["n_epochs_"]
        vae.best_epoch_ = config["best_epoch_"]
        setattr(vae, cls._SUMMARY, np.asarray(config[cls._SUMMARY], dtype=np.float64))
        vae.seed_ = int(config["seed_"])
        vae._eval_seed = int(config["eval_seed"])
        return vae


# ---------------------------------------------------------------------- helpers


def _check_module_widths(module, out_width):
    """Runs encoder and decoder on one row and names the expected width if an output is wrong."""
    p = next(module.parameters())
    with torch.no_grad():
        try:
            h = module.encoder(torch.zeros((2, module.n_features), dtype=p.dtype, device=p.device))
        except RuntimeError as e:
            raise ValueError(f"the encoder fails on rows of {module.n_features} features: {e}") from None
        if not isinstance(h, torch.Tensor) or h.shape != (2, 2 * module.latent_dim):
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"the encoder must return (batch, 2 * latent_dim) = (batch, {2 * module.latent_dim}) "
                             f"[mu, logvar]; on 2 rows it returned {shape}")
        try:
            out = module.decoder(torch.zeros((2, module.latent_dim), dtype=p.dtype, device=p.device))
        except RuntimeError as e:
            raise ValueError(f"the decoder fails on latent rows of {module.latent_dim}: {e}") from None
        if not isinstance(out, torch.Tensor) or out.shape != (2, out_width):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the decoder must return (batch, {out_width})"
                             f"{' [mean, logvar]' if out_width == 2 * module.n_features else ''}; on 2 latent rows "
                             f"it returned {shape}")


def _row_sample_budget(module, max_bytes):
    """(row, sample) pairs whose activations (every layer's output, and ~4 copies of the data's
    and latent widths for the kernels' temporaries) fit in max_bytes."""
    widths = [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)]
    per_pair = sum(widths) + 4 * module.n_features + 4 * module.latent_dim
    itemsize = next(module.parameters()).element_size()
    return max(1, int(max_bytes) // (per_pair * itemsize))


def _checkpoint_seed(path):
    """The root seed stored in an existing checkpoint (so a resumed fit draws the same numbers)."""
    if not os.path.exists(path):
        return None
    from fastlvm.vae.trainer import CHECKPOINT_KIND

    config, _ = state_file.read(path, CHECKPOINT_KIND, "fastlvm.VAE checkpoint")
    try:
        return int(config["identity"]["seed"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path!r} is not a readable fastlvm.VAE checkpoint (no seed).") from None


def _as_tensor(a):
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def _like_input(t, X):
    if isinstance(X, torch.Tensor):
        return t.to(X.device)
    return t.cpu().numpy()
