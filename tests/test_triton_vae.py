"""Triton VAE kernels (fastlvm.kernels.triton_vae) against independent oracles.

Oracles: plain torch float64 formulas written here from the equations (forward, and backward
through torch.autograd), torch.distributions (Normal, Bernoulli, kl_divergence),
torch.logsumexp / softmax and scipy's Kolmogorov-Smirnov test for the noise.

Runs under TRITON_INTERPRET=1 (set before triton is imported; the Makefile runs this marker in
its own process) on CPU tensors, or on a CUDA device when there is one.
"""

import math
import os

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.skipif(
        not (_INTERPRET or _CUDA),
        reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton is imported",
    ),
]

DEVICE = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.fixture(scope="module")
def tv():
    pytest.importorskip("triton")
    from fastlvm.kernels import triton_vae

    return triton_vae


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class Inputs:
    """Random inputs drawn in float64, handed to the kernel in `dtype`; `ref(t)` is the float64
    CPU copy of exactly what the kernel saw, so only the kernel's own rounding is measured."""

    def __init__(self, dtype, seed=0):
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=self.gen, dtype=torch.float64)).to(DEVICE, self.dtype)

    def binary(self, *shape):
        return torch.randint(0, 2, shape, generator=self.gen).to(DEVICE, self.dtype)


def ref(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def assert_close(fast, expected, dtype, what=""):
    """Relative error ||fast - expected|| / ||expected|| within the dtype's tolerance, no NaN."""
    assert fast is not None, what
    assert fast.shape == expected.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(expected.shape)}"
    assert fast.dtype == dtype, f"{what}: dtype {fast.dtype} != {dtype}"
    fast = ref(fast)
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    scale = expected.norm().item()
    err = (fast - expected).norm().item() / (scale if scale > 0 else 1.0)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def periodic(t, rows):
    """Row r of the result is row r % P of t (the kernels' periodic broadcasting)."""
    return t[torch.arange(rows) % t.shape[0]]


