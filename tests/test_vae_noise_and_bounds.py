"""In-kernel noise (reproducible, standard normal, regenerated in backward) and the bounds'
properties: Jensen's inequality, and probabilistic PCA, whose log p(x) and exact posterior are
known in closed form."""

import math

import pytest
import scipy.stats
import torch
from torch.distributions import MultivariateNormal

import fastlvm.functional as F
from fastlvm.kernels import cpp
from fastlvm.reference import vae as ref

BACKENDS = ["cpp", "torch"]
D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _params(B, D, dtype=D64, seed=0):
    g = _gen(seed)
    mu = torch.randn(B, D, dtype=D64, generator=g).to(dtype).requires_grad_()
    lv = (0.5 * torch.randn(B, D, dtype=D64, generator=g)).to(dtype).requires_grad_()
    return mu, lv


# ------------------------------------------------------------------- noise


@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_cpp_noise_is_the_reference_stream(dtype):
    # An odd row length makes Box-Muller pairs straddle rows and samples.
    for seed in (0, 1, 2**40 + 3, 2**64 - 1):
        got = cpp.normal_noise(3, 7, 5, seed, dtype)
        want = ref.normal_noise(3, 7, 5, seed, D64).to(dtype)
        torch.testing.assert_close(got, want, rtol=1e-13 if dtype == D64 else 1e-6, atol=1e-13)


def test_cpp_noise_is_standard_normal():
    eps = cpp.normal_noise(10, 1000, 100, seed=7).reshape(-1)
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert scipy.stats.kstest(eps[:200_000].numpy(), "norm").pvalue > 1e-3
    assert eps.abs().max() < 9  # 52-bit uniforms: |eps| <= sqrt(2 * 52 ln 2) ~ 8.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_z_and_different_seeds_differ(backend):
    mu, lv = _params(4, 6)
    z1, kl1 = F.reparameterize(mu, lv, n_samples=3, generator=_gen(5), backend=backend)
    z2, kl2 = F.reparameterize(mu, lv, n_samples=3, generator=_gen(5), backend=backend)
    z3, _ = F.reparameterize(mu, lv, n_samples=3, generator=_gen(6), backend=backend)
    assert z1.shape == (3, 4, 6) and kl1.shape == (4,)
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)
    assert not torch.isclose(z1, z3).any()
    # The samples of one call differ from each other too.
    assert not torch.isclose(z1[0], z1[1]).any()
    # Without a generator, torch's default generator decides.
    torch.manual_seed(11)
    z4, _ = F.reparameterize(mu, lv, backend=backend)
    torch.manual_seed(11)
    z5, _ = F.reparameterize(mu, lv, backend=backend)
    assert z4.shape == (4, 6) and torch.equal(z4, z5)


