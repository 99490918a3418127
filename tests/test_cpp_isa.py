"""The C++ kernels on every ISA clone this CPU runs (generic, avx2, avx512), and the FASTLVM_ISA
override.

Agreement rule: every output of every kernel (values, gradients, weights, noise) on a clone
equals the generic clone's within 16 units in the last place of the output's scale,
|a - b| <= 16 eps max(|b|, mean |b|). Not bitwise: the avx2 and avx512 clones contract
a * b + c into one FMA (rounded once) where the generic clone rounds twice, and the sums
over a row are split over as many lanes as the vector holds, so the order of the additions
differs; both move a result by an ulp or two per operation, never more than a few over the
short chains here. The importance weights w = exp(log w - logsumexp) and everything
computed from them are the exception: an ulp of a log-weight of magnitude |log w| ~ 90 is
|log w| ulps of w, so there the bound is 16 eps max|log w| relative (100 here). MMD's sums run
over all pairs (its gradient is a_i sum_j w_ij - sum_j w_ij b_j, chains of ~B terms), so there
the bound is 4 x 16 eps. Each clone is also checked against the float64 reference, so that
clones cannot agree on a wrong answer.
"""

import os
import subprocess
import sys

import pytest
import torch

from fastlvm import _C
from fastlvm.kernels import cpp
from fastlvm.reference import vae as ref

CLONES = ["generic", "avx2", "avx512"]
ULPS = 16
MMD_CHAIN = 4  # MMD sums run over every pair: chains ~B long, not a few operations
DTYPES = [torch.float32, torch.float64]


def _skip_reason(isa):
    if isa not in _C.isa_compiled():
        return f"the {isa} clone is not compiled into this build"
    if isa not in _C.isa_supported():
        return f"this CPU cannot run the {isa} clone (no {'AVX2/FMA' if isa == 'avx2' else 'AVX-512'})"
    return None


def clone_param(isa):
    reason = _skip_reason(isa)
    return pytest.param(isa, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


class on_clone:
    """Run the kernels on clone `isa` inside the block (the in-process selector)."""

    def __init__(self, isa):
        self.isa = isa

    def __enter__(self):
        self.before = _C.isa()
        _C.set_isa(self.isa)

    def __exit__(self, *exc):
        _C.set_isa(self.before)


def randn(*shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, dtype=torch.float64, generator=g)).to(dtype)


def every_kernel(dtype, S=3, B=37, D=45, Dx=133):
    """{name: tensor} from every kernel entry point, on awkward shapes: D and Dx are not
    multiples of any vector width; periodic operands (x against S samples, a single-row
    logvar); logits large enough to take both branches of the softplus."""
    mu, lv = randn(B, D, dtype=dtype, seed=1), randn(B, D, dtype=dtype, seed=2, scale=0.7)
    eps, gz = randn(S, B, D, dtype=dtype, seed=3), randn(S, B, D, dtype=dtype, seed=4)
    gkl = randn(B, dtype=dtype, seed=5)
    x = torch.rand(B, Dx, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(dtype)
    mean = randn(S * B, Dx, dtype=dtype, seed=7)
    lvx = randn(S * B, Dx, dtype=dtype, seed=8, scale=0.5)
    lvx1 = randn(1, Dx, dtype=dtype, seed=9, scale=0.5)
    logits = randn(S * B, Dx, dtype=dtype, seed=10, scale=12.0)
    g_rows = randn(S * B, dtype=dtype, seed=11)
    lpx = randn(S, B, dtype=dtype, seed=12, scale=3.0, shift=-90.0)
    g_bound = randn(B, dtype=dtype, seed=13)
    xs = x.repeat(S, 1)  # one row per output row, for the forward-gradient kernels

    out = {}
    out["z"], out["kl"] = cpp.reparam_fwd(mu, lv, eps)
    out["grad_mu"], out["grad_lv"] = cpp.reparam_bwd(mu, lv, eps, gz, gkl)
    out["z_noise"], out["kl_noise"] = cpp.reparam_noise_fwd(mu, lv, S, 1234)
    out["grad_mu_noise"], out["grad_lv_noise"] = cpp.reparam_noise_bwd(mu, lv, S, 1234, gz, gkl)
    out["noise"] = cpp.normal_noise(S, B, D, 99, dtype=dtype)
    out["gauss"] = cpp.gaussian_ll_fwd(x, mean, lvx1)
    for name, t in zip(("gauss_fg", "gauss_fg_x", "gauss_fg_mean", "gauss_fg_lv"),
                       cpp.gaussian_ll_fwd_grad(xs, mean, lvx, need=(True, True, True),
                                                scale=-0.25)):
        out[name] = t
    o, _, g_mean, g_lv = cpp.gaussian_ll_fwd_grad(xs, mean, lvx1, need=(False, True, True),
                                                  scale=-0.25)
    out["gauss_fg1"], out["gauss_fg1_mean"], out["gauss_fg1_lv"] = o, g_mean, g_lv
    for name, t in zip(("gauss_bwd_x", "gauss_bwd_mean", "gauss_bwd_lv"),
                       cpp.gaussian_ll_bwd(x, mean, lvx1, g_rows)):
        out[name] = t
    out["bern"] = cpp.bernoulli_ll_fwd(x, logits)
    for name, t in zip(("bern_fg", "bern_fg_x", "bern_fg_logits"),
                       cpp.bernoulli_ll_fwd_grad(xs, logits, need=(True, True))):
        out[name] = t
    for name, t in zip(("bern_bwd_x", "bern_bwd_logits"), cpp.bernoulli_ll_bwd(x, logits, g_rows)):
        out[name] = t
    out["iwae"], out["iwae_w"] = cpp.iwae_fwd(lpx, mu, lv, eps)
    for name, t in zip(("iwae_fg", "iwae_fg_w", "iwae_fg_mu", "iwae_fg_lv"),
                       cpp.iwae_fwd_grad(lpx, mu, lv, eps)):
        out[name] = t
    for name, t in zip(("iwae_bwd_lpx", "iwae_bwd_mu", "iwae_bwd_lv"),
                       cpp.iwae_bwd(lpx, mu, lv, eps, out["iwae_w"], g_bound)):
        out[name] = t
    # MMD: x and y shifted apart (a value far from 0, not a cancellation), rows not a multiple of the
    # row blocking, D not a multiple of the register chunk
    ya = randn(B + 4, D, dtype=dtype, seed=14, scale=1.3, shift=0.5)
    for kernel, c in (("imq", 2.0 * D), ("rbf", 3.0 * D)):
        for name, t in zip(("", "_gx", "_gy"), cpp.mmd_fwd_grad(mu, ya, kernel, c, need=(True, True))):
            out[f"mmd_{kernel}{name}"] = t
    refs = {"z": ref.reparameterize(mu.double(), lv.double(), eps.double()),
            "kl": ref.kl_standard_normal(mu.double(), lv.double()),
            "noise": ref.normal_noise(S, B, D, 99, torch.float64),
            "gauss": ref.gaussian_log_likelihood(x.double().repeat(S, 1), mean.double(),
                                                 lvx1.double()),
            "bern": ref.bernoulli_log_likelihood(x.double().repeat(S, 1), logits.double()),
            "iwae": ref.iwae_bound(lpx.double(), mu.double(), lv.double(), eps.double()),
            "mmd_imq": ref.mmd(mu.double(), ya.double(), "imq", 2.0 * D),
            "mmd_rbf": ref.mmd(mu.double(), ya.double(), "rbf", 3.0 * D)}
    return out, refs


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "float64"])
def generic_outputs(request):
    with on_clone("generic"):
        return request.param, every_kernel(request.param)[0]


