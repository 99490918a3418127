"""Bad input at the public boundary of fastlvm.functional: a clear error naming the argument."""

import sys

import pytest
import torch

import fastlvm.functional as F


def t(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("call,error,match", [
    (lambda: F.reparameterize([[0.0]], t(1, 1)), TypeError, "mu must be a torch.Tensor"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3).int()), TypeError, "logvar must be float32"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3, dtype=torch.float16)), TypeError, "logvar"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3, dtype=torch.float32)), TypeError,
     "logvar has dtype torch.float32 but mu"),
    (lambda: F.reparameterize(t(3), t(3)), ValueError, "mu must be 2-D"),
    (lambda: F.reparameterize(t(2, 3), t(2, 4)), ValueError, "logvar must have mu's shape"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3), t(2, 4)), ValueError, "eps must have shape"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3), t(2, 3, grad=True)), ValueError, "eps is noise"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3), t(2, 3), n_samples=2), ValueError, "either eps"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3), n_samples=0), ValueError, "n_samples"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3), n_samples=2.0), ValueError, "n_samples"),
    (lambda: F.reparameterize(t(2, 3), t(2, 3), generator=3), TypeError, "generator"),
    (lambda: F.reparameterize(t(0, 3), t(0, 3)), ValueError, "mu must not be empty"),
    (lambda: F.gaussian_log_likelihood(t(2, 3), t(2, 4)), ValueError,
     r"shapes do not broadcast: x \(2, 3\), mean \(2, 4\)"),
    (lambda: F.gaussian_log_likelihood(t(2, 3), t(2, 3), t(4)), ValueError, "logvar"),
    (lambda: F.gaussian_log_likelihood(t(2, 3), torch.tensor(1.0, dtype=torch.float64)),
     ValueError, "mean must have a feature"),
    (lambda: F.gaussian_log_likelihood(t(2, 3), t(2, 3), t(3, dtype=torch.float32)), TypeError,
     "logvar has dtype"),
    (lambda: F.gaussian_log_likelihood(t(2, 3), t(2, 3).to("meta")), ValueError,
     "mean is on meta but x is on cpu"),
    (lambda: F.bernoulli_log_likelihood(t(2, 3).long(), t(2, 3)), TypeError, "x must be float32"),
    (lambda: F.bernoulli_log_likelihood(t(2, 3), t(5, 3)), ValueError, "logits"),
    (lambda: F.iwae_bound(t(4, 2), t(2, 3), t(2, 3), t(4, 2, 5)), ValueError, "eps must have"),
    (lambda: F.iwae_bound(t(4, 3), t(2, 3), t(2, 3), t(4, 2, 3)), ValueError,
     r"log_px_given_z must have shape \(S, B\) = \(4, 2\)"),
    (lambda: F.iwae_bound(t(4, 2), t(2, 3), t(2, 3), t(2, 3)), ValueError, "eps must be 3-D"),
    (lambda: F.negative_elbo(t(2, 3), t(2)), ValueError, "exactly one of mean"),
    (lambda: F.negative_elbo(t(2, 3), t(2), mean=t(2, 3), logits=t(2, 3)), ValueError,
     "exactly one"),
    (lambda: F.negative_elbo(t(2, 3), t(2), logits=t(2, 3), logvar=t(3)), ValueError, "logvar"),
    (lambda: F.negative_elbo(t(2, 3), t(3), mean=t(2, 3)), ValueError, "kl must have shape"),
    (lambda: F.gaussian_log_likelihood(t(2, 3), t(2, 3), backend="numba"), ValueError,
     "backend must be one of"),
    (lambda: F.gaussian_log_likelihood(t(2, 3).to("meta"), t(2, 3).to("meta"), backend="cpp"),
     ValueError, "backend='cpp' takes CPU tensors"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


NAN_CASES = [
    ("mu", lambda bad: F.reparameterize(bad, t(2, 3), validate=True)),
    ("logvar", lambda bad: F.reparameterize(t(2, 3), bad, t(2, 3), validate=True)),
    ("eps", lambda bad: F.reparameterize(t(2, 3), t(2, 3), bad, validate=True)),
    ("mean", lambda bad: F.gaussian_log_likelihood(t(2, 3), bad, validate=True)),
    ("logits", lambda bad: F.bernoulli_log_likelihood(t(2, 3), bad, validate=True)),
    ("log_px_given_z", lambda bad: F.iwae_bound(bad[1:, 1:], t(2, 3), t(2, 3), t(1, 2, 3),
                                                validate=True)),
]


@pytest.mark.parametrize("name,call", NAN_CASES)
@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_validate_names_the_argument_with_nan_or_inf(name, call, value, word):
    bad = t(2, 3)
    bad[1, 2] = value
    with pytest.raises(ValueError, match=f"{name} contains {word}"):
        call(bad)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nan_propagates_without_validate(backend):
    x, mean, lv = t(3, 4), t(3, 4), t(3, 4)
    mean[1, 2] = float("nan")
    ll = F.gaussian_log_likelihood(x, mean, lv, backend=backend)
    assert torch.isnan(ll[1]) and torch.isfinite(ll[[0, 2]]).all()
    logits = t(3, 4)
    logits[0, 0] = float("nan")
    ll = F.bernoulli_log_likelihood(x.sigmoid(), logits, backend=backend)
    assert torch.isnan(ll[0]) and torch.isfinite(ll[1:]).all()
    mu, lvz = t(3, 2), t(3, 2)
    lvz[2, 1] = float("nan")
    z, kl = F.reparameterize(mu, lvz, t(3, 2), backend=backend)
    assert torch.isnan(kl[2]) and torch.isnan(z[2, 1]) and torch.isfinite(kl[:2]).all()
    lpx = t(5, 3)
    lpx[4, 1] = float("nan")
    bound = F.iwae_bound(lpx, mu, t(3, 2), t(5, 3, 2), backend=backend)
    assert torch.isnan(bound[1]) and torch.isfinite(bound[[0, 2]]).all()


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    with pytest.raises(ImportError, match=r"pip install fastlvm\[triton\]"):
        F.gaussian_log_likelihood(t(2, 3), t(2, 3), backend="triton")
