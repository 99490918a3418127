"""The VAE objective as differentiable functions over fused kernels.

Torch tensors in, torch tensors out. Each function validates its inputs once, brings them to
the form the kernels take (contiguous, one dtype and device, broadcasting reduced to
"periodic" rows, see below), and runs a ``torch.autograd.Function`` over one kernel backend:

- ``'cpp'``: the OpenMP C++ kernels of ``fastlvm._C`` (CPU tensors);
- ``'triton'``: ``fastlvm.kernels.triton_vae`` (CUDA tensors, or the Triton interpreter);
- ``'torch'``: the plain PyTorch reference, ``fastlvm.reference.vae``;
- ``'auto'``: Triton for CUDA tensors, C++ otherwise.

Every backend implements the same kernel-level API (forward and backward kernels per term).
A backend may also offer ``<term>_fwd_grad`` kernels that compute the gradients during the
forward pass, while the inputs are in registers; the backward pass then only scales them by
``grad_output`` (and skips even that when it is one). (A backend that sets
``FWD_GRAD_SUMS_SINGLE_ROWS`` also sums, there, the gradient of a single-row operand such as a
per-feature logvar, which a loss-level call can use.) That is what makes the objective cost
one read of each input and one write of each output and gradient.

Periodic broadcasting: an operand with P rows used for R output rows is read at row r % P.
``x`` (B, D) against ``mean`` (S, B, D) and a per-feature ``logvar`` (D,) are of this form and
are never copied; any other broadcast is expanded to a copy first.
"""

import math

import torch
from torch.autograd.function import once_differentiable

from fastlvm.reference import vae as _ref

__all__ = [
    "reparameterize",
    "row_noise",
    "gaussian_log_likelihood",
    "bernoulli_log_likelihood",
    "iwae_bound",
    "negative_elbo",
    "mmd",
    "vector_quantize",
    "codebook_statistics",
]

_FLOATS = (torch.float32, torch.float64)
_BACKENDS = ("auto", "cpp", "triton", "torch")
_MMD_KERNELS = ("imq", "rbf")


# ----------------------------------------------------------------------------- public API


def reparameterize(mu, logvar, eps=None, *, n_samples=None, generator=None, seed=None, rows=None, step=0,
                   backend="auto", validate=False):
    """z = mu + exp(logvar / 2) * eps and the analytic KL(N(mu, diag exp(logvar)) || N(0, I)).

    mu, logvar: (B, Dz). eps: (B, Dz) or (S, B, Dz), treated as a constant (no gradient).
    With ``eps=None`` the noise is drawn inside the kernel and not stored (the backward
    regenerates it). It is a pure function of a seed -- ``seed`` (an int in [0, 2**63)), or one
    drawn from ``generator`` (torch's default generator when None, so ``torch.manual_seed`` fixes
    it) -- and of each element's index in the (S, B, Dz) output; or, given ``rows`` (the B rows'
    global indices, int64) and ``step``, of (seed, step, the row's index, the element's place in
    the row's S x Dz numbers), so that a row draws the same noise whatever batch it is in (see
    :func:`row_noise`). Every backend draws the same numbers (Philox4x32-10 and Box-Muller,
    specified by ``fastlvm.reference.vae``). Then z is (B, Dz) when ``n_samples`` is None and
    (n_samples, B, Dz) otherwise.

    Returns ``(z, kl)`` with z of eps's shape and kl of shape (B,).
    """
    _check_encoder(mu, logvar)
    named = {"mu": mu, "logvar": logvar}
    if eps is not None:
        if n_samples is not None or generator is not None or seed is not None or rows is not None:
            raise ValueError("pass either eps or n_samples/generator/seed/rows, not both")
        _check_tensor("eps", eps, ndims=(2, 3))
        if eps.shape[-2:] != mu.shape:
            raise ValueError(f"eps must have shape {tuple(mu.shape)} or (S, *{tuple(mu.shape)}), "
                             f"got {tuple(eps.shape)}")
        _check_constant("eps", eps)
        named["eps"] = eps
    _check_same(named, validate)
    kernels = _kernels(backend, mu.device)
    mu, logvar = mu.contiguous(), logvar.contiguous()
    if eps is not None:
        z, kl = _Reparameterize.apply(mu, logvar, eps.contiguous().view(-1, *mu.shape), kernels)
        return z.view(eps.shape), kl
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int)
                                  or n_samples < 1):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if rows is not None:
        rows = _check_rows(rows, mu.shape[0], mu.device)
    noise = (_noise_seed(seed, generator), rows, _check_step(step))
    z, kl = _ReparameterizeNoise.apply(mu, logvar, n_samples or 1, noise, kernels)
    return (z[0] if n_samples is None else z), kl


