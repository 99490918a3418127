"""fastlvm.VAE's InfoVAE regularisers (Zhao et al., 2017): the objective's value against the terms
computed here, the collapse a plain VAE suffers and InfoVAE avoids, and the parameter rules."""

import numpy as np
import pytest
import torch

import fastlvm
import fastlvm.functional as F
from fastlvm.vae.model import RowNoise, VAEModule, mlp


def _module(kl_weight, mmd_weight):
    torch.manual_seed(0)
    return VAEModule(mlp((5, 8, 6)), mlp((3, 8, 5)), 5, 3, "gaussian", "feature", kl_weight=kl_weight,
                     mmd_weight=mmd_weight).double()


def test_the_loss_is_zhao_et_al_objective():
    """-[E log p(x|z) - (1 - alpha) KL - (alpha + lambda - 1) MMD] with alpha = 0.3, lambda = 2, from
    the module's own pieces and the MMD of the same samples against the same prior draws."""
    alpha, lam = 0.3, 2.0
    module = _module(1 - alpha, alpha + lam - 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    noise = RowNoise(3, 0, np.arange(40), 1)
    eps = noise.eps(3, torch.float64, "cpu")
    torch.manual_seed(7)  # the MMD's prior draws come from the global generator
    loss, stats = module(x, noise, 1.0, 0.0, 1.0)
    with torch.no_grad():
        mu, logvar = module.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps[0]
        recon = module.log_px_given_z(x, module.decoder(z)).mean()
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
        torch.manual_seed(7)
        mmd = F.mmd(z, backend="torch")
    expect = -(recon - (1 - alpha) * kl - (alpha + lam - 1) * mmd)
    assert float(loss) == pytest.approx(float(expect), rel=1e-10)
    assert float(mmd) != 0.0


def _independent_gaussian_features(n=1000, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + 1.0


def test_infovae_does_not_collapse_where_the_vae_does():
    """A decoder that explains the data without z: a Gaussian likelihood whose fixed variance (4)
    exceeds every direction's variance in the data (independent unit-variance features). Then the
    ELBO's optimum ignores z (probabilistic PCA keeps no direction whose variance is below the
    noise): the beta = 1 VAE collapses, every unit inactive. With alpha = 1 (no KL) the MMD only
    asks the aggregate posterior to look like N(0, I), which an informative encoding satisfies,
    and reconstruction pays for using z: units stay active."""
    X = _independent_gaussian_features()
    common = dict(hidden=(), likelihood="gaussian", decoder_variance=4.0, lr=1e-2, batch_size=100, max_epochs=20,
                  validation_fraction=0.0, early_stopping=False, random_state=0)
    vae = fastlvm.VAE(2, **common).fit(X)
    info = fastlvm.VAE(2, regularizer="kl+mmd", alpha=1.0, lambda_=20.0, **common).fit(X)
    assert vae.active_units(X) == 0
    assert info.active_units(X) == 2
    # the encodings' aggregate stays near the prior: their MMD to N(0, I) is far below a shifted one's
    mu = torch.from_numpy(info.transform(X)[:500])
    g = torch.Generator().manual_seed(0)
    assert float(F.mmd(mu, generator=g)) < 0.2 * float(F.mmd(mu + 2.0, generator=g))


def test_regularizer_mmd_is_alpha_one_and_parameters_are_checked():
    X = _independent_gaussian_features(300, 4)
    a = fastlvm.VAE(2, hidden=(), likelihood="gaussian", max_epochs=2, regularizer="mmd", lambda_=5.0,
                    random_state=1).fit(X)
    b = fastlvm.VAE(2, hidden=(), likelihood="gaussian", max_epochs=2, regularizer="kl+mmd", alpha=1.0,
                    lambda_=5.0, random_state=1).fit(X)
    assert a.history_[-1]["loss"] == b.history_[-1]["loss"]
    for params, match in [({"regularizer": "wasserstein"}, "regularizer must be one of"),
                          ({"alpha": 0.5}, "regularizer='kl' takes neither"),
                          ({"regularizer": "kl+mmd", "alpha": 0.2, "lambda_": 0.5}, "must be >= 0"),
                          ({"regularizer": "mmd", "alpha": 0.5}, "alpha = 1"),
                          ({"regularizer": "kl+mmd", "alpha": 1.5}, "alpha must be <= 1"),
                          ({"regularizer": "mmd", "objective": "iwae"}, "objective='iwae'")]:
        with pytest.raises(ValueError, match=match):
            fastlvm.VAE(2, **params).fit(X)


def test_save_load_and_checkpoint_keep_the_regularizer(tmp_path):
    X = _independent_gaussian_features(300, 4)
    vae = fastlvm.VAE(2, hidden=(8,), likelihood="gaussian", max_epochs=2, regularizer="kl+mmd", alpha=0.5,
                      lambda_=3.0, random_state=2, checkpoint=tmp_path / "c.npz").fit(X)
    vae.save(tmp_path / "m.npz")
    back = fastlvm.VAE.load(tmp_path / "m.npz")
    assert (back.regularizer, back.alpha, back.lambda_) == ("kl+mmd", 0.5, 3.0)
    np.testing.assert_array_equal(back.transform(X), vae.transform(X))
    with pytest.raises(ValueError, match="different model"):
        fastlvm.VAE(2, hidden=(8,), likelihood="gaussian", max_epochs=2, random_state=2,
                    checkpoint=tmp_path / "c.npz").fit(X)
