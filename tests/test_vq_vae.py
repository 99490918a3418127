"""fastlvm.VQVAE: codes on clustered data (against the true clusters, scikit-learn's adjusted Rand
index), dead-code re-seeding, the estimator conventions (save/load, checkpoints, clone, inputs) and
its parameter checks."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score, homogeneity_score

import fastlvm


def _clusters(n=500, d=10, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 4.0
    labels = rng.integers(0, k, size=n)
    return centres[labels] + 0.3 * rng.normal(size=(n, d)), labels


def _vq(**kw):
    params = dict(codebook_size=4, code_dim=2, codes_per_row=1, hidden=(32,), likelihood="gaussian", lr=3e-3,
                  batch_size=64, max_epochs=10, validation_fraction=0.0, early_stopping=False, ema_decay=0.9,
                  random_state=0)
    params.update(kw)
    return fastlvm.VQVAE(**params)


def test_codes_follow_well_separated_clusters():
    X, labels = _clusters()
    vq = _vq().fit(X)
    codes = vq.transform(X)
    assert codes.shape == (X.shape[0], 1) and codes.dtype == np.int64
    assert adjusted_rand_score(labels, codes[:, 0]) > 0.95  # one code per cluster, all four codes used
    assert len(np.unique(codes)) == 4
    assert vq.perplexity(X) == pytest.approx(np.exp(-(np.bincount(labels) / len(labels) *
                                                      np.log(np.bincount(labels) / len(labels))).sum()), rel=0.05)
    # reconstructions land nearest their own cluster's mean
    means = np.stack([X[labels == k].mean(0) for k in range(4)])
    R = vq.reconstruct(X)
    nearest = ((R[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == labels).mean() > 0.99


def test_a_codebook_learned_by_its_loss_term():
    X, _ = _clusters(n=400)
    vq = _vq(ema_decay=None, max_epochs=6).fit(X)
    book = vq.model_.codebook
    assert isinstance(book.vectors, torch.nn.Parameter) and not hasattr(book, "ema_sum")
    # the optimiser trains the codebook: its last step's gradient (the codebook term's) reached it
    assert book.vectors.grad is not None and float(book.vectors.grad.abs().sum()) > 0
    assert len(np.unique(vq.transform(X))) >= 2


def test_dead_codes_are_reseeded_and_counted():
    X, labels = _clusters(k=3)
    vq = _vq(codebook_size=16, dead_code_threshold=0.05, max_epochs=5).fit(X)
    assert sum(h["reseeded_codes"] for h in vq.history_) > 0
    assert homogeneity_score(labels, vq.transform(X)[:, 0]) > 0.99  # codes may split clusters, never merge them


def test_methods_shapes_and_sample_from_code_frequencies():
    X, _ = _clusters(n=300)
    vq = _vq(codes_per_row=2, max_epochs=3).fit(X)
    codes = vq.transform(X)
    assert codes.shape == (300, 2)
    assert vq.encode(X).shape == (300, 4)
    np.testing.assert_allclose(vq.decode(codes), vq.reconstruct(X), rtol=1e-6, atol=1e-6)
    assert vq.code_frequencies_.shape == (4,) and vq.code_frequencies_.sum() == pytest.approx(1.0)
    S = vq.sample(50, random_state=0)
    assert S.shape == (50, 10)
    np.testing.assert_array_equal(S, vq.sample(50, random_state=0))
    T = torch.from_numpy(X).float()
    assert isinstance(vq.transform(T), torch.Tensor)
    for bad, error in [(np.zeros((2, 3), dtype=np.int64), ValueError), (np.full((2, 2), 9), ValueError),
                       (np.zeros((2, 2)), TypeError)]:
        with pytest.raises(error):
            vq.decode(bad)
    with pytest.raises(AttributeError, match="no likelihood bound"):
        vq.score_samples(X)


def test_save_load_checkpoint_and_clone(tmp_path):
    X, _ = _clusters(n=300)
    a = _vq(max_epochs=2, checkpoint=tmp_path / "c.npz").fit(X)
    a.save(tmp_path / "m.npz")
    b = fastlvm.VQVAE.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(b.transform(X), a.transform(X))
    np.testing.assert_array_equal(b.code_frequencies_, a.code_frequencies_)
    with pytest.raises(ValueError, match="fastlvm.VQVAE"):
        fastlvm.VAE.load(tmp_path / "m.npz")
    # an uninterrupted fit of 2 epochs equals 1 epoch then 1 more from the checkpoint
    half = _vq(max_epochs=1, checkpoint=tmp_path / "r.npz").fit(X)
    assert half.n_epochs_ == 1
    resumed = _vq(max_epochs=2, checkpoint=tmp_path / "r.npz").fit(X)
    full = a
    for key, value in full.model_.state_dict().items():
        assert torch.equal(resumed.model_.state_dict()[key], value), key
    c = clone(a)
    assert c.get_params()["codebook_size"] == 4 and not hasattr(c, "model_")


@pytest.mark.parametrize("params,error,match", [
    ({"codebook_size": 0}, ValueError, "codebook_size"),
    ({"ema_decay": 1.0}, ValueError, "ema_decay"),
    ({"commitment": -1.0}, ValueError, "commitment"),
    ({"code_dim": 2.5}, TypeError, "code_dim"),
    ({"dead_code_threshold": -0.1}, ValueError, "dead_code_threshold"),
])
def test_bad_parameters(params, error, match):
    X, _ = _clusters(n=200)
    with pytest.raises(error, match=match):
        _vq(**params).fit(X)