def autograd(fn, inputs, grad_outputs):
    """Gradients of fn(*inputs) (float64 leaves) with respect to every input that is not None."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
    it = iter(grads)
    return [None if t is None else next(it) for t in inputs]


# Plain float64 formulas, written from the equations.


def reparam_formula(mu, lv, eps):
    z = mu + torch.exp(lv / 2) * eps
    kl = 0.5 * (torch.exp(lv) + mu**2 - 1 - lv).sum(-1)
    return z, kl


def gaussian_ll_formula(x, mean, lv):
    rows = max(x.shape[0], mean.shape[0], 1 if lv is None else lv.shape[0])
    x, mean = periodic(x, rows), periodic(mean, rows)
    lv = torch.zeros_like(mean) if lv is None else periodic(lv, rows)
    return (-0.5 * math.log(2 * math.pi) - 0.5 * lv - 0.5 * (x - mean) ** 2 * torch.exp(-lv)).sum(-1)


def bernoulli_ll_formula(x, logits):
    rows = max(x.shape[0], logits.shape[0])
    x, logits = periodic(x, rows), periodic(logits, rows)
    # x*l - softplus(l), softplus(l) = max(l, 0) + log1p(exp(-|l|)); the tail subtracted last
    return ((x * logits - torch.clamp(logits, min=0)) - torch.log1p(torch.exp(-logits.abs()))).sum(-1)


def log_w_formula(lpx, mu, lv, eps):
    z = mu + torch.exp(lv / 2) * eps
    return lpx + (-0.5 * z**2 + 0.5 * eps**2 + 0.5 * lv).sum(-1)


def iwae_formula(lpx, mu, lv, eps):
    log_w = log_w_formula(lpx, mu, lv, eps)
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]), torch.softmax(log_w, 0)


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------


def test_normal_noise_is_seeded_standard_normal(tv):
    from scipy import stats

    S, B, D = 3, 40, 125
    eps = tv.normal_noise(S, B, D, 1234, torch.float32)
    assert eps.shape == (S, B, D) and eps.dtype == torch.float32
    assert torch.equal(eps, tv.normal_noise(S, B, D, 1234, torch.float32))
    other = tv.normal_noise(S, B, D, 1235, torch.float32)
    assert (eps == other).float().mean() < 1e-3
    flat = ref(eps).flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    # neighbours (along j, b and s) are uncorrelated
    for a, b in [(flat[:-1], flat[1:]), (flat[:-D], flat[D:]), (flat[: -B * D], flat[B * D :])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(n)
    # a pure function of the flat index (s*B + b)*D + j, computed in float64 and rounded
    assert torch.equal(eps.flatten(), tv.normal_noise(1, 1, S * B * D, 1234, torch.float32).flatten())
    assert torch.equal(tv.normal_noise(S, B, D, 1234, torch.float64).float(), eps)


def test_normal_noise_philox_known_answer(tv):
    """Seed 0, pair 0: Philox4x32-10 of counter 0, key 0 is 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    (the Random123 known-answer vector); the spec's uniforms and Box-Muller give elements 0, 1."""
    w0, w1, w2, w3 = 0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8
    u1 = 1.0 - ((w0 << 20) | (w1 >> 12)) * 2.0**-52
    u2 = ((w2 << 20) | (w3 >> 12)) * 2.0**-52
    r, theta = math.sqrt(-2.0 * math.log(u1)), 2.0 * math.pi * u2
    expected = torch.tensor([r * math.cos(theta), r * math.sin(theta)], dtype=torch.float64)
    got = ref(tv.normal_noise(1, 1, 2, 0, torch.float64, device=DEVICE)).flatten()
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7, 2**62 - 1])
def test_normal_noise_follows_the_reference_spec(tv, seed):
    """Every backend draws the same numbers: fastlvm.reference.vae.normal_noise."""
    from fastlvm.reference.vae import normal_noise as reference_noise

    S, B, D = 2, 3, 33
    expected = reference_noise(S, B, D, seed, torch.float64)
    got = ref(tv.normal_noise(S, B, D, seed, torch.float64, device=DEVICE))
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("S,D,first", [(2, 5, 0), (3, 4, 1), (1, 33, 2)])
def test_row_noise_follows_the_reference_spec(tv, S, D, first):
    """Row-keyed noise: each row's stream (seed, step, global row), as fastlvm.reference.vae.row_noise."""
    from fastlvm.reference.vae import row_noise as reference_row_noise

    rows = torch.tensor([3, 2**33 + 5, 0, 17], device=DEVICE)
    expected = reference_row_noise(2**40 + 7, 12, rows.cpu(), S, D, first)
    got = ref(tv.row_noise(2**40 + 7, 12, rows, S, D, first, torch.float64))
    assert torch.allclose(got, expected, rtol=1e-13, atol=1e-15)


def test_reparam_with_row_noise_reads_the_row_streams(tv):
    """reparam_noise_fwd/bwd with rows: z and gradients as with the materialised row noise."""
    inp = Inputs(torch.float64)
    mu, lv = inp.randn(5, 7), inp.randn(5, 7, scale=0.7)
    rows = torch.tensor([9, 2**35 + 1, 0, 4, 3], device=DEVICE)
    eps = tv.row_noise(11, 4, rows, 3, 7, 0, torch.float64)
    z, kl = tv.reparam_noise_fwd(mu, lv, 3, 11, rows, 4)
    z_ref, kl_ref = reparam_formula(ref(mu), ref(lv), ref(eps))
    assert_close(z, z_ref, torch.float64, "z")
    assert_close(kl, kl_ref, torch.float64, "kl")
    gz, gkl = inp.randn(3, 5, 7), inp.randn(5)
    got = tv.reparam_noise_bwd(mu, lv, 3, 11, gz, gkl, rows, 4)
    want = tv.reparam_bwd(mu, lv, eps, gz, gkl)
    for a, b in zip(got, want):
        assert_close(a, ref(b), torch.float64, "grad")


# ---------------------------------------------------------------------------------------------
# reparameterisation and KL
# ---------------------------------------------------------------------------------------------

