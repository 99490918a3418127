"""The Triton kernels of the latent-space terms (fastlvm.kernels.triton_latent): MMD and the
nearest-code search against the torch reference and a brute-force argmin written here.

Runs under TRITON_INTERPRET=1 (set before triton is imported; the Makefile runs this marker in
its own process) on CPU tensors, or on a CUDA device when there is one."""

import os

import numpy as np
import pytest
import torch

import fastlvm.functional as F

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.skipif(not (_INTERPRET or _CUDA),
                       reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton is imported"),
]

DEVICE = "cuda" if _CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


@pytest.fixture(scope="module", autouse=True)
def _triton():
    pytest.importorskip("triton")


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize("n,m,dim", [(2, 3, 1), (45, 37, 5)])
def test_mmd_equals_reference(dtype, kernel, n, m, dim):
    g = torch.Generator().manual_seed(n + dim)
    x64 = torch.randn(n, dim, generator=g, dtype=torch.float64) * 0.8
    y64 = torch.randn(m, dim, generator=g, dtype=torch.float64) + 0.3
    out = {}
    for backend in ("triton", "torch"):
        x = x64.to(DEVICE, dtype).clone().requires_grad_()
        y = y64.to(DEVICE, dtype).clone().requires_grad_()
        value = F.mmd(x, y, kernel=kernel, backend=backend)
        (3.0 * value).backward()
        out[backend] = (value.detach(), x.grad, y.grad)
    for fast, slow in zip(out["triton"], out["torch"]):
        assert fast.dtype == dtype
        assert _rel(fast, slow) < TOL[dtype] * 20 or float((fast.double() - slow.double()).abs().max()) < TOL[dtype]


def test_mmd_prior_draws_match_the_cpu_backends():
    z = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = F.mmd(z.to(DEVICE), generator=torch.Generator(device=DEVICE).manual_seed(4), backend="triton")
    slow = F.mmd(z, generator=torch.Generator(device=DEVICE).manual_seed(4), backend="torch")
    assert float(fast) == pytest.approx(float(slow), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,dim", [(1, 1, 1), (70, 45, 6), (33, 3, 20)])
def test_nearest_codes_are_the_brute_force_argmin(dtype, n, m, dim):
    g = torch.Generator().manual_seed(n * m)
    codebook = torch.randn(m, dim, generator=g, dtype=torch.float64)
    z = codebook[torch.randint(0, m, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    zd, cd = (t.to(DEVICE, dtype).clone().requires_grad_() for t in (z, codebook))
    z_q, codes, loss = F.vector_quantize(zd, cd, backend="triton")
    d2 = ((z.to(dtype).double()[:, None] - codebook.to(dtype).double()[None]) ** 2).sum(-1).numpy()
    np.testing.assert_array_equal(codes.cpu().numpy(), d2.argmin(1))
    loss.backward()
    ref_z, ref_c = (t.to(dtype).clone().requires_grad_() for t in (z, codebook))
    _, _, ref_loss = F.vector_quantize(ref_z, ref_c, backend="torch")
    ref_loss.backward()
    assert _rel(loss, ref_loss) < TOL[dtype] * 10
    assert _rel(zd.grad, ref_z.grad) < TOL[dtype] * 10
    assert _rel(cd.grad, ref_c.grad) < TOL[dtype] * 10


def test_nearest_codes_ties_go_to_the_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]] * 10, device=DEVICE)
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.5], [-0.1, 0.0]], device=DEVICE)
    _, codes, _ = F.vector_quantize(z, codebook, backend="triton")
    assert codes.tolist() == [0, 1, 0, 4]


def test_codebook_statistics():
    z = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    codes = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(3))
    fast = F.codebook_statistics(z.to(DEVICE), codes.to(DEVICE), 6, backend="triton")
    slow = F.codebook_statistics(z, codes, 6, backend="torch")
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
