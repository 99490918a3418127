"""fastlvm.VAE against oracles no one here wrote: probabilistic PCA's closed-form maximum-likelihood
solution (the global optimum of a linear VAE), a plain PyTorch VAE written here from
torch.distributions, and torch.distributions' densities for every objective and likelihood."""

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from torch.distributions import Bernoulli, Normal

import fastlvm
import fastlvm.functional as F
from fastlvm.functional import row_noise
from fastlvm.reference.vae import philox4x32_10
from fastlvm.vae.model import RowNoise, VAEModule, mlp


def _ppca_data(N=2000, D=8, q=2, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, q)) * np.array([3.0, 1.5])[:q]
    X = rng.normal(size=(N, q)) @ W.T + rng.normal(size=D) + 0.5 * rng.normal(size=(N, D))
    return X


def _ppca_mle(X, q):
    """Tipping & Bishop (1999): the MLE's log-likelihood per row, its noise variance and subspace."""
    N, D = X.shape
    lam, U = np.linalg.eigh(np.cov(X.T, bias=True))
    lam, U = lam[::-1], U[:, ::-1]
    s2 = lam[q:].mean()
    loglik = -0.5 * (D * math.log(2 * math.pi) + np.log(lam[:q]).sum() + (D - q) * math.log(s2) + D)
    return loglik, s2, U[:, :q]


def _same_state(a, b):
    sa, sb = a.model_.state_dict(), b.model_.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------- oracles


def test_linear_vae_reaches_the_ppca_maximum_likelihood():
    # Lucas et al. (2019): with linear encoder and decoder, Gaussian likelihood and one shared
    # variance, the ELBO's global optimum is pPCA's MLE, where the ELBO is tight.
    q = 2
    X = _ppca_data(q=q)
    loglik, s2, U = _ppca_mle(X, q)
    vae = fastlvm.VAE(q, hidden=(), likelihood="gaussian", decoder_variance="shared", dtype="float64", lr=3e-2,
                      max_epochs=150, batch_size=100, validation_fraction=0.0, early_stopping=False,
                      random_state=0).fit(X)
    score = vae.score(X, n_samples=500)
    assert abs(score - loglik) < 0.1, (score, loglik)  # ~1% of |log p(x)|; the start is 30 nats away
    assert score < loglik + 0.02  # nothing beats the MLE (up to the estimator's noise)
    assert abs(math.exp(vae.model_.logvar.item()) / s2 - 1) < 0.15
    W = vae.model_.decoder[0].weight.detach().numpy()  # (D, q): the decoder spans the principal subspace
    cosines = np.linalg.svd(np.linalg.qr(W)[0].T @ U, compute_uv=False)
    assert cosines.min() > 0.999, cosines
    assert vae.elbo(X, n_samples=4).mean() > loglik - 0.3  # the bound is nearly tight there


class _PlainVAE(torch.nn.Module):
    """The same architecture written independently: torch.distributions for every density."""

    def __init__(self, D, Dz, H):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, 2 * Dz))
        self.dec = torch.nn.Sequential(torch.nn.Linear(Dz, H), torch.nn.ReLU(), torch.nn.Linear(H, D))
        self.Dz = Dz

    def q(self, x):
        h = self.enc(x)
        return Normal(h[:, : self.Dz], torch.exp(0.5 * h[:, self.Dz :]))

    def loss(self, x):
        q = self.q(x)
        z = q.rsample()
        prior = Normal(torch.zeros_like(z), torch.ones_like(z))
        log_px = Bernoulli(logits=self.dec(z), validate_args=False).log_prob(x).sum(-1)
        kl = torch.distributions.kl_divergence(q, prior).sum(-1)
        return (kl - log_px).mean()

    @torch.no_grad()
    def log_px(self, x, S):
        q = self.q(x)
        z = q.sample((S,))
        prior = Normal(torch.zeros_like(z), torch.ones_like(z))
        log_w = (Bernoulli(logits=self.dec(z), validate_args=False).log_prob(x).sum(-1) + prior.log_prob(z).sum(-1)
                 - q.log_prob(z).sum(-1))
        return torch.logsumexp(log_w, 0) - math.log(S)