def row_noise(rows, n_samples, dim, *, seed, step=0, first_sample=0, dtype=torch.float32, backend="auto"):
    """The noise ``reparameterize(..., seed=seed, rows=rows, step=step)`` draws, materialised:
    samples first_sample .. first_sample + n_samples - 1 of each row's stream, (n_samples,
    len(rows), dim) on the device of ``rows`` (global row indices, int64). For bounds that need
    eps itself (``iwae_bound``) and for evaluation in blocks of samples."""
    rows = _check_rows(rows, None, None)
    for name, v in (("n_samples", n_samples), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(first_sample, bool) or not isinstance(first_sample, int) or first_sample < 0:
        raise ValueError(f"first_sample must be a non-negative int, got {first_sample!r}")
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return _kernels(backend, rows.device).row_noise(_noise_seed(seed, None), _check_step(step), rows, n_samples, dim,
                                                    first_sample, dtype)


def gaussian_log_likelihood(x, mean, logvar=None, *, backend="auto", validate=False):
    """sum over the last dimension of log N(x | mean, exp(logvar)).

    x, mean and logvar broadcast against each other (e.g. x (B, D) against mean (S, B, D), and
    a learned per-feature logvar (D,)); logvar None means unit variance. Returns the broadcast
    shape without its last dimension.
    """
    named = {"x": x, "mean": mean}
    if logvar is not None:
        named["logvar"] = logvar
    rows, shape = _broadcast_rows(named, validate)
    out = _apply_log_likelihood("gaussian_ll", _kernels(backend, x.device), None,
                                rows["x"], rows["mean"], rows.get("logvar"))
    return out.view(shape[:-1])


def bernoulli_log_likelihood(x, logits, *, backend="auto", validate=False):
    """sum over the last dimension of log Bernoulli(x | sigmoid(logits)), stable for any |logits|.

    Broadcasts like :func:`gaussian_log_likelihood`; x may be fractional (e.g. grey levels).
    """
    rows, shape = _broadcast_rows({"x": x, "logits": logits}, validate)
    out = _apply_log_likelihood("bernoulli_ll", _kernels(backend, x.device), None,
                                rows["x"], rows["logits"])
    return out.view(shape[:-1])


def negative_elbo(x, kl, *, mean=None, logvar=None, logits=None, backend="auto", validate=False):
    """The VAE loss, reduced inside the kernel: mean_b kl_b - mean_{s,b} log p(x_b | z_sb).

    Give the decoder's ``mean`` (and optionally ``logvar``) for a Gaussian likelihood, or its
    ``logits`` for a Bernoulli one, of shape (B, D) or (S, B, D); kl (B,) as returned by
    :func:`reparameterize`. Because the output is the scalar loss, the kernel folds the 1/(S B)
    weight into the gradients it computes during the forward pass, and ``loss.backward()``
    reads nothing again.
    """
    if (mean is None) == (logits is None):
        raise ValueError("give exactly one of mean (Gaussian likelihood) and logits (Bernoulli)")
    if logits is not None and logvar is not None:
        raise ValueError("logvar belongs to the Gaussian likelihood; it cannot go with logits")
    named = {"x": x}
    if mean is not None:
        named["mean"] = mean
        if logvar is not None:
            named["logvar"] = logvar
        term, ops = "gaussian_ll", ("x", "mean", "logvar")
    else:
        named["logits"] = logits
        term, ops = "bernoulli_ll", ("x", "logits")
    _check_tensor("kl", kl, ndims=(1,))
    rows, shape = _broadcast_rows(named, validate)
    if len(shape) < 2 or kl.shape[0] != shape[-2]:
        raise ValueError(f"kl must have shape (B,) for rows of shape (..., B, D) = {tuple(shape)}, "
                         f"got {tuple(kl.shape)}")
    _check_same({"x": x, "kl": kl}, validate)
    n_rows = math.prod(shape[:-1])
    loss = _apply_log_likelihood(term, _kernels(backend, x.device), -1.0 / n_rows,
                                 *(rows.get(name) for name in ops))
    return kl.mean() + loss


def iwae_bound(log_px_given_z, mu, logvar, eps, *, backend="auto", validate=False):
    """log (1/S) sum_s exp(log p(x|z_s) + log p(z_s) - log q(z_s|x)), z_s = mu + sigma eps_s.

    log_px_given_z: (S, B); mu, logvar: (B, Dz) with sigma = exp(logvar / 2); eps: (S, B, Dz),
    treated as a constant.
    log p(z) - log q(z|x) is computed from eps inside the kernel, streaming over the samples:
    memory beyond the (S, B) weights does not grow with S * B * Dz. Returns (B,). With S = 1
    it is the single-sample ELBO; as S grows it rises towards log p(x).
    """
    _check_tensor("log_px_given_z", log_px_given_z, ndims=(2,))
    _check_encoder(mu, logvar)
    _check_tensor("eps", eps, ndims=(3,))
    if eps.shape[1:] != mu.shape:
        raise ValueError(f"eps must have shape (S, *{tuple(mu.shape)}), got {tuple(eps.shape)}")
    if log_px_given_z.shape != eps.shape[:2]:
        raise ValueError(f"log_px_given_z must have shape (S, B) = {tuple(eps.shape[:2])}, "
                         f"got {tuple(log_px_given_z.shape)}")
    _check_constant("eps", eps)
    _check_same({"log_px_given_z": log_px_given_z, "mu": mu, "logvar": logvar, "eps": eps},
                validate)
    return _IWAE.apply(log_px_given_z.contiguous(), mu.contiguous(), logvar.contiguous(),
                       eps.contiguous(), _kernels(backend, mu.device))


def mmd(z, prior=None, *, kernel="imq", scale=None, generator=None, backend="auto", validate=False):
    """The unbiased (U-statistic) estimate of MMD^2 between the rows of z (B, Dz) and a prior
    sample (Zhao et al., 2017; Tolstikhin et al., 2018):

        mean_{i != j} k(z_i, z_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(z_i, y_j).

    ``prior`` (M, Dz) gives the y rows; with None, y is B draws of N(0, I) made by the noise
    kernel of :func:`reparameterize` from a seed taken from ``generator`` (so every backend
    draws the same rows). ``kernel="imq"``: k = C / (C + |a - b|^2) with C = 2 Dz scale^2
    (scale 1 by default); ``"rbf"``: exp(-|a - b|^2 / (2 scale^2)) (scale sqrt(Dz) by default,
    the same length as the IMQ's). The kernels make forward and gradient in one pass over tiles
    of rows: no B x M matrix, memory beyond the inputs O((B + M) Dz). Returns a 0-d tensor; z
    and a given prior get gradients.
    """
    _check_tensor("z", z, ndims=(2,))
    B, Dz = z.shape
    if B < 2:
        raise ValueError(f"the U-statistic needs at least 2 rows of z, got {B}")
    if kernel not in _MMD_KERNELS:
        raise ValueError(f"kernel must be one of {_MMD_KERNELS}, got {kernel!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    kernels = _kernels(backend, z.device)
    if prior is None:
        prior = kernels.normal_noise(1, B, Dz, _noise_seed(None, generator), z.dtype, z.device)[0]
        _check_same({"z": z}, validate)
    else:
        if generator is not None:
            raise ValueError("generator draws the prior rows; pass either prior or generator, not both")
        _check_tensor("prior", prior, ndims=(2,))
        if prior.shape[1] != Dz:
            raise ValueError(f"prior must have z's {Dz} columns, got shape {tuple(prior.shape)}")
        if prior.shape[0] < 2:
            raise ValueError(f"the U-statistic needs at least 2 prior rows, got {prior.shape[0]}")
        _check_same({"z": z, "prior": prior}, validate)
    if kernel == "imq":
        c = 2.0 * Dz * (1.0 if scale is None else float(scale)) ** 2
    else:
        c = 2.0 * (Dz if scale is None else float(scale) ** 2)
    return _MMD.apply(z.contiguous(), prior.contiguous(), kernel, c, kernels)


def vector_quantize(z_e, codebook, *, commitment=0.25, backend="auto", validate=False):
    """Vector quantisation with the straight-through estimator (van den Oord et al., 2017).

    z_e (..., Dz) and codebook (M, Dz). Each vector is replaced by its nearest code e_k
    (squared Euclidean distance, ties to the lowest k). Returns ``(z_q, codes, loss)``: z_q of
    z_e's shape, equal to the codes' vectors, whose gradient passes straight to z_e; codes
    (...) int64; and the scalar loss, averaged over the vectors,

        |sg(z_e) - e|^2 + commitment |z_e - sg(e)|^2

    (the codebook term trains the codebook, the commitment term the encoder; sg stops the
    gradient). The search runs as tiles of products with the squared norms folded in and the
    argmin in the same pass, never an N x M array: on CPU tensors, the k-means kernel of
    ``fastlvm.kernels.kmeans`` on zero-copy NumPy views; on CUDA tensors, Triton.
    """
    _check_tensor("z_e", z_e)
    _check_tensor("codebook", codebook, ndims=(2,))
    if z_e.dim() == 0 or z_e.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z_e must end in codebook's {codebook.shape[1]} columns, got shape {tuple(z_e.shape)}")
    if isinstance(commitment, bool) or not isinstance(commitment, (int, float)) \
            or not math.isfinite(commitment) or commitment < 0:
        raise ValueError(f"commitment must be a non-negative finite number, got {commitment!r}")
    _check_same({"z_e": z_e, "codebook": codebook}, validate)
    kernels = _kernels(backend, z_e.device)
    rows = z_e.reshape(-1, z_e.shape[-1]).contiguous()
    z_q, codes, loss = _VectorQuantize.apply(rows, codebook.contiguous(), float(commitment), kernels)
    return z_q.view(z_e.shape), codes.view(z_e.shape[:-1]), loss


def codebook_statistics(z_e, codes, M, *, backend="auto"):
    """(counts (M,), sums (M, Dz)), float64: n_k = #{i: code_i = k} and s_k = sum_{code_i = k} z_i.

    The additive statistics of k-means' hard E-step, for the EMA codebook update (and summed
    across processes as they are). z_e (..., Dz), codes (...) integers in [0, M). No gradient.
    """
    _check_tensor("z_e", z_e)
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise ValueError(f"M must be a positive int, got {M!r}")
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"codes must be an int32 or int64 torch.Tensor, got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if z_e.dim() == 0 or codes.shape != z_e.shape[:-1]:
        raise ValueError(f"codes must have z_e's shape without its last dimension, "
                         f"{tuple(z_e.shape[:-1])}, got {tuple(codes.shape)}")
    if codes.device != z_e.device:
        raise ValueError(f"codes is on {codes.device} but z_e is on {z_e.device}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= M):
        raise ValueError(f"codes must lie in [0, {M}), got [{int(codes.min())}, {int(codes.max())}]")
    rows = z_e.detach().reshape(-1, z_e.shape[-1]).contiguous()
    return _kernels(backend, z_e.device).codebook_statistics(rows, codes.reshape(-1).to(torch.int64), M)


# ----------------------------------------------------------------------------- validation


def _check_tensor(name, t, ndims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if ndims is not None and t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _check_encoder(mu, logvar):
    _check_tensor("mu", mu, ndims=(2,))
    _check_tensor("logvar", logvar, ndims=(2,))
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, "
                         f"got {tuple(logvar.shape)}")


def _check_constant(name, t):
    if t.requires_grad:
        raise ValueError(f"{name} is noise and gets no gradient; pass {name}.detach()")


def _check_same(named, validate):
    """One dtype and one device for all; with validate, no NaN or inf anywhere."""
    (first, ref), *rest = named.items()
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {ref.device}")
    if validate:
        for name, t in named.items():
            if torch.isnan(t).any():
                raise ValueError(f"{name} contains NaN")
            if torch.isinf(t).any():
                raise ValueError(f"{name} contains inf")


def _broadcast_rows(named, validate):
    """Validate the operands of a row-wise log-likelihood and reduce them to periodic rows.

    Returns ({name: (P, D) contiguous tensor}, broadcast shape).
    """
    for name, t in named.items():
        _check_tensor(name, t)
        if t.dim() == 0:
            raise ValueError(f"{name} must have a feature (last) dimension, got a 0-d tensor")
    _check_same(named, validate)
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in named.values()))
    except RuntimeError:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from None
    return {name: _periodic_rows(t, shape) for name, t in named.items()}, shape


def _periodic_rows(t, shape):
    """t as a (P, D) operand read at row r % P for the rows of ``shape``: a view when t's
    shape, without leading ones, ends ``shape``; else the broadcast copy (autograd sums back)."""
    dims = list(t.shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    if dims and tuple(dims) == tuple(shape[len(shape) - len(dims):]):
        return t.reshape(-1, shape[-1]).contiguous()
    return t.expand(shape).contiguous().view(-1, shape[-1])


def _noise_seed(seed, generator):
    """The noise seed: ``seed`` itself, or one drawn from ``generator``."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def _check_rows(rows, n, device):
    """Global row indices as a contiguous int64 tensor (on ``device`` when given)."""
    if not isinstance(rows, torch.Tensor):
        rows = torch.as_tensor(rows)
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"rows must be a 1-D int64 tensor of row indices, got {rows.dtype} of shape {tuple(rows.shape)}")
    if n is not None and rows.shape[0] != n:
        raise ValueError(f"rows has {rows.shape[0]} entries for {n} rows of mu")
    if device is not None and rows.device != device:
        rows = rows.to(device)
    return rows.contiguous()  # any int64 keys a stream (a negative one by its two's complement)


def _check_step(step):
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step & 0xFFFFFFFF


# ----------------------------------------------------------------------------- backends


def _kernels(backend, device):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpp"
    if backend == "torch":
        return _ReferenceKernels
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' takes CPU tensors, got tensors on {device}")
        from fastlvm.kernels import cpp

        return cpp
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ImportError("backend='triton' needs Triton: pip install fastlvm[triton]") from None
    from fastlvm.kernels import triton_vae

    return triton_vae


def _vjp(fn, inputs, grads):
    """Gradients of fn(*inputs) (a tuple of tensors) against ``grads`` (None: unused output)."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        used = [(o, g) for o, g in zip(outs, grads) if g is not None]
        live = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad([o for o, _ in used], live, [g for _, g in used],
                                       allow_unused=True, materialize_grads=True))
    return tuple(None if t is None else next(got) for t in leaves)


def _repeat_rows(t, n_rows):
    return None if t is None else t.repeat(n_rows // t.shape[0], 1)


class _ReferenceKernels:
    """The kernel-level API computed by ``fastlvm.reference.vae``; backward by autograd."""

    @staticmethod
    def reparam_fwd(mu, logvar, eps):
        return _ref.reparameterize(mu, logvar, eps), _ref.kl_standard_normal(mu, logvar)

    @staticmethod
    def reparam_bwd(mu, logvar, eps, grad_z, grad_kl):
        return _vjp(lambda m, lv: _ReferenceKernels.reparam_fwd(m, lv, eps), (mu, logvar),
                    (grad_z, grad_kl))

    @staticmethod
    def normal_noise(n_samples, batch, dim, seed, dtype, device="cpu"):
        return _ref.normal_noise(n_samples, batch, dim, seed, dtype, device)

    @staticmethod
    def row_noise(seed, step, rows, n_samples, dim, first_sample=0, dtype=torch.float64):
        return _ref.row_noise(seed, step, rows, n_samples, dim, first_sample, dtype)

    @staticmethod
    def _noise(mu, n_samples, seed, rows, step):
        if rows is None:
            return _ref.normal_noise(n_samples, *mu.shape, seed, mu.dtype, mu.device)
        return _ref.row_noise(seed, step, rows, n_samples, mu.shape[1], 0, mu.dtype)

    @staticmethod
    def reparam_noise_fwd(mu, logvar, n_samples, seed, rows=None, step=0):
        eps = _ReferenceKernels._noise(mu, n_samples, seed, rows, step)
        return _ReferenceKernels.reparam_fwd(mu, logvar, eps)

    @staticmethod
    def reparam_noise_bwd(mu, logvar, n_samples, seed, grad_z, grad_kl, rows=None, step=0):
        eps = _ReferenceKernels._noise(mu, n_samples, seed, rows, step)
        return _ReferenceKernels.reparam_bwd(mu, logvar, eps, grad_z, grad_kl)

    @staticmethod
    def gaussian_ll_fwd(x, mean, logvar):
        n = max(t.shape[0] for t in (x, mean, logvar) if t is not None)
        return _ref.gaussian_log_likelihood(*(_repeat_rows(t, n) for t in (x, mean, logvar)))

    @staticmethod
    def gaussian_ll_bwd(x, mean, logvar, grad_out):
        return _vjp(lambda *ops: (_ReferenceKernels.gaussian_ll_fwd(*ops),), (x, mean, logvar),
                    (grad_out,))

    @staticmethod
    def bernoulli_ll_fwd(x, logits):
        n = max(x.shape[0], logits.shape[0])
        return _ref.bernoulli_log_likelihood(_repeat_rows(x, n), _repeat_rows(logits, n))

    @staticmethod
    def bernoulli_ll_bwd(x, logits, grad_out):
        return _vjp(lambda *ops: (_ReferenceKernels.bernoulli_ll_fwd(*ops),), (x, logits),
                    (grad_out,))

    @staticmethod
    def iwae_fwd(log_px_given_z, mu, logvar, eps):
        log_w = _ref.log_importance_weights(log_px_given_z, mu, logvar, eps)
        return _ref.iwae_bound(log_px_given_z, mu, logvar, eps), torch.softmax(log_w, dim=0)

    @staticmethod
    def iwae_bwd(log_px_given_z, mu, logvar, eps, w, grad_bound):
        return _vjp(lambda lp, m, lv: (_ref.iwae_bound(lp, m, lv, eps),),
                    (log_px_given_z, mu, logvar), (grad_bound,))


    @staticmethod
    def mmd_fwd_grad(x, y, kernel, c, need):
        def value(a, b):
            return (_ref.mmd(a, b, kernel, c),)

        out = value(x, y)[0].detach()
        if not any(need):
            return out, None, None
        gx, gy = _vjp(value, (x, y), (torch.ones_like(out),))
        return out, (gx if need[0] else None), (gy if need[1] else None)

    @staticmethod
    def nearest_codes(z, codebook):
        return _ref.nearest_codes(z, codebook)

    @staticmethod
    def codebook_statistics(z, codes, n_codes):
        return _ref.codebook_statistics(z, codes, n_codes)


# ----------------------------------------------------------------------------- autograd


def _is_one(g):
    return bool((g == 1).all())


def _scaled(grads, grad_out):
    """Gradients computed in the forward pass times grad_output (one value per row, or one)."""
    if _is_one(grad_out):
        return grads
    return tuple(None if g is None else g * grad_out.view(-1, *[1] * (g.dim() - 1))
                 for g in grads)


def _contiguous(g):
    return None if g is None else g.contiguous()


class _Reparameterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, eps, kernels):
        ctx.kernels = kernels
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mu, logvar, eps)
        return kernels.reparam_fwd(mu, logvar, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, grad_kl):
        if grad_z is None and grad_kl is None:
            return None, None, None, None
        grads = ctx.kernels.reparam_bwd(*ctx.saved_tensors, _contiguous(grad_z),
                                        _contiguous(grad_kl))
        return *grads, None, None


