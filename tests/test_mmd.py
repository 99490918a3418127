"""fastlvm.functional.mmd: the C++ kernel and the torch reference against the direct all-pairs
formula written here, torch.autograd.gradcheck, the closed-form population MMD of two Gaussians
under the RBF kernel, and the U-statistic of a sample against itself."""

import math

import pytest
import torch

import fastlvm.functional as F
from fastlvm.reference import vae as ref

KERNELS = ["imq", "rbf"]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _kernel_matrix(a, b, kernel, c):
    """k(a_i, b_j) for all pairs, from the definitions (B x M x D differences)."""
    d2 = ((a.double()[:, None, :] - b.double()[None, :, :]) ** 2).sum(-1)
    return c / (c + d2) if kernel == "imq" else torch.exp(-d2 / c)


def _direct_mmd(x, y, kernel, c):
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = (_kernel_matrix(a, b, kernel, c) for a, b in ((x, x), (y, y), (x, y)))
    return ((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
            - 2 * kxy.sum() / (n * m))


def _c(kernel, dim, scale=None):
    return 2.0 * dim * (scale or 1.0) ** 2 if kernel == "imq" else 2.0 * (dim if scale is None else scale**2)


def _rel(a, b):
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    assert torch.isfinite(a).all()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_equals_direct_formula(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5
    c = _c(kernel, 3)
    assert float(ref.mmd(x, y, kernel, c)) == pytest.approx(float(_direct_mmd(x, y, kernel, c)), rel=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,dim", [(2, 2, 1), (70, 130, 5), (129, 64, 32), (33, 200, 3), (50, 47, 20)])
def test_cpp_equals_reference_value_and_gradients(kernel, dtype, n, m, dim):
    g = torch.Generator().manual_seed(n + m + dim)
    x64 = torch.randn(n, dim, generator=g, dtype=torch.float64) * 0.7 + 0.2
    y64 = torch.randn(m, dim, generator=g, dtype=torch.float64)
    out = {}
    for backend in ("cpp", "torch"):
        x = x64.to(dtype).requires_grad_()
        y = y64.to(dtype).requires_grad_()
        value = F.mmd(x, y, kernel=kernel, scale=1.3, backend=backend)
        (value * 2.5).backward()
        value = value.detach()
        assert value.dtype == dtype and value.shape == ()
        out[backend] = (value, x.grad, y.grad)
    c = _c(kernel, dim, 1.3)
    direct = _direct_mmd(x64.to(dtype).double(), y64.to(dtype).double(), kernel, c)
    assert float(out["cpp"][0]) == pytest.approx(float(direct), abs=TOL[dtype] * 10)
    for fast, slow in zip(out["cpp"], out["torch"]):
        assert _rel(fast, slow) < TOL[dtype] * 10


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gradcheck(kernel, backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: F.mmd(a, b, kernel=kernel, backend=backend), (x, y))
    # in-kernel prior draws: z alone gets a gradient, the draws are fixed by the generator's seed
    assert torch.autograd.gradcheck(
        lambda a: F.mmd(a, kernel=kernel, generator=torch.Generator().manual_seed(5), backend=backend), (x,))


def test_prior_draws_are_the_noise_spec_and_the_same_on_every_backend():
    z = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    values = [F.mmd(z, generator=torch.Generator().manual_seed(9), backend=b) for b in ("cpp", "torch")]
    assert float(values[0]) == pytest.approx(float(values[1]), rel=1e-12)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(9)))
    prior = ref.normal_noise(1, 40, 4, seed)[0]
    assert float(values[0]) == pytest.approx(float(ref.mmd(z, prior, "imq", 8.0)), rel=1e-12)
    torch.manual_seed(3)
    a = F.mmd(z)
    torch.manual_seed(3)
    assert float(F.mmd(z)) == float(a)


def test_unbiased_against_the_closed_form_for_two_gaussians():
    """x ~ N(0, I), y ~ N(mu, s^2 I) in D dims and k = exp(-|a-b|^2 / c), c = 2 h^2:
    E k(a, b) = (h^2 / (h^2 + v_a + v_b))^(D/2) exp(-|mu_a - mu_b|^2 / (2 (h^2 + v_a + v_b)))."""
    D, h2, s2 = 2, 1.5, 1.44
    mu = torch.tensor([0.6, -0.3], dtype=torch.float64)

    def expected_k(va, vb, dmu2):
        t = h2 + va + vb
        return (h2 / t) ** (D / 2) * math.exp(-dmu2 / (2 * t))

    population = expected_k(1, 1, 0) + expected_k(s2, s2, 0) - 2 * expected_k(1, s2, float(mu @ mu))
    g = torch.Generator().manual_seed(4)
    n, m, reps = 8, 6, 2000
    estimates = torch.tensor([float(F.mmd(torch.randn(n, D, generator=g, dtype=torch.float64),
                                          mu + math.sqrt(s2) * torch.randn(m, D, generator=g, dtype=torch.float64),
                                          kernel="rbf", scale=math.sqrt(h2)))
                              for _ in range(reps)])
    stderr = float(estimates.std()) / math.sqrt(reps)
    assert abs(float(estimates.mean()) - population) < 4 * stderr
    # a biased (V-statistic) estimate would sit about 2 / n + ... higher: far outside the band
    assert 4 * stderr < 0.5 * (1 / n + 1 / m)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sample_against_itself(kernel):
    """MMD_u(x, x) = 2 S / (n^2 (n - 1)) - 2 / n with S = sum_{i != j} k(x_i, x_j) (k(x, x) = 1):
    the two within-sample means minus the cross mean that keeps its diagonal."""
    x = torch.randn(23, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    c = _c(kernel, 4)
    k = _kernel_matrix(x, x, kernel, c)
    n = x.shape[0]
    S = float(k.sum() - k.trace())
    assert float(F.mmd(x, x.clone(), kernel=kernel)) == pytest.approx(2 * S / (n * n * (n - 1)) - 2 / n, rel=1e-12)


def test_result_does_not_depend_on_the_thread_count():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(7))
    y = torch.randn(260, 8, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    from threadpoolctl import threadpool_limits

    values = []
    for limit in (1, None):
        with threadpool_limits(limits=limit, user_api="openmp"):
            xx = x.clone().requires_grad_()
            v = F.mmd(xx, y)
            v.backward()
            values.append((float(v), xx.grad.clone()))
    torch.set_num_threads(threads)
    assert values[0][0] == values[1][0]
    assert torch.equal(values[0][1], values[1][1])


@pytest.mark.parametrize("call,error,match", [
    (lambda: F.mmd(torch.zeros(1, 3)), ValueError, "at least 2 rows"),
    (lambda: F.mmd(torch.zeros(4, 3), kernel="gauss"), ValueError, "kernel must be one of"),
    (lambda: F.mmd(torch.zeros(4, 3), scale=0.0), ValueError, "scale must be"),
    (lambda: F.mmd(torch.zeros(4, 3), torch.zeros(4, 2)), ValueError, "3 columns"),
    (lambda: F.mmd(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: F.mmd(torch.zeros(4, 3, dtype=torch.int64)), TypeError, "float32 or float64"),
    (lambda: F.mmd(torch.zeros(4, 3), torch.zeros(4, 3), generator=torch.Generator()), ValueError, "not both"),
    (lambda: F.mmd(torch.full((4, 3), math.nan), validate=True), ValueError, "NaN"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
