"""The plain-PyTorch reference of the VAE objective against oracles nobody here wrote:
torch.distributions for densities and KL, Random123's known answers for Philox, scipy for
the normal distribution of the noise."""

import math

import pytest
import scipy.stats
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from fastlvm.reference import vae as ref

D64 = torch.float64


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, dtype=D64, generator=torch.Generator().manual_seed(seed))


def test_kl_matches_torch_distributions():
    mu, lv = _rand(6, 5), _rand(6, 5, seed=1)
    want = kl_divergence(Normal(mu, torch.exp(0.5 * lv)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(ref.kl_standard_normal(mu, lv), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("logvar_shape", [None, (7,), (3, 4, 7)])
def test_gaussian_log_likelihood_matches_normal_log_prob(logvar_shape):
    x, mean = _rand(4, 7), _rand(3, 4, 7, seed=1)
    lv = None if logvar_shape is None else _rand(*logvar_shape, seed=2)
    scale = torch.ones(()) if lv is None else torch.exp(0.5 * lv)
    want = Normal(mean, scale).log_prob(x).sum(-1)
    torch.testing.assert_close(ref.gaussian_log_likelihood(x, mean, lv), want, rtol=1e-12, atol=0)


def test_bernoulli_log_likelihood_matches_torch_for_large_logits():
    logits = torch.tensor([[-1e4, -60.0, -3.0, 0.0, 2.5, 60.0, 1e4]], dtype=D64)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]], dtype=D64)
    want = Bernoulli(logits=logits).log_prob(x).sum(-1)
    got = ref.bernoulli_log_likelihood(x, logits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_softplus_is_exact_where_torch_thresholds():
    l = torch.tensor([25.0, 40.0], dtype=D64)
    want = torch.tensor([25.0 + math.log1p(math.exp(-25.0)), 40.0 + math.exp(-40.0)], dtype=D64)
    torch.testing.assert_close(ref.softplus(l), want, rtol=1e-15, atol=0)


def test_iwae_bound_matches_distributions_and_logsumexp():
    S, B, D = 5, 3, 4
    lpx, mu, lv, eps = _rand(S, B), _rand(B, D, seed=1), _rand(B, D, seed=2), _rand(S, B, D, seed=3)
    z = mu + torch.exp(0.5 * lv) * eps
    log_w = (lpx + Normal(0.0, 1.0).log_prob(z).sum(-1)
             - Normal(mu, torch.exp(0.5 * lv)).log_prob(z).sum(-1))
    want = torch.logsumexp(log_w, 0) - math.log(S)
    torch.testing.assert_close(ref.iwae_bound(lpx, mu, lv, eps), want, rtol=1e-12, atol=0)


# Random123's tests/kat_vectors, the philox4x32 10 lines: counter, key, expected output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    words = ref.philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in words) == want


def test_reference_noise_is_standard_normal():
    eps = ref.normal_noise(4, 250, 1000, seed=2024).reshape(-1)
    assert scipy.stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    # Box-Muller pairs (elements 2p, 2p + 1) are independent.
    pairs = eps.reshape(-1, 2)
    assert abs(torch.corrcoef(pairs.T)[0, 1]) < 5 / math.sqrt(pairs.shape[0])