class _ReparameterizeNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, n_samples, noise, kernels):
        """noise: (seed, rows or None, step)."""
        ctx.kernels, ctx.n_samples, ctx.noise = kernels, n_samples, noise
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mu, logvar)
        seed, rows, step = noise
        return kernels.reparam_noise_fwd(mu, logvar, n_samples, seed, rows, step)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, grad_kl):
        if grad_z is None and grad_kl is None:
            return None, None, None, None, None
        seed, rows, step = ctx.noise
        grads = ctx.kernels.reparam_noise_bwd(*ctx.saved_tensors, ctx.n_samples, seed, _contiguous(grad_z),
                                              _contiguous(grad_kl), rows, step)
        return *grads, None, None, None


def _apply_log_likelihood(term, kernels, weight, *operands):
    return _LogLikelihood.apply(term, kernels, weight, *operands)


class _LogLikelihood(torch.autograd.Function):
    """Row log-likelihood ``term`` ('gaussian_ll' or 'bernoulli_ll') of periodic operands.

    weight None: the (R,) per-row values. A float: the scalar weight * sum_r value_r (a loss).
    """

    @staticmethod
    def forward(ctx, term, kernels, weight, *operands):
        n_rows = max(t.shape[0] for t in operands if t is not None)
        need = ctx.needs_input_grad[3:]
        fused = getattr(kernels, term + "_fwd_grad", None)
        ctx.kernels, ctx.term, ctx.weight, ctx.n_rows = kernels, term, weight, n_rows
        # Gradients in the forward pass are final when each belongs to a single output row,
        # or when the output is the weighted sum (then a single-row operand, such as a
        # per-feature logvar, gets the sum over rows); other periodic operands need grad_out.
        single_rows = weight is not None and getattr(kernels, "FWD_GRAD_SUMS_SINGLE_ROWS", False)
        ctx.fused = fused is not None and any(need) and all(
            t.shape[0] == n_rows or (single_rows and t.shape[0] == 1)
            for t, n in zip(operands, need) if n)
        if ctx.fused:
            out, *grads = fused(*operands, need=need, scale=1.0 if weight is None else weight)
            ctx.save_for_backward(*grads)
        else:
            out = getattr(kernels, term + "_fwd")(*operands)
            ctx.save_for_backward(*operands)
        return out if weight is None else weight * out.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.fused:
            return None, None, None, *_scaled(ctx.saved_tensors, grad_out)
        if ctx.weight is not None:
            grad_out = (grad_out * ctx.weight).expand(ctx.n_rows)
        grads = getattr(ctx.kernels, ctx.term + "_bwd")(*ctx.saved_tensors,
                                                        grad_out.contiguous())
        return None, None, None, *grads


