"""fastlvm.functional on every CPU backend ('cpp', 'torch') against the reference and against
torch.distributions: values and gradients, awkward shapes, both dtypes, and gradcheck."""

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastlvm.functional as F
from fastlvm.kernels import cpp
from fastlvm.reference import vae as ref

BACKENDS = ["cpp", "torch"]
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def rel_err(got, want):
    assert not torch.isnan(got).any() and not torch.isnan(want).any()
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def assert_close(got, want, dtype):
    assert got.shape == want.shape
    assert rel_err(got, want) < RTOL[dtype]


def leaf(*shape, dtype, seed, scale=1.0, shift=0.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, dtype=torch.float64, generator=g)).to(dtype) \
        .requires_grad_(grad)


def grads_of(out, inputs, seed=99):
    """Gradients of <out, random weights> for the inputs that require grad."""
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * w.to(out.dtype)).sum(), inputs)


def check_against(fn_fast, fn_want, inputs, dtype):
    got, want = fn_fast(*inputs), fn_want(*(t.double().detach().requires_grad_() for t in inputs))
    assert_close(got, want.to(dtype), dtype)
    g_got = grads_of(got, inputs)
    wanted_inputs = [t.double().detach().requires_grad_() for t in inputs]
    g_want = grads_of(fn_want(*wanted_inputs), wanted_inputs)
    for a, b in zip(g_got, g_want):
        assert_close(a, b.to(dtype), dtype)


# ------------------------------------------------------------------- values and gradients