REPARAM_SHAPES = [(1, 1, 1), (2, 3, 7), (1, 300, 16), (3, 9, 785)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", REPARAM_SHAPES)
def test_reparam_fwd(tv, S, B, D, dtype):
    inp = Inputs(dtype)
    mu, lv, eps = inp.randn(B, D), inp.randn(B, D, scale=0.7), inp.randn(S, B, D)
    z, kl = tv.reparam_fwd(mu, lv, eps)
    z_ref, kl_ref = reparam_formula(ref(mu), ref(lv), ref(eps))
    assert_close(z, z_ref, dtype, "z")
    assert_close(kl, kl_ref, dtype, "kl")
    q = Normal(ref(mu), torch.exp(ref(lv) / 2))
    assert_close(kl, kl_divergence(q, Normal(0.0, 1.0)).sum(-1), dtype, "kl vs torch.distributions")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", REPARAM_SHAPES)
def test_reparam_bwd(tv, S, B, D, dtype):
    inp = Inputs(dtype, seed=1)
    mu, lv, eps = inp.randn(B, D), inp.randn(B, D, scale=0.7), inp.randn(S, B, D)
    gz, gkl = inp.randn(S, B, D), inp.randn(B)
    for grad_z, grad_kl in [(gz, gkl), (gz, None), (None, gkl)]:
        grad_mu, grad_lv = tv.reparam_bwd(mu, lv, eps, grad_z, grad_kl)
        exp_mu, exp_lv, _ = autograd(reparam_formula, [ref(mu), ref(lv), ref(eps)], [ref(grad_z), ref(grad_kl)])
        what = f"grad_z given: {grad_z is not None}, grad_kl given: {grad_kl is not None}"
        assert_close(grad_mu, exp_mu, dtype, "grad_mu, " + what)
        assert_close(grad_lv, exp_lv, dtype, "grad_logvar, " + what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", [(1, 1, 1), (3, 9, 785), (2, 300, 5)])
def test_reparam_noise_regenerates_the_same_noise(tv, S, B, D, dtype):
    inp = Inputs(dtype, seed=2)
    mu, lv = inp.randn(B, D), inp.randn(B, D, scale=0.7)
    gz, gkl = inp.randn(S, B, D), inp.randn(B)
    seed = 2**40 + 7
    eps = tv.normal_noise(S, B, D, seed, dtype, device=DEVICE)

    z, kl = tv.reparam_noise_fwd(mu, lv, S, seed)
    z_eps, kl_eps = tv.reparam_fwd(mu, lv, eps)
    assert torch.equal(z, z_eps) and torch.equal(kl, kl_eps)
    assert_close(z, ref(mu) + torch.exp(ref(lv) / 2) * ref(eps), dtype, "z vs mu + exp(lv/2)*normal_noise")
    assert torch.equal(tv.reparam_noise_fwd(mu, lv, S, seed)[0], z)
    assert (tv.reparam_noise_fwd(mu, lv, S, seed + 1)[0] != z).float().mean() > 0.99

    for grad_z, grad_kl in [(gz, gkl), (gz, None), (None, gkl)]:
        noise_grads = tv.reparam_noise_bwd(mu, lv, S, seed, grad_z, grad_kl)
        eps_grads = tv.reparam_bwd(mu, lv, eps, grad_z, grad_kl)
        assert all(torch.equal(a, b) for a, b in zip(noise_grads, eps_grads))


# ---------------------------------------------------------------------------------------------
# Gaussian log-likelihood
# ---------------------------------------------------------------------------------------------

# (rows of x, rows of mean, rows of logvar or None, D); every row count divides the largest
GAUSSIAN_CASES = [
    (1, 1, None, 1),
    (1, 1, 1, 1),
    (4, 4, 4, 785),  # D bigger than one block, not a power of two
    (5, 15, 1, 785),  # x (B, D) vs mean (S*B, D), per-feature logvar (1, D)
    (3, 6, None, 33),  # fixed unit variance, S = 2
    (7, 21, 21, 5),  # logvar per sample
    (6, 2, 3, 9),  # every operand with its own period
]


def _gaussian_inputs(inp, px, pm, pl, D):
    x, mean = inp.randn(px, D), inp.randn(pm, D)
    lv = None if pl is None else inp.randn(pl, D, scale=0.8)
    return x, mean, lv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("px,pm,pl,D", GAUSSIAN_CASES)
def test_gaussian_ll_fwd(tv, px, pm, pl, D, dtype):
    x, mean, lv = _gaussian_inputs(Inputs(dtype, seed=3), px, pm, pl, D)
    out = tv.gaussian_ll_fwd(x, mean, lv)
    assert_close(out, gaussian_ll_formula(ref(x), ref(mean), ref(lv)), dtype, "formula")
    R = max(px, pm, pl or 1)
    scale = 1.0 if lv is None else torch.exp(periodic(ref(lv), R) / 2)
    dist = Normal(periodic(ref(mean), R), scale).log_prob(periodic(ref(x), R)).sum(-1)
    assert_close(out, dist, dtype, "torch.distributions.Normal")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("px,pm,pl,D", GAUSSIAN_CASES)
def test_gaussian_ll_bwd(tv, px, pm, pl, D, dtype):
    inp = Inputs(dtype, seed=4)
    x, mean, lv = _gaussian_inputs(inp, px, pm, pl, D)
    g = inp.randn(max(px, pm, pl or 1))
    grads = tv.gaussian_ll_bwd(x, mean, lv, g)
    expected = autograd(gaussian_ll_formula, [ref(x), ref(mean), ref(lv)], [ref(g)])
    assert len(grads) == 3
    for name, got, exp in zip(["grad_x", "grad_mean", "grad_logvar"], grads, expected):
        if exp is None:
            assert got is None, name
        else:
            assert_close(got, exp, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("px,pm,pl,D", GAUSSIAN_CASES)
def test_gaussian_ll_fwd_grad(tv, px, pm, pl, D, dtype):
    """The forward-pass gradients of scale * out, for every operand that has all R rows."""
    x, mean, lv = _gaussian_inputs(Inputs(dtype, seed=9), px, pm, pl, D)
    R, scale = max(px, pm, pl or 1), -1 / 3
    need = [t is not None and t.shape[0] == R for t in (x, mean, lv)]
    out, *grads = tv.gaussian_ll_fwd_grad(x, mean, lv, need=need, scale=scale)
    assert_close(out, gaussian_ll_formula(ref(x), ref(mean), ref(lv)), dtype, "out")
    expected = autograd(gaussian_ll_formula, [ref(x), ref(mean), ref(lv)],
                        [torch.full((R,), scale, dtype=torch.float64)])
    for name, flag, got, exp in zip(["grad_x", "grad_mean", "grad_logvar"], need, grads, expected):
        if flag:
            assert_close(got, exp, dtype, name)
        else:
            assert got is None, name


# ---------------------------------------------------------------------------------------------
# Bernoulli log-likelihood
# ---------------------------------------------------------------------------------------------

BERNOULLI_CASES = [(1, 1, 1), (4, 4, 785), (5, 15, 785), (3, 12, 10), (12, 3, 10)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("px,pl,D", BERNOULLI_CASES)
def test_bernoulli_ll_fwd(tv, px, pl, D, dtype):
    inp = Inputs(dtype, seed=5)
    x, logits = inp.binary(px, D), inp.randn(pl, D, scale=6.0)
    out = tv.bernoulli_ll_fwd(x, logits)
    assert_close(out, bernoulli_ll_formula(ref(x), ref(logits)), dtype, "formula")
    R = max(px, pl)
    dist = Bernoulli(logits=periodic(ref(logits), R)).log_prob(periodic(ref(x), R)).sum(-1)
    assert_close(out, dist, dtype, "torch.distributions.Bernoulli")
    # x in [0, 1] (a cross-entropy target, not only 0/1)
    x = torch.rand(px, D, generator=inp.gen, dtype=torch.float64).to(DEVICE, dtype)
    assert_close(tv.bernoulli_ll_fwd(x, logits), bernoulli_ll_formula(ref(x), ref(logits)), dtype, "x in [0, 1]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("px,pl,D", BERNOULLI_CASES)
def test_bernoulli_ll_bwd(tv, px, pl, D, dtype):
    inp = Inputs(dtype, seed=6)
    x, logits, g = inp.binary(px, D), inp.randn(pl, D, scale=6.0), inp.randn(max(px, pl))
    grad_x, grad_logits = tv.bernoulli_ll_bwd(x, logits, g)
    exp_x, exp_logits = autograd(bernoulli_ll_formula, [ref(x), ref(logits)], [ref(g)])
    assert_close(grad_x, exp_x, dtype, "grad_x")
    assert_close(grad_logits, exp_logits, dtype, "grad_logits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("px,pl,D", BERNOULLI_CASES)
def test_bernoulli_ll_fwd_grad(tv, px, pl, D, dtype):
    inp = Inputs(dtype, seed=10)
    x, logits = inp.binary(px, D), inp.randn(pl, D, scale=6.0)
    R, scale = max(px, pl), 0.7
    need = [x.shape[0] == R, logits.shape[0] == R]
    out, *grads = tv.bernoulli_ll_fwd_grad(x, logits, need=need, scale=scale)
    assert_close(out, bernoulli_ll_formula(ref(x), ref(logits)), dtype, "out")
    expected = autograd(bernoulli_ll_formula, [ref(x), ref(logits)], [torch.full((R,), scale, dtype=torch.float64)])
    for name, flag, got, exp in zip(["grad_x", "grad_logits"], need, grads, expected):
        if flag:
            assert_close(got, exp, dtype, name)
        else:
            assert got is None, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_ll_extreme_logits(tv, dtype):
    """Large |logits| neither overflow nor lose the small softplus tail (log1p, not log(1+u))."""
    logits = torch.tensor([[-1e4, -100.0, -30.0, -20.0, 20.0, 30.0, 100.0, 1e4]], dtype=dtype, device=DEVICE)
    for value in (0.0, 1.0):
        x = torch.full_like(logits, value)
        out = ref(tv.bernoulli_ll_fwd(x, logits))
        expected = bernoulli_ll_formula(ref(x), ref(logits))
        assert torch.isfinite(out).all()
        assert torch.allclose(out, expected, rtol=1e-6, atol=0)
        # one element at a time: the tails down to exp(-100) keep their relative accuracy
        # (below the float32 normal range, GPUs may flush to zero: atol covers that)
        tiny = torch.finfo(dtype).tiny
        for j in range(logits.shape[1]):
            xj, lj = x[:, j : j + 1], logits[:, j : j + 1]
            single, expected_j = ref(tv.bernoulli_ll_fwd(xj, lj)), bernoulli_ll_formula(ref(xj), ref(lj))
            assert torch.allclose(single, expected_j, rtol=1e-5, atol=tiny), (value, lj.item(), single, expected_j)
        # d/dl = x - sigmoid(l): sigmoid(-l) for x = 1, -sigmoid(l) for x = 0 (no cancellation)
        _, grad_logits = tv.bernoulli_ll_bwd(x, logits, torch.ones(1, dtype=dtype, device=DEVICE))
        exp = torch.sigmoid(-ref(logits)) if value == 1.0 else -torch.sigmoid(ref(logits))
        assert torch.allclose(ref(grad_logits), exp, rtol=1e-5, atol=tiny), (ref(grad_logits), exp)


# ---------------------------------------------------------------------------------------------
# importance-weighted bound
# ---------------------------------------------------------------------------------------------

IWAE_SHAPES = [(1, 1, 1), (1, 4, 10), (5, 2, 7), (4, 9, 785), (3, 300, 3)]


def _iwae_inputs(inp, S, B, D):
    lpx = inp.randn(S, B, scale=20.0) - 100.0
    return lpx, inp.randn(B, D), inp.randn(B, D, scale=0.7), inp.randn(S, B, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", IWAE_SHAPES)
def test_iwae_fwd(tv, S, B, D, dtype):
    lpx, mu, lv, eps = _iwae_inputs(Inputs(dtype, seed=7), S, B, D)
    bound, w = tv.iwae_fwd(lpx, mu, lv, eps)
    args = [ref(t) for t in (lpx, mu, lv, eps)]
    exp_bound, exp_w = iwae_formula(*args)
    assert_close(bound, exp_bound, dtype, "bound")
    assert_close(w, exp_w, dtype, "w")
    # log w = log p(x|z) + log N(z; 0, I) - log N(z; mu, exp(lv)) with torch.distributions
    lpx_, mu_, lv_, eps_ = args
    z = mu_ + torch.exp(lv_ / 2) * eps_
    log_w = lpx_ + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu_, torch.exp(lv_ / 2)).log_prob(z).sum(-1)
    assert_close(bound, torch.logsumexp(log_w, 0) - math.log(S), dtype, "bound vs torch.distributions")
    if S == 1:  # one sample: the single-sample ELBO estimate
        assert_close(bound, log_w[0], dtype, "S=1 bound vs ELBO")
        assert torch.all(ref(w) == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", IWAE_SHAPES)
def test_iwae_bwd(tv, S, B, D, dtype):
    inp = Inputs(dtype, seed=8)
    lpx, mu, lv, eps = _iwae_inputs(inp, S, B, D)
    gb = inp.randn(B)
    _, w = tv.iwae_fwd(lpx, mu, lv, eps)
    grads = tv.iwae_bwd(lpx, mu, lv, eps, w, gb)
    bound_only = lambda *a: iwae_formula(*a)[0]  # noqa: E731
    expected = autograd(bound_only, [ref(t) for t in (lpx, mu, lv, eps)], [ref(gb)])
    for name, got, exp in zip(["grad_log_px", "grad_mu", "grad_logvar"], grads, expected):
        assert_close(got, exp, dtype, name)


def test_iwae_bound_rises_with_samples_towards_log_px(tv):
    """Conjugate model p(z) = N(0, 1), p(x|z) = N(x; z, 1) with the prior as proposal: the
    S = 1 bound averages to the closed-form ELBO -log(2 pi)/2 - (x^2 + 1)/2, and the IWAE bound
    rises with S towards log p(x) = log N(x; 0, 2)."""
    B, x = 2000, 1.5
    log_px = Normal(0.0, math.sqrt(2.0)).log_prob(torch.tensor(x, dtype=torch.float64)).item()
    elbo = -0.5 * math.log(2 * math.pi) - 0.5 * (x**2 + 1)
    mu = torch.zeros(B, 1, dtype=torch.float64, device=DEVICE)
    lv = torch.zeros_like(mu)
    means = []
    for S in (1, 4, 32):
        eps = tv.normal_noise(S, B, 1, 99 + S, torch.float64, device=DEVICE)
        lpx = Normal(ref(eps)[..., 0], 1.0).log_prob(torch.tensor(x, dtype=torch.float64))
        bound, _ = tv.iwae_fwd(lpx.to(DEVICE), mu, lv, eps)
        means.append(ref(bound).mean().item())
    sd_elbo = math.sqrt(0.5 + x**2) / math.sqrt(B)  # sd of the mean of (x - z)^2 / 2, z ~ N(0, 1)
    assert abs(means[0] - elbo) < 5 * sd_elbo
    assert means[0] < means[1] < means[2]
    assert abs(log_px - means[2]) < 0.1 * (log_px - elbo)


# ---------------------------------------------------------------------------------------------
# through the public functions: fastlvm.functional with backend='triton'
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def functional(tv):
    from fastlvm import functional

    return functional


def _f64(*shape, seed, scale=1.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE)
    return t.requires_grad_(grad)


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_functional_reparameterize_gradcheck(functional):
    mu, lv = _f64(3, 4, seed=20), _f64(3, 4, seed=21, scale=0.5)
    eps = _f64(2, 3, 4, seed=22, grad=False)
    _gradcheck(lambda m, v: functional.reparameterize(m, v, eps, backend="triton"), (mu, lv))
    # in-kernel noise: a fresh generator per call, so every evaluation draws the same noise
    noisy = lambda m, v: functional.reparameterize(  # noqa: E731
        m, v, n_samples=2, generator=torch.Generator().manual_seed(5), backend="triton")
    _gradcheck(noisy, (mu, lv))
    # the same numbers as the torch backend (one noise spec for every backend)
    for got, exp in zip(noisy(mu, lv), functional.reparameterize(
            mu, lv, n_samples=2, generator=torch.Generator().manual_seed(5), backend="torch")):
        assert torch.allclose(got, exp, rtol=1e-12, atol=1e-12)


def test_functional_log_likelihoods_gradcheck(functional):
    x, mean, lv = _f64(2, 3, seed=23), _f64(2, 2, 3, seed=24), _f64(3, seed=25, scale=0.5)
    _gradcheck(lambda *a: functional.gaussian_log_likelihood(*a, backend="triton"), (x, mean, lv))
    _gradcheck(lambda *a: functional.gaussian_log_likelihood(*a, backend="triton"), (x, mean))
    probs = torch.rand(2, 3, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    xb, logits = probs.to(DEVICE).requires_grad_(), _f64(2, 2, 3, seed=27, scale=3.0)
    _gradcheck(lambda *a: functional.bernoulli_log_likelihood(*a, backend="triton"), (xb, logits))
    kl = _f64(2, seed=28)
    _gradcheck(lambda *a: functional.negative_elbo(a[0], a[1], mean=a[2], logvar=a[3], backend="triton"),
               (x, kl, mean, lv))
    _gradcheck(lambda *a: functional.negative_elbo(a[0], a[1], logits=a[2], backend="triton"), (xb, kl, logits))


def test_functional_forward_pass_gradients_gradcheck(functional, tv, monkeypatch):
    """Operands with all rows take the *_fwd_grad path (gradients computed in the forward)."""

    def not_called(*args):
        raise AssertionError("the backward kernel ran: the forward-pass gradients were not used")

    monkeypatch.setattr(tv, "gaussian_ll_bwd", not_called)
    monkeypatch.setattr(tv, "bernoulli_ll_bwd", not_called)
    x, mean, lv = _f64(2, 3, seed=34), _f64(2, 3, seed=35), _f64(2, 3, seed=36, scale=0.5)
    _gradcheck(lambda *a: functional.gaussian_log_likelihood(*a, backend="triton"), (x, mean, lv))
    data, kl = _f64(2, 3, seed=37, grad=False), _f64(2, seed=38)
    mean_s, lv_s, logits = _f64(2, 2, 3, seed=39), _f64(2, 2, 3, seed=40, scale=0.5), _f64(2, 2, 3, seed=41)
    _gradcheck(lambda *a: functional.negative_elbo(data, a[0], mean=a[1], logvar=a[2], backend="triton"),
               (kl, mean_s, lv_s))
    binary = data.detach().gt(0).to(torch.float64)
    _gradcheck(lambda *a: functional.negative_elbo(binary, a[0], logits=a[1], backend="triton"), (kl, logits))


def test_functional_iwae_bound_gradcheck(functional):
    lpx, mu, lv = _f64(3, 2, seed=29, scale=3.0), _f64(2, 4, seed=30), _f64(2, 4, seed=31, scale=0.5)
    eps = _f64(3, 2, 4, seed=32, grad=False)
    _gradcheck(lambda *a: functional.iwae_bound(*a, eps, backend="triton"), (lpx, mu, lv))


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_triton_matches_torch_backend(functional, dtype):
    """Values and gradients of every public function agree with backend='torch' (the reference)."""
    inp = Inputs(dtype, seed=33)
    S, B, D, Dz = 2, 5, 785, 3
    x, mean, lv_x = inp.randn(B, D), inp.randn(S, B, D), inp.randn(D, scale=0.5)
    logits, xb = inp.randn(S, B, D, scale=4.0), inp.binary(B, D)
    mu, lv, eps, lpx = inp.randn(B, Dz), inp.randn(B, Dz, scale=0.5), inp.randn(S, B, Dz), inp.randn(S, B)
    cases = {
        "reparameterize": (lambda m, v: functional.reparameterize(m, v, eps, backend=bk), (mu, lv)),
        "reparameterize noise": (lambda m, v: functional.reparameterize(
            m, v, n_samples=S, generator=torch.Generator().manual_seed(9), backend=bk), (mu, lv)),
        "gaussian": (lambda *a: functional.gaussian_log_likelihood(*a, backend=bk), (x, mean, lv_x)),
        "bernoulli": (lambda *a: functional.bernoulli_log_likelihood(*a, backend=bk), (xb, logits)),
        "iwae": (lambda *a: functional.iwae_bound(*a, eps, backend=bk), (lpx, mu, lv)),
    }
    for name, (fn, args) in cases.items():
        results = {}
        for bk in ("triton", "torch"):
            leaves = [a.detach().clone().requires_grad_() for a in args]
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            results[bk] = [o.detach() for o in outs] + [t.grad for t in leaves]
        for got, exp in zip(results["triton"], results["torch"]):
            assert_close(got, ref(exp), dtype, name)
