"""fastlvm.functional.vector_quantize and codebook_statistics against a brute-force argmin written
here, autograd through the torch reference, NumPy's bincount, and scikit-learn's KMeans (one
Lloyd iteration = one EMA update with decay 0)."""

import numpy as np
import pytest
import torch

import fastlvm.functional as F

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _brute_force_codes(z, codebook):
    z, codebook = z.double().numpy(), codebook.double().numpy()
    codes = []
    for row in z:
        d2 = [float(((row - e) ** 2).sum()) for e in codebook]
        codes.append(min(range(len(d2)), key=lambda k: (d2[k], k)))  # ties to the lowest index
    return np.array(codes)


def _data(n, m, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(m, dim, generator=g, dtype=torch.float64)
    z = codebook[torch.randint(0, m, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g,
                                                                              dtype=torch.float64)
    return z.to(dtype), codebook.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,dim", [(1, 1, 1), (300, 7, 3), (2000, 64, 16), (129, 33, 5)])
def test_codes_are_the_brute_force_argmin(dtype, n, m, dim):
    z, codebook = _data(n, m, dim, dtype, seed=n)
    _, codes, _ = F.vector_quantize(z, codebook, backend="cpp")
    assert codes.dtype == torch.int64
    np.testing.assert_array_equal(codes.numpy(), _brute_force_codes(z, codebook))


def test_ties_go_to_the_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.5], [-0.1, 0.0]])  # row 2 ties codes 0, 1, 2, 3
    for backend in ("cpp", "torch"):
        _, codes, _ = F.vector_quantize(z, codebook, backend=backend)
        assert codes.tolist() == [0, 1, 0, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("commitment", [0.25, 0.0, 1.7])
def test_straight_through_gradient_and_loss_equal_autograd_through_the_reference(dtype, commitment):
    z64, cb64 = _data(257, 12, 6, torch.float64, seed=3)
    w = torch.randn(4, 257 // 4 + 1, 6, dtype=torch.float64).reshape(-1, 6)[:257]
    out = {}
    for backend in ("cpp", "torch"):
        z = z64.to(dtype).requires_grad_()
        cb = cb64.to(dtype).requires_grad_()
        z_q, codes, loss = F.vector_quantize(z, cb, commitment=commitment, backend=backend)
        ((z_q * w.to(dtype)).sum() + 3.0 * loss).backward()
        out[backend] = (z_q.detach(), codes, loss.detach(), z.grad, cb.grad)
    for fast, slow in zip(out["cpp"], out["torch"]):
        if fast.dtype == torch.int64:
            assert torch.equal(fast, slow)
        else:
            assert fast.dtype == dtype
            assert float((fast.double() - slow.double()).norm()) <= TOL[dtype] * (1 + float(slow.double().norm()))
    # the two terms, from the definitions: z_q = e_code; loss = (1 + commitment) mean_i |z_i - e_i|^2
    e = cb64.to(dtype)[out["cpp"][1]]
    assert torch.equal(out["cpp"][0], e)
    expect = (1 + commitment) * float(((z64.to(dtype).double() - e.double()) ** 2).sum(1).mean())
    assert float(out["cpp"][2]) == pytest.approx(expect, rel=TOL[dtype] * 10)


def test_leading_dimensions_and_straight_through():
    z, codebook = _data(24, 5, 3, torch.float64, seed=4)
    z = z.reshape(2, 4, 3, 3).requires_grad_()
    codebook = codebook.requires_grad_()
    z_q, codes, _ = F.vector_quantize(z, codebook)
    assert z_q.shape == z.shape and codes.shape == (2, 4, 3)
    # (no gradcheck: stop-gradients make the loss's gradients differ from its value's derivatives
    # by design; they are checked against autograd through the reference above)
    # z_q is piecewise constant in z_e; its straight-through gradient is the identity by definition
    w = torch.randn_like(z)
    (grad,) = torch.autograd.grad((F.vector_quantize(z, codebook)[0] * w).sum(), z)
    assert torch.equal(grad, w)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_codebook_statistics_equal_bincount(backend):
    z, codebook = _data(3000, 9, 4, torch.float32, seed=5)
    codes = torch.randint(0, 11, (3000,), generator=torch.Generator().manual_seed(1))
    counts, sums = F.codebook_statistics(z, codes, 11, backend=backend)
    assert counts.dtype == sums.dtype == torch.float64
    np.testing.assert_array_equal(counts.numpy(), np.bincount(codes.numpy(), minlength=11))
    for d in range(4):
        np.testing.assert_allclose(sums[:, d].numpy(), np.bincount(codes.numpy(), weights=z[:, d].double().numpy(),
                                                                   minlength=11), rtol=1e-12, atol=1e-9)


def test_ema_update_with_decay_zero_is_one_lloyd_iteration_of_scikit_learn():
    from sklearn.cluster import KMeans

    from fastlvm.vae.vq import Codebook

    z, codebook = _data(2000, 8, 5, torch.float64, seed=6)
    book = Codebook(8, 5, ema_decay=0.0, dtype=torch.float64)
    book.load(codebook)
    _, codes, _ = F.vector_quantize(z, book.vectors)
    book.ema_update(*F.codebook_statistics(z, codes, 8))
    km = KMeans(n_clusters=8, init=codebook.numpy(), n_init=1, max_iter=1, algorithm="lloyd").fit(z.numpy())
    np.testing.assert_allclose(book.vectors.numpy(), km.cluster_centers_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("call,error,match", [
    (lambda: F.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 2)), ValueError, "2 columns"),
    (lambda: F.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 3, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: F.vector_quantize(torch.zeros(4, 3), torch.zeros(3)), ValueError, "2-D"),
    (lambda: F.vector_quantize(torch.zeros(4, 3), torch.zeros(5, 3), commitment=-1.0), ValueError, "commitment"),
    (lambda: F.codebook_statistics(torch.zeros(4, 3), torch.tensor([0, 1, 2, 5]), 5), ValueError, r"\[0, 5\)"),
    (lambda: F.codebook_statistics(torch.zeros(4, 3), torch.zeros(4), 5), TypeError, "int"),
    (lambda: F.codebook_statistics(torch.zeros(4, 3), torch.zeros(3, dtype=torch.int64), 5), ValueError, "shape"),
    (lambda: F.codebook_statistics(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), 0), ValueError, "M must"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