def _plain_fit(X, Dz, H, epochs, batch, lr, seed):
    torch.manual_seed(seed)
    model = _PlainVAE(X.shape[1], Dz, H)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=batch, shuffle=True)
    for _ in range(epochs):
        for (xb,) in data:
            loss = model.loss(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_digits_heldout_loglik_equals_a_plain_pytorch_vae():
    X = (load_digits().data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(X.shape[0])
    test, train = X[order[:300]], X[order[300:]]
    Dz, H, epochs, batch, lr, S = 8, 128, 20, 64, 3e-3, 200
    ours, theirs = [], []
    for seed in range(3):
        vae = fastlvm.VAE(Dz, hidden=(H,), batch_size=batch, max_epochs=epochs, lr=lr, validation_fraction=0.0,
                          early_stopping=False, random_state=seed).fit(train)
        ours.append(vae.score(test, n_samples=S))
        plain = _plain_fit(torch.from_numpy(train), Dz, H, epochs, batch, lr, seed)
        theirs.append(float(plain.log_px(torch.from_numpy(test), S).mean()))
    ours, theirs = np.array(ours), np.array(theirs)
    noise = max(ours.std(ddof=1), theirs.std(ddof=1), 0.15)
    assert abs(ours.mean() - theirs.mean()) < 3 * noise, (ours, theirs)
    assert np.all(ours > -40) and np.all(theirs > -40)  # both learned (an untrained model gives ~ -44)


# ---------------------------------------------------------------------- objectives vs torch.distributions


def _module(likelihood, variance, objective="elbo", D=5, Dz=3, seed=0):
    torch.manual_seed(seed)
    width = 2 * D if variance == "output" and likelihood == "gaussian" else D
    m = VAEModule(mlp((D, 7, 2 * Dz)), mlp((Dz, 7, width)), D, Dz, likelihood, variance, objective).double()
    if m.logvar is not None and isinstance(m.logvar, torch.nn.Parameter):
        with torch.no_grad():
            m.logvar.copy_(0.3 * torch.randn(m.logvar.shape, dtype=torch.float64))
    return m


def _log_px_reference(m, x, out):
    D = m.n_features
    if m.likelihood == "bernoulli":
        return Bernoulli(logits=out, validate_args=False).log_prob(x).sum(-1)
    if m.decoder_variance == "output":
        mean, logvar = out[..., :D], out[..., D:]
    else:
        mean, logvar = out, m.logvar.expand(D)
    return Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(-1)


@pytest.mark.parametrize("likelihood,variance", [("bernoulli", None), ("gaussian", "feature"),
                                                 ("gaussian", "shared"), ("gaussian", "output"),
                                                 ("gaussian", 0.3)])
@pytest.mark.parametrize("L", [1, 3])
def test_elbo_loss_is_the_torch_distributions_elbo(likelihood, variance, L):
    m = _module(likelihood, variance)
    x = torch.rand(6, 5, dtype=torch.float64)
    noise = RowNoise(1, 0, np.arange(10, 16), L)
    eps = noise.eps(3, torch.float64, "cpu")
    beta = 0.7
    loss, stats = m(x, noise, beta, 0.0, 1.0)
    h = m.encoder(x)
    q = Normal(h[:, :3], torch.exp(0.5 * h[:, 3:]))
    z = q.mean + q.stddev * eps
    log_px = _log_px_reference(m, x, m.decoder(z))
    kl = torch.distributions.kl_divergence(q, Normal(torch.zeros_like(q.mean), 1.0)).sum(-1)
    want = (beta * kl - log_px.mean(0)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats, torch.stack([want * 6, -log_px.mean(0).sum(), kl.sum()]), rtol=1e-10,
                               atol=1e-10)
    loss.backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    want.backward()
    for g, w in zip(got, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_iwae_loss_is_the_importance_weighted_bound():
    m = _module("bernoulli", None, objective="iwae")
    x = torch.rand(6, 5, dtype=torch.float64)
    noise = RowNoise(2, 5, np.arange(6), 4)
    eps = noise.eps(3, torch.float64, "cpu")
    loss, _ = m(x, noise, 1.0, 0.0, 1.0)
    h = m.encoder(x)
    q = Normal(h[:, :3], torch.exp(0.5 * h[:, 3:]))
    z = q.mean + q.stddev * eps
    log_w = (Bernoulli(logits=m.decoder(z), validate_args=False).log_prob(x).sum(-1)
             + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
    want = -(torch.logsumexp(log_w, 0) - math.log(4)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


def test_free_bits_floor_each_dimension_of_the_batch_kl():
    m = _module("bernoulli", None)
    x = torch.rand(8, 5, dtype=torch.float64)
    noise = RowNoise(3, 0, np.arange(8), 1)
    eps = noise.eps(3, torch.float64, "cpu")
    h = m.encoder(x)
    q = Normal(h[:, :3], torch.exp(0.5 * h[:, 3:]))
    kl_dims = torch.distributions.kl_divergence(q, Normal(torch.zeros_like(q.mean), 1.0)).mean(0)
    lam = float(kl_dims.detach().sort().values[1])  # one dimension below the floor, one at it, one above
    lam = lam + 1e-6
    beta = 2.0
    loss, _ = m(x, noise, beta, lam, 1.0)
    log_px = Bernoulli(logits=m.decoder(q.mean + q.stddev * eps[0]), validate_args=False).log_prob(x).sum(-1)
    want = beta * torch.clamp(kl_dims, min=lam).sum() - log_px.mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


def test_kl_warmup_raises_beta_linearly_over_the_given_epochs():
    X = (load_digits().data[:600] / 16.0).astype(np.float32)
    vae = fastlvm.VAE(4, hidden=(32,), batch_size=100, max_epochs=5, kl_warmup=4, beta=0.5,
                      validation_fraction=0.0, early_stopping=False, random_state=0).fit(X)
    betas = [e["beta"] for e in vae.history_]  # beta at each epoch's last step (6 steps per epoch)
    np.testing.assert_allclose(betas, [0.5 * min(1.0, 6 * k / 24) for k in range(1, 6)])


# ---------------------------------------------------------------------- noise and bounds


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_row_noise_is_philox_keyed_by_seed_step_and_row(backend):
    # Computed independently with the reference Philox on the documented counter (p, t, row).
    seed, step, rows, S, Dz = 2**40 + 7, 12, torch.tensor([3, 2**33 + 5, 0]), 2, 5

    def row_noise_of(rows, S, **kw):
        return row_noise(rows, S, Dz, seed=seed, dtype=torch.float64, backend=backend, **kw)

    got = row_noise_of(rows, S, step=step)
    e = torch.arange(S * Dz)
    P = (e >> 1)[None].expand(len(rows), -1)
    R = torch.as_tensor(rows)[:, None].expand_as(P)
    w0, w1, w2, w3 = philox4x32_10((P, torch.full_like(P, step), R & 0xFFFFFFFF, R >> 32),
                                   (seed & 0xFFFFFFFF, seed >> 32))
    u1 = 1.0 - ((w0 << 20) | (w1 >> 12)).double() * 2.0**-52
    u2 = ((w2 << 20) | (w3 >> 12)).double() * 2.0**-52
    r, th = torch.sqrt(-2 * torch.log(u1)), 2 * math.pi * u2
    want = torch.where(e % 2 == 0, r * torch.cos(th), r * torch.sin(th)).reshape(len(rows), S, Dz).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=4e-15, atol=4e-15)
    # a row's numbers do not depend on its batch, its place in it, or how samples are blocked
    alone = row_noise_of(rows[1:2], S, step=step)
    assert torch.equal(alone[:, 0], got[:, 1])
    assert torch.equal(row_noise_of(rows, 1, step=step, first_sample=1)[0], got[1])
    assert not torch.equal(row_noise_of(rows, S, step=step + 1), got)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_in_kernel_row_noise_is_the_row_streams(backend):
    # reparameterize(rows=...) draws each row's own stream inside the kernel: the same z as the
    # materialised noise, whatever the order of the rows in the batch; gradients as for given eps.
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    lv = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rows, perm = torch.tensor([7, 2**35 + 1, 0, 4, 9, 3]), torch.tensor([3, 0, 5, 1, 4, 2])
    z, kl = F.reparameterize(mu, lv, n_samples=3, seed=11, rows=rows, step=4, backend=backend)
    eps = row_noise(rows, 3, 5, seed=11, step=4, dtype=torch.float64, backend=backend)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, rtol=1e-14, atol=1e-14)
    zp, _ = F.reparameterize(mu[perm], lv[perm], n_samples=3, seed=11, rows=rows[perm], step=4, backend=backend)
    torch.testing.assert_close(zp, z[:, perm], rtol=1e-14, atol=1e-14)
    w = torch.randn(z.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((z * w).sum() + kl.sum(), (mu, lv))
    want = torch.autograd.grad(((mu + torch.exp(0.5 * lv) * eps) * w).sum()
                               + 0.5 * (lv.exp() + mu * mu - 1 - lv).sum(), (mu, lv))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def digits_vae():
    X = (load_digits().data / 16.0).astype(np.float32)
    vae = fastlvm.VAE(4, hidden=(64,), batch_size=100, max_epochs=8, lr=3e-3, random_state=0).fit(X)
    return vae, X


def test_bounds_are_ordered_and_blocking_does_not_change_them(digits_vae):
    vae, X = digits_vae
    x = X[:40]
    elbo = vae.elbo(x, n_samples=64)
    iwae = vae.score_samples(x, n_samples=64)
    assert iwae.mean() > elbo.mean() + 0.05  # Jensen: the importance-weighted bound is the tighter
    small = vae.score_samples(x, n_samples=64, max_bytes=20_000)  # blocks of rows and of samples
    np.testing.assert_allclose(small, iwae, rtol=1e-5)
    more = vae.score_samples(x, n_samples=1000)
    assert more.mean() > iwae.mean() - 0.05  # the bound rises with the number of samples
    assert vae.score(x, n_samples=64) == pytest.approx(float(iwae.mean()), rel=1e-6)


def test_outputs_follow_the_input_kind(digits_vae):
    vae, X = digits_vae
    t = torch.from_numpy(X[:7])
    for fn in (vae.transform, vae.reconstruct, vae.elbo, vae.score_samples):
        a, b = fn(X[:7]), fn(t)
        assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6)
    mu, logvar = vae.encode(X[:7])
    assert mu.shape == logvar.shape == (7, 4)
    np.testing.assert_allclose(mu, vae.transform(X[:7]))
    np.testing.assert_allclose(vae.decode(mu), vae.reconstruct(X[:7]), rtol=1e-6)
    s = vae.sample(5, random_state=1)
    assert s.shape == (5, 64) and np.all((s >= 0) & (s <= 1))
    np.testing.assert_array_equal(s, vae.sample(5, random_state=1))


def test_fitted_attributes(digits_vae):
    vae, X = digits_vae
    assert vae.n_features_in_ == 64 and vae.n_epochs_ == len(vae.history_) == 8
    assert 1 <= vae.best_epoch_ <= 8
    for key in ("loss", "reconstruction", "kl", "val_loss", "val_reconstruction", "val_kl", "seconds",
                "rows_per_s"):
        assert all(np.isfinite(e[key]) for e in vae.history_), key
    first, last = vae.history_[0], vae.history_[-1]
    assert last["loss"] < first["loss"] and last["val_loss"] < first["val_loss"]
    assert first["loss"] == pytest.approx(first["reconstruction"] + first["kl"])
    assert vae.kl_per_dim_.shape == (4,) and np.all(vae.kl_per_dim_ >= 0)
    # Burda et al.'s count is the number of dimensions whose posterior means vary over the data
    mu = vae.transform(X)
    assert vae.active_units(X) == int((mu.var(0) > 0.01).sum())
    assert vae.active_units(X, threshold=0.0) == 4


# ---------------------------------------------------------------------- estimator conventions


def test_same_seed_same_model_bitwise_other_seed_differs():
    X = (load_digits().data[:500] / 16.0).astype(np.float32)
    kw = dict(hidden=(32,), batch_size=50, max_epochs=3, n_samples=2)
    a = fastlvm.VAE(4, random_state=3, **kw).fit(X)
    b = fastlvm.VAE(4, random_state=3, **kw).fit(X)
    c = fastlvm.VAE(4, random_state=4, **kw).fit(X)
    assert _same_state(a, b) and not _same_state(a, c)
    assert a.history_[-1]["loss"] == b.history_[-1]["loss"]


def test_torch_backend_gives_the_same_model():
    X = (load_digits().data[:400] / 16.0)
    kw = dict(hidden=(16,), batch_size=40, max_epochs=2, dtype="float64", random_state=0)
    for objective in ("elbo", "iwae"):
        a = fastlvm.VAE(3, objective=objective, n_samples=2, **kw).fit(X)
        b = fastlvm.VAE(3, objective=objective, n_samples=2, backend="torch", **kw).fit(X)
        for k, v in a.model_.state_dict().items():
            torch.testing.assert_close(v, b.model_.state_dict()[k], rtol=1e-9, atol=1e-11)


def test_get_params_clone_and_pickle(digits_vae):
    vae, X = digits_vae
    params = vae.get_params()
    assert params["latent_dim"] == 4 and params["hidden"] == (64,) and params["encoder"] is None
    c = clone(vae)
    assert c.get_params() == params and not hasattr(c, "model_")
    c.set_params(latent_dim=2, beta=0.5)
    assert (c.latent_dim, c.beta, vae.latent_dim) == (2, 0.5, 4)
    enc = mlp((64, 8))
    d = clone(fastlvm.VAE(4, encoder=enc))
    assert isinstance(d.encoder, torch.nn.Module) and d.encoder is not enc
    back = pickle.loads(pickle.dumps(vae))
    np.testing.assert_array_equal(back.transform(X[:5]), vae.transform(X[:5]))
    np.testing.assert_array_equal(back.score_samples(X[:5], n_samples=10), vae.score_samples(X[:5], n_samples=10))


def test_user_modules_replace_the_mlps_and_are_not_trained_in_place():
    X = (load_digits().data[:300] / 16.0).astype(np.float32)
    enc = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    dec = torch.nn.Sequential(torch.nn.Linear(3, 64))
    before = [p.detach().clone() for p in enc.parameters()]
    vae = fastlvm.VAE(3, encoder=enc, decoder=dec, batch_size=30, max_epochs=2, random_state=0).fit(X)
    assert isinstance(vae.model_.encoder[1], torch.nn.Tanh)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    assert not torch.equal(vae.model_.encoder[0].weight, enc[0].weight)


def test_early_stopping_keeps_the_best_epoch():
    X = (load_digits().data[:400] / 16.0).astype(np.float32)
    vae = fastlvm.VAE(4, hidden=(128,), batch_size=20, max_epochs=60, lr=1e-2, n_iter_no_change=3,
                      random_state=0).fit(X)
    val = [e["val_loss"] for e in vae.history_]
    assert vae.n_epochs_ < 60 and vae.n_epochs_ == vae.best_epoch_ + 3
    assert val[vae.best_epoch_ - 1] == min(val)


def test_verbose_prints_one_line_per_epoch_and_a_bar(capsys):
    X = (load_digits().data[:300] / 16.0).astype(np.float32)
    fastlvm.VAE(2, hidden=(8,), batch_size=50, max_epochs=3, verbose=1, random_state=0).fit(X)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 3 and "rows/s" in lines[0] and "KL" in lines[0] and "validation" in lines[0]
    fastlvm.VAE(2, hidden=(8,), batch_size=50, max_epochs=2, verbose=2, random_state=0).fit(X)
    err = capsys.readouterr().err
    assert "VAE" in err and "batch" in err and "epoch 2" in err


def test_import_fastlvm_does_not_import_torch_until_vae_is_asked_for():
    import subprocess
    import sys

    code = ("import sys, fastlvm; assert 'torch' not in sys.modules; "
            "assert 'VAE' in fastlvm.__all__ and fastlvm.VAE.__name__ == 'VAE'; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