DTYPES = [torch.float64, torch.float32]
# (S, B, D): one row, one feature, a feature count that is not a multiple of any vector
# width, more than one sample.
SHAPES = [(1, 1, 1), (1, 1, 785), (3, 5, 1), (4, 33, 785), (2, 7, 13)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", SHAPES)
def test_reparameterize_matches_distributions(backend, dtype, S, B, D):
    mu, lv = leaf(B, D, dtype=dtype, seed=1), leaf(B, D, dtype=dtype, seed=2, scale=0.5)
    eps = leaf(S, B, D, dtype=dtype, seed=3, grad=False)

    def fast(mu, lv):
        z, kl = F.reparameterize(mu, lv, eps, backend=backend)
        return torch.cat([z.reshape(-1), kl])

    def want(mu, lv):
        q = Normal(mu, torch.exp(0.5 * lv))
        kl = kl_divergence(q, Normal(0.0, 1.0)).sum(-1)
        return torch.cat([(mu + q.scale * eps.double()).reshape(-1), kl])

    check_against(fast, want, (mu, lv), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", SHAPES)
@pytest.mark.parametrize("logvar", ["full", "per-feature", "none"])
def test_gaussian_log_likelihood_matches_normal_log_prob(backend, dtype, S, B, D, logvar):
    x = leaf(B, D, dtype=dtype, seed=1)
    mean = leaf(S, B, D, dtype=dtype, seed=2)
    inputs = [x, mean]
    if logvar == "full":
        inputs.append(leaf(S, B, D, dtype=dtype, seed=3, scale=0.5))
    elif logvar == "per-feature":
        inputs.append(leaf(D, dtype=dtype, seed=3, scale=0.5))

    def want(x, mean, lv=None):
        scale = torch.ones((), dtype=x.dtype) if lv is None else torch.exp(0.5 * lv)
        return Normal(mean, scale).log_prob(x).sum(-1)

    check_against(lambda *a: F.gaussian_log_likelihood(*a, backend=backend), want, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", SHAPES)
def test_bernoulli_log_likelihood_matches_bernoulli_log_prob(backend, dtype, S, B, D):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (B, D), generator=g).to(dtype)
    logits = leaf(S, B, D, dtype=dtype, seed=2, scale=5.0)
    check_against(lambda l: F.bernoulli_log_likelihood(x, l, backend=backend),
                  lambda l: Bernoulli(logits=l).log_prob(x.double()).sum(-1), (logits,), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_fractional_x_and_its_gradient_match_reference(backend, dtype):
    x = torch.rand(6, 785, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype).requires_grad_()
    logits = leaf(6, 785, dtype=dtype, seed=2, scale=30.0)
    check_against(lambda *a: F.bernoulli_log_likelihood(*a, backend=backend),
                  ref.bernoulli_log_likelihood, (x, logits), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_is_stable_for_huge_logits(backend, dtype):
    logits = torch.tensor([[-1e4, -200.0, -30.0, 0.0, 30.0, 200.0, 1e4]], dtype=dtype,
                          requires_grad=True)
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]], dtype=dtype)
    got = F.bernoulli_log_likelihood(x, logits, backend=backend)
    want = Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    assert rel_err(got, want) < RTOL[dtype]
    grad, = torch.autograd.grad(got.sum(), logits)
    want_grad = x - torch.sigmoid(logits.detach())
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want_grad, rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,D", [(1, 1, 1), (1, 4, 785), (6, 5, 3), (64, 9, 32)])
def test_iwae_bound_matches_distributions(backend, dtype, S, B, D):
    lpx = leaf(S, B, dtype=dtype, seed=1, scale=3.0, shift=-20.0)
    mu, lv = leaf(B, D, dtype=dtype, seed=2), leaf(B, D, dtype=dtype, seed=3, scale=0.5)
    eps = leaf(S, B, D, dtype=dtype, seed=4, grad=False)

    def want(lpx, mu, lv):
        sigma = torch.exp(0.5 * lv)
        z = mu + sigma * eps.double()
        log_w = (lpx + Normal(0.0, 1.0).log_prob(z).sum(-1)
                 - Normal(mu, sigma).log_prob(z).sum(-1))
        return torch.logsumexp(log_w, 0) - math.log(S)

    check_against(lambda *a: F.iwae_bound(*a, eps, backend=backend), want, (lpx, mu, lv), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-per-feature", "bernoulli"])
def test_negative_elbo_is_the_mean_of_kl_minus_log_likelihood(backend, dtype, likelihood):
    S, B, Dx, Dz = 3, 6, 785, 4
    mu, lv = leaf(B, Dz, dtype=dtype, seed=1), leaf(B, Dz, dtype=dtype, seed=2, scale=0.5)
    eps = leaf(S, B, Dz, dtype=dtype, seed=3, grad=False)
    x = torch.rand(B, Dx, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = leaf(S, B, Dx, dtype=dtype, seed=5)
    lvx = leaf(Dx if likelihood == "gaussian-per-feature" else (S, B, Dx), dtype=dtype, seed=6,
               scale=0.3) if likelihood != "bernoulli" else None
    params = [t for t in (mu, lv, out, lvx) if t is not None]

    def fast(mu, lv, out, lvx=None):
        z, kl = F.reparameterize(mu, lv, eps, backend=backend)
        if likelihood == "bernoulli":
            loss = F.negative_elbo(x, kl, logits=out, backend=backend)
        else:
            loss = F.negative_elbo(x, kl, mean=out, logvar=lvx, backend=backend)
        return loss + (z ** 2).sum()  # something of z too, as a decoder would

    def want(mu, lv, out, lvx=None):
        z = mu + torch.exp(0.5 * lv) * eps.double()
        kl = kl_divergence(Normal(mu, torch.exp(0.5 * lv)), Normal(0.0, 1.0)).sum(-1)
        if likelihood == "bernoulli":
            ll = Bernoulli(logits=out, validate_args=False).log_prob(x.double()).sum(-1)
        else:
            ll = Normal(out, torch.exp(0.5 * lvx)).log_prob(x.double()).sum(-1)
        return kl.mean() - ll.mean() + (z ** 2).sum()

    check_against(fast, want, params, dtype)


# ------------------------------------------------------------------- layouts and dispatch


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    d = torch.float64
    x = leaf(9, 2 * 785, dtype=d, seed=1)[:, ::2]              # strided columns
    mean = leaf(785, 3, 9, dtype=d, seed=2).permute(2, 1, 0)  # (9, 3, 785) transposed
    mean = mean.transpose(0, 1)                                # (3, 9, 785)
    lv = leaf(9, 785, dtype=d, seed=3, scale=0.3).t().contiguous().t()
    assert not (x.is_contiguous() or mean.is_contiguous() or lv.is_contiguous())
    check_against(lambda *a: F.gaussian_log_likelihood(*a, backend=backend),
                  ref.gaussian_log_likelihood, (x, mean, lv), d)
    mu, lvz = leaf(4, 10, dtype=d, seed=4).t(), leaf(4, 10, dtype=d, seed=5).t()
    eps = leaf(10, 4, 3, dtype=d, seed=6, grad=False).permute(2, 0, 1)
    lpx = leaf(10, 3, dtype=d, seed=7).t()
    check_against(lambda *a: F.iwae_bound(*a, eps, backend=backend),
                  lambda *a: ref.iwae_bound(*a, eps.double()), (lpx, mu, lvz), d)
    check_against(lambda *a: torch.cat([t.reshape(-1)
                                        for t in F.reparameterize(*a, eps, backend=backend)]),
                  lambda m, l: torch.cat([ref.reparameterize(m, l, eps).reshape(-1),
                                          ref.kl_standard_normal(m, l)]), (mu, lvz), d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_general_broadcast_falls_back_to_a_copy(backend):
    d = torch.float64
    x = leaf(4, 1, 6, dtype=d, seed=1)    # broadcast in the middle: not periodic
    mean = leaf(4, 5, 6, dtype=d, seed=2)
    lv = leaf(5, 1, dtype=d, seed=3)      # broadcast over the features
    check_against(lambda *a: F.gaussian_log_likelihood(*a, backend=backend),
                  ref.gaussian_log_likelihood, (x, mean, lv), d)


def test_auto_backend_is_cpp_on_cpu_and_matches_explicit():
    mean = leaf(3, 5, dtype=torch.float32, seed=1)
    x = leaf(3, 5, dtype=torch.float32, seed=2, grad=False)
    assert torch.equal(F.gaussian_log_likelihood(x, mean),
                       F.gaussian_log_likelihood(x, mean, backend="cpp"))


def test_float64_cpp_is_within_1e12_of_reference():
    # The float64 kernels compute the same sums as the reference, up to a few roundings.
    dtype = torch.float64
    x, mean, lv = (leaf(64, 785, dtype=dtype, seed=s, scale=0.5) for s in (1, 2, 3))
    got = F.gaussian_log_likelihood(x, mean, lv, backend="cpp")
    assert rel_err(got, ref.gaussian_log_likelihood(x, mean, lv)) < 1e-12
    logits = 10 * mean
    got = F.bernoulli_log_likelihood(torch.sigmoid(x), logits, backend="cpp")
    assert rel_err(got, ref.bernoulli_log_likelihood(torch.sigmoid(x), logits)) < 1e-12


# ------------------------------------------------------------------- the kernel-level API

KERNEL_CASES = {
    "gaussian_ll_bwd": lambda t: ((t(5, 7), t(3 * 5, 7), t(1, 7)), t(15)),
    "gaussian_ll_bwd_unit": lambda t: ((t(5, 7), t(5, 7), None), t(5)),
    "bernoulli_ll_bwd": lambda t: ((t(2 * 4, 9), t(4, 9)), t(8)),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_kernels_match_reference_kernels(dtype):
    """Every entry of the shared kernel API, including those functional.py does not reach on
    the CPU (the separate backward kernels of periodic operands and of the IWAE bound)."""
    R = F._ReferenceKernels
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)

    def same(a, b):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert (u is None) == (v is None)
            if u is not None:
                assert_close(u, v, dtype)

    for name, make in KERNEL_CASES.items():
        ops, grad_out = make(t)
        kernel = name.replace("_unit", "")
        same(getattr(cpp, kernel)(*ops, grad_out), getattr(R, kernel)(*ops, grad_out))
        fwd = kernel.replace("_bwd", "_fwd")
        same(getattr(cpp, fwd)(*ops), getattr(R, fwd)(*ops))
    S, B, D = 7, 5, 3
    lpx, mu, lv, eps, gb = t(S, B), t(B, D), t(B, D), t(S, B, D), t(B)
    bound, w = cpp.iwae_fwd(lpx, mu, lv, eps)
    same((bound, w), R.iwae_fwd(lpx, mu, lv, eps))
    same(cpp.iwae_bwd(lpx, mu, lv, eps, w, gb), R.iwae_bwd(lpx, mu, lv, eps, w, gb))
    gz, gkl = t(S, B, D), t(B)
    for grad_z, grad_kl in [(gz, gkl), (gz, None), (None, gkl)]:
        same(cpp.reparam_bwd(mu, lv, eps, grad_z, grad_kl),
             R.reparam_bwd(mu, lv, eps, grad_z, grad_kl))
        same(cpp.reparam_noise_bwd(mu, lv, S, 12345, grad_z, grad_kl),
             R.reparam_noise_bwd(mu, lv, S, 12345, grad_z, grad_kl))
    same(cpp.reparam_noise_fwd(mu, lv, S, 2**63 + 7), R.reparam_noise_fwd(mu, lv, S, 2**63 + 7))


# ------------------------------------------------------------------- gradcheck (float64)


def _gc(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    d = torch.float64
    mu, lv = leaf(3, 4, dtype=d, seed=1), leaf(3, 4, dtype=d, seed=2, scale=0.5)
    eps = leaf(2, 3, 4, dtype=d, seed=3, grad=False)
    _gc(lambda m, l: F.reparameterize(m, l, eps, backend=backend), mu, lv)
    _gc(lambda m, l: F.reparameterize(m, l, n_samples=3, backend=backend,
                                      generator=torch.Generator().manual_seed(7)), mu, lv)
    _gc(lambda m, l: F.reparameterize(m, l, backend=backend,
                                      generator=torch.Generator().manual_seed(7)), mu, lv)
    x, mean = leaf(3, 5, dtype=d, seed=4), leaf(2, 3, 5, dtype=d, seed=5)
    lvx, lvf = leaf(2, 3, 5, dtype=d, seed=6, scale=0.5), leaf(5, dtype=d, seed=7, scale=0.5)
    for args in [(x, mean), (x, mean, lvx), (x, mean, lvf), (mean, x, lvf)]:
        _gc(lambda *a: F.gaussian_log_likelihood(*a, backend=backend), *args)
    _gc(lambda *a: F.bernoulli_log_likelihood(*a, backend=backend), x, mean)
    _gc(lambda *a: F.bernoulli_log_likelihood(*a, backend=backend), mean, x)
    lpx = leaf(2, 3, dtype=d, seed=8)
    _gc(lambda *a: F.iwae_bound(*a, eps, backend=backend), lpx, mu, lv)
    kl = leaf(3, dtype=d, seed=9)
    _gc(lambda *a: F.negative_elbo(a[0], a[1], mean=a[2], logvar=a[3], backend=backend),
        x, kl, mean, lvx)
    _gc(lambda *a: F.negative_elbo(a[0], a[1], mean=a[2], logvar=a[3], backend=backend),
        x, kl, mean, lvf)
    _gc(lambda *a: F.negative_elbo(a[0], a[1], logits=a[2], backend=backend), x, kl, mean)
    # Single-row operands (summed over all rows inside the forward kernel).
    x1, m1 = leaf(5, dtype=d, seed=10), leaf(1, 5, dtype=d, seed=11)
    _gc(lambda *a: F.negative_elbo(a[0], a[1], mean=a[2], logvar=a[3], backend=backend),
        x1, kl, mean, lvf)
    _gc(lambda *a: F.negative_elbo(a[0], a[1], logits=a[2], backend=backend), x, kl, m1)


def test_kl_only_and_z_only_gradients():
    d = torch.float64
    mu, lv = leaf(3, 4, dtype=d, seed=1), leaf(3, 4, dtype=d, seed=2)
    for backend in BACKENDS:
        z, kl = F.reparameterize(mu, lv, backend=backend,
                                 generator=torch.Generator().manual_seed(1))
        g_mu, g_lv = torch.autograd.grad(kl.sum(), (mu, lv))
        torch.testing.assert_close(g_mu, mu.detach())
        torch.testing.assert_close(g_lv, 0.5 * (torch.exp(lv.detach()) - 1))
        z, kl = F.reparameterize(mu, lv, backend=backend,
                                 generator=torch.Generator().manual_seed(1))
        g_mu, = torch.autograd.grad(z.sum(), mu)
        torch.testing.assert_close(g_mu, torch.ones_like(mu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_elbo_with_per_feature_parameters_over_many_blocks(dtype):
    # Large enough for many row blocks and threads: the per-feature gradients are summed
    # per block inside the forward kernel, then over the blocks.
    S, B, D = 3, 200, 785
    x = torch.rand(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype)
    mean, lv = leaf(S, B, D, dtype=dtype, seed=2), leaf(D, dtype=dtype, seed=3, scale=0.3)
    kl = leaf(B, dtype=dtype, seed=4)

    def want(mean, lv, kl):
        ll = Normal(mean, torch.exp(0.5 * lv)).log_prob(x.double()).sum(-1)
        return kl.mean() - ll.mean()

    check_against(lambda *a: F.negative_elbo(x, a[2], mean=a[0], logvar=a[1], backend="cpp"),
                  want, (mean, lv, kl), dtype)
    logits = leaf(D, dtype=dtype, seed=5, scale=3.0)
    check_against(lambda l, kl: F.negative_elbo(x, kl, logits=l, backend="cpp"),
                  lambda l, kl: kl.mean() - Bernoulli(logits=l, validate_args=False)
                  .log_prob(x.double()).sum(-1).mean(), (logits, kl), dtype)


def test_cpp_results_do_not_depend_on_the_thread_count():
    S, B, D, Dz = 3, 300, 200, 8  # large enough for the kernels to go parallel
    x = torch.rand(B, D, generator=torch.Generator().manual_seed(0))
    mean = leaf(S, B, D, dtype=torch.float32, seed=1)
    lv_full = leaf(S, B, D, dtype=torch.float32, seed=2)
    lv_feat = leaf(D, dtype=torch.float32, seed=3)
    mu, lvz = leaf(B, Dz, dtype=torch.float32, seed=4), leaf(B, Dz, dtype=torch.float32, seed=5)
    eps = leaf(400, B, Dz, dtype=torch.float32, seed=6, grad=False)
    lpx = leaf(400, B, dtype=torch.float32, seed=7)

    def run():
        z, kl = F.reparameterize(mu, lvz, n_samples=50, generator=torch.Generator().manual_seed(8))
        outs = [z, kl, F.gaussian_log_likelihood(x, mean, lv_feat),
                F.negative_elbo(x, kl, mean=mean, logvar=lv_feat),
                F.negative_elbo(x, kl, mean=mean, logvar=lv_full),
                F.iwae_bound(lpx, mu, lvz, eps)]
        grads = torch.autograd.grad(sum(o.sum() for o in outs),
                                    (mean, lv_full, lv_feat, mu, lvz, lpx))
        return outs + list(grads)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run()
        torch.set_num_threads(max(threads, 2))
        parallel = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)