def ulp_distance(got, want):
    """max |got - want| in units of eps times the output's scale."""
    eps = torch.finfo(want.dtype).eps
    got, want = got.double(), want.double()
    scale = torch.maximum(want.abs(), want.abs().mean().expand_as(want)).clamp_min(1e-300)
    return ((got - want).abs() / scale).max().item() / eps


@pytest.mark.parametrize("isa", [clone_param(c) for c in CLONES])
def test_clone_matches_generic_and_reference(isa, generic_outputs):
    dtype, base = generic_outputs
    with on_clone(isa):
        assert _C.isa() == isa
        got, refs = every_kernel(dtype)
    assert got.keys() == base.keys()
    # exp amplifies the ulps of the log-weights (see the module docstring)
    log_w_scale = 100.0  # |log w| for log p(x|z) = -90 +- 3 sigma
    allowed = {name: ULPS * (log_w_scale if name.startswith("iwae_") and name != "iwae_fg"
                             else MMD_CHAIN if name.startswith("mmd_") else 1.0) for name in got}
    far = {name: ulp_distance(got[name], base[name]) for name in got}
    assert all(far[k] <= allowed[k] for k in far), \
        {k: round(v, 1) for k, v in far.items() if v > allowed[k]}
    for name, want in refs.items():
        assert not torch.isnan(got[name]).any(), name
        err = ((got[name].double() - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-12), (name, err)


def test_clones_really_differ_in_code():
    """The clones are distinct code: on a CPU with AVX2 the avx2 clone's float32 results are
    not all bitwise equal to the generic clone's (FMA contraction shows), so the test above
    compares two paths, not one path twice."""
    if _skip_reason("avx2"):
        pytest.skip(_skip_reason("avx2"))
    with on_clone("generic"):
        a, _ = every_kernel(torch.float32)
    with on_clone("avx2"):
        b, _ = every_kernel(torch.float32)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_set_isa_rejects_unknown_and_unsupported():
    with pytest.raises(ValueError, match="unknown ISA 'avx3'"):
        _C.set_isa("avx3")
    missing = [c for c in CLONES if _skip_reason(c)]
    if not missing:
        pytest.skip("this CPU runs every clone")
    before = _C.isa()
    with pytest.raises(ValueError, match=f"cannot use the {missing[-1]} clone"):
        _C.set_isa(missing[-1])
    assert _C.isa() == before


def _isa_in_subprocess(value, module="fastlvm._C"):
    env = dict(os.environ, FASTLVM_ISA=value)
    code = ("import warnings; warnings.simplefilter('always')\n"
            f"import {module}; from fastlvm import _C; print(_C.isa())")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_environment_variable_selects_the_clone():
    run = _isa_in_subprocess("generic")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "generic"
    assert "RuntimeWarning" not in run.stderr


def test_environment_variable_unsupported_warns_and_falls_back():
    missing = [c for c in CLONES if _skip_reason(c)]
    if not missing:
        pytest.skip("this CPU runs every clone")
    run = _isa_in_subprocess(missing[-1])
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" in run.stderr and f"FASTLVM_ISA={missing[-1]} cannot be used" in run.stderr
    assert run.stdout.split()[-1] == _C.isa_supported()[-1]  # the best clone instead


def test_environment_variable_typo_fails_the_import():
    run = _isa_in_subprocess("avx-2", module="fastlvm.kernels.cpp")
    assert run.returncode != 0
    assert "ImportError: FASTLVM_ISA: unknown ISA 'avx-2': expected generic, avx2 or avx512" \
        in run.stderr