class _IWAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_px_given_z, mu, logvar, eps, kernels):
        fused = getattr(kernels, "iwae_fwd_grad", None)
        ctx.kernels = kernels
        ctx.fused = fused is not None and any(ctx.needs_input_grad[:3])
        if ctx.fused:
            # w is the gradient of the bound with respect to log_px_given_z.
            bound, w, grad_mu, grad_logvar = fused(log_px_given_z, mu, logvar, eps)
            ctx.save_for_backward(w, grad_mu, grad_logvar)
        else:
            bound, w = kernels.iwae_fwd(log_px_given_z, mu, logvar, eps)
            ctx.save_for_backward(log_px_given_z, mu, logvar, eps, w)
        return bound

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bound):
        if ctx.fused:
            w, grad_mu, grad_logvar = ctx.saved_tensors
            grad_lp = w if _is_one(grad_bound) else w * grad_bound
            grads = (grad_lp, *_scaled((grad_mu, grad_logvar), grad_bound))
            return *(g if n else None for g, n in zip(grads, ctx.needs_input_grad)), None, None
        grads = ctx.kernels.iwae_bwd(*ctx.saved_tensors, grad_bound.contiguous())
        return *grads, None, None


class _MMD(torch.autograd.Function):
    """MMD^2 with its gradients computed in the forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, x, y, kernel, c, kernels):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        value, gx, gy = kernels.mmd_fwd_grad(x, y, kernel, c, need)
        ctx.save_for_backward(gx, gy)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gx, gy = ctx.saved_tensors
        if not _is_one(grad):
            gx, gy = (None if g is None else g * grad for g in (gx, gy))
        return gx, gy, None, None, None


_LOSS_ROWS = 2048  # rows per chunk of the quantisation loss: no N x Dz temporary


class _VectorQuantize(torch.autograd.Function):
    """(z_q, codes, loss) of rows z (N, Dz); see vector_quantize.

    Gradients: z gets grad_z_q (straight through) + g 2 commitment (z - e) / N, e = z_q; the
    codebook g 2 (n_k e_k - s_k) / N from the codes' statistics (n_k, s_k). The codebook is
    saved only when it needs a gradient (an EMA codebook is updated in place after the call)."""

    @staticmethod
    def forward(ctx, z, codebook, commitment, kernels):
        codes, _ = kernels.nearest_codes(z, codebook)
        z_q = codebook.index_select(0, codes)
        sq = torch.zeros((), dtype=torch.float64, device=z.device)
        for a in range(0, z.shape[0], _LOSS_ROWS):
            sq += torch.sub(z_q[a:a + _LOSS_ROWS], z[a:a + _LOSS_ROWS]).square().sum(dtype=torch.float64)
        loss = ((1.0 + commitment) * sq / z.shape[0]).to(z.dtype)
        ctx.kernels, ctx.commitment = kernels, commitment
        ctx.mark_non_differentiable(codes)
        ctx.save_for_backward(z, z_q, codes, codebook if ctx.needs_input_grad[1] else None)
        return z_q, codes, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z_q, grad_codes, grad_loss):
        z, z_q, codes, codebook = ctx.saved_tensors
        N = z.shape[0]
        grad_z = grad_cb = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_z_q
            if grad_loss is not None and ctx.commitment != 0:
                grad_z = torch.sub(z, z_q).mul_(2.0 * ctx.commitment * grad_loss / N)
                if grad_z_q is not None:
                    grad_z += grad_z_q
        if ctx.needs_input_grad[1] and grad_loss is not None:
            counts, sums = ctx.kernels.codebook_statistics(z, codes, codebook.shape[0])
            diff = counts[:, None] * codebook.to(torch.float64) - sums  # float64: no cancellation
            grad_cb = diff.to(codebook.dtype) * (2.0 * grad_loss / N)
        return grad_z, grad_cb, None, None