def test_backends_draw_the_same_noise():
    mu, lv = _params(5, 3)
    z_cpp, _ = F.reparameterize(mu, lv, n_samples=2, generator=_gen(3), backend="cpp")
    z_ref, _ = F.reparameterize(mu, lv, n_samples=2, generator=_gen(3), backend="torch")
    torch.testing.assert_close(z_cpp, z_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_is_normal_with_the_encoders_moments(backend):
    mu = torch.tensor([[1.5, -2.0, 0.0]], dtype=D64)
    lv = torch.tensor([[0.0, math.log(4.0), math.log(0.25)]], dtype=D64)
    z, _ = F.reparameterize(mu, lv, n_samples=100_000, generator=_gen(1), backend=backend)
    n = z.shape[0]
    sd = torch.exp(0.5 * lv)[0]
    assert ((z.mean(0)[0] - mu[0]).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((z.var(0)[0] / sd**2 - 1).abs() < 5 * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_backward_regenerates_the_forward_noise(backend, dtype):
    mu, lv = _params(6, 5, dtype)
    z, kl = F.reparameterize(mu, lv, n_samples=4, generator=_gen(2), backend=backend)
    eps = ((z - mu) / torch.exp(0.5 * lv)).detach()  # the noise the forward pass used
    w = torch.randn(z.shape, dtype=D64, generator=_gen(3)).to(dtype)
    got = torch.autograd.grad((z * w).sum() + kl.sum(), (mu, lv))
    z2, kl2 = F.reparameterize(mu, lv, eps, backend=backend)
    want = torch.autograd.grad((z2 * w).sum() + kl2.sum(), (mu, lv))
    tol = 1e-10 if dtype == D64 else 1e-4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------- bounds


def _log_px_given_z(x, z, W, b, log_s2):
    """Gaussian decoder mean W z + b with variance s2, through fastlvm's likelihood."""
    mean = z @ W.T + b
    return F.gaussian_log_likelihood(x, mean, torch.full((x.shape[-1],), log_s2, dtype=x.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_iwae_is_at_least_the_mean_single_sample_elbo(backend):
    S, B, Dz = 50, 7, 3
    g = _gen(0)
    mu, lv = _params(B, Dz)
    eps = torch.randn(S, B, Dz, dtype=D64, generator=g)
    lpx = -30 + 5 * torch.randn(S, B, dtype=D64, generator=g)
    iwae = F.iwae_bound(lpx, mu, lv, eps, backend=backend)
    elbos = torch.stack([F.iwae_bound(lpx[s:s + 1], mu, lv, eps[s:s + 1], backend=backend)
                         for s in range(S)])
    assert (iwae >= elbos.mean(0)).all()
    assert (iwae > elbos.mean(0) + 1e-3).all()  # strictly: the weights are not all equal
    assert (iwae <= elbos.max(0).values).all()


def _ppca(d=12, k=3, n=6, seed=0):
    """x = W z + b + noise with orthogonal columns of W, so the posterior is diagonal."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=D64, generator=g))
    W = q * torch.tensor([2.0, 1.0, 0.5], dtype=D64)
    b = torch.randn(d, dtype=D64, generator=g)
    s2 = 0.3
    x = torch.randn(n, k, dtype=D64, generator=g) @ W.T + b \
        + math.sqrt(s2) * torch.randn(n, d, dtype=D64, generator=g)
    log_px = MultivariateNormal(b, W @ W.T + s2 * torch.eye(d, dtype=D64)).log_prob(x)
    # Exact posterior: N(M^-1 W^T (x - b), s2 M^-1) with M = W^T W + s2 I (diagonal here).
    m = (W * W).sum(0) + s2
    return x, W, b, math.log(s2), log_px, (x - b) @ W / m, torch.log(s2 / m).expand(n, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [1, 7])
def test_iwae_with_the_exact_posterior_is_log_px(backend, S):
    x, W, b, log_s2, log_px, mu, lv = _ppca()
    eps = torch.randn(S, *mu.shape, dtype=D64, generator=_gen(1))
    z = mu + torch.exp(0.5 * lv) * eps
    bound = F.iwae_bound(_log_px_given_z(x, z, W, b, log_s2), mu, lv, eps, backend=backend)
    torch.testing.assert_close(bound, log_px, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iwae_with_a_wrong_posterior_approaches_log_px_while_elbo_stays_below(backend):
    x, W, b, log_s2, log_px, mu, lv = _ppca()
    mu, lv = mu + 0.15, lv + 0.3  # a slightly wrong q
    S = 5000
    eps = torch.randn(S, *mu.shape, dtype=D64, generator=_gen(2))
    z = mu + torch.exp(0.5 * lv) * eps
    lpx = _log_px_given_z(x, z, W, b, log_s2)
    iwae = F.iwae_bound(lpx, mu, lv, eps, backend=backend)
    elbo = torch.stack([F.iwae_bound(lpx[s:s + 1], mu, lv, eps[s:s + 1], backend=backend)
                        for s in range(0, S, 50)]).mean(0)
    assert ((iwae - log_px).abs() < 0.05).all()
    assert (elbo < log_px - 0.1).all()
    assert (elbo < iwae).all()
