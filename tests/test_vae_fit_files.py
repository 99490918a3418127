"""fastlvm.VAE's files: save/load (a JSON config and tensors in one .npz, no pickle) and
per-epoch checkpoints that survive a SIGKILL and resume to the same model."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import fastlvm


@pytest.fixture(scope="module")
def X():
    return (load_digits().data[:600] / 16.0).astype(np.float32)


def _states_equal(a, b):
    sa, sb = a.model_.state_dict(), b.model_.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _losses(vae):
    return [(e["loss"], e.get("val_loss")) for e in vae.history_]


@pytest.mark.parametrize("params", [dict(), dict(likelihood="gaussian", decoder_variance="output", dtype="float64"),
                                    dict(likelihood="gaussian", decoder_variance=0.5, objective="iwae",
                                         n_samples=3)])
def test_save_load_round_trip(X, tmp_path, params):
    vae = fastlvm.VAE(3, hidden=(16,), batch_size=50, max_epochs=2, random_state=0, **params).fit(X)
    path = tmp_path / "model.npz"
    vae.save(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays: nothing to unpickle
        assert "__config__" in z.files
    back = fastlvm.VAE.load(path)
    assert back.get_params() == vae.get_params()
    assert _states_equal(back, vae)
    np.testing.assert_array_equal(back.transform(X[:9]), vae.transform(X[:9]))
    np.testing.assert_array_equal(back.score_samples(X[:9], n_samples=20), vae.score_samples(X[:9], n_samples=20))
    assert back.history_ == vae.history_ and back.n_epochs_ == vae.n_epochs_ and back.best_epoch_ == vae.best_epoch_
    np.testing.assert_array_equal(back.kl_per_dim_, vae.kl_per_dim_)
    assert [f for f in os.listdir(tmp_path)] == ["model.npz"]  # no temporary file left


def test_user_modules_are_passed_back_to_load(X, tmp_path):
    enc = torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6))
    vae = fastlvm.VAE(3, encoder=enc, batch_size=50, max_epochs=1, random_state=0).fit(X)
    vae.save(tmp_path / "m.npz")
    with pytest.raises(TypeError, match="user encoder"):
        fastlvm.VAE.load(tmp_path / "m.npz")
    other = torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6))
    back = fastlvm.VAE.load(tmp_path / "m.npz", encoder=other)
    np.testing.assert_array_equal(back.transform(X[:4]), vae.transform(X[:4]))
    with pytest.raises(ValueError, match="not a usable fastlvm.VAE model file"):
        fastlvm.VAE.load(tmp_path / "m.npz", encoder=torch.nn.Sequential(torch.nn.Linear(64, 6)))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_damaged_or_foreign_files_raise_and_are_not_modified(X, tmp_path):
    vae = fastlvm.VAE(3, hidden=(16,), batch_size=50, max_epochs=1, random_state=0).fit(X)
    good = tmp_path / "m.npz"
    vae.save(good)
    data = good.read_bytes()
    cases = {"truncated.npz": data[: len(data) // 2], "garbage.npz": b"not a model at all" * 10,
             "empty.npz": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "other.npz", weights=np.ones(3))  # e.g. another library's arrays
    fastlvm.GaussianMixture(2, checkpoint=tmp_path / "gmm.npz", max_iter=2).fit(np.random.default_rng(0)
                                                                                .normal(size=(50, 2)))
    vae_ckpt = tmp_path / "ckpt.npz"
    fastlvm.VAE(3, hidden=(16,), batch_size=50, max_epochs=1, random_state=0, checkpoint=vae_ckpt).fit(X)
    for name in [*cases, "other.npz", "gmm.npz", "ckpt.npz", "missing.npz"]:
        path = tmp_path / name
        before = path.read_bytes() if path.exists() else None
        with pytest.raises(ValueError):
            fastlvm.VAE.load(path)
        assert (path.read_bytes() if path.exists() else None) == before, name
    # a checkpoint path holding something else is refused by fit, and left as it was
    for name in ("truncated.npz", "m.npz", "gmm.npz"):
        before = (tmp_path / name).read_bytes()
        with pytest.raises(ValueError, match="checkpoint"):
            fastlvm.VAE(3, hidden=(16,), batch_size=50, max_epochs=1, checkpoint=tmp_path / name).fit(X)
        assert (tmp_path / name).read_bytes() == before


def test_a_checkpoint_of_another_model_is_refused(X, tmp_path):
    path = tmp_path / "fit.ckpt"
    fastlvm.VAE(3, hidden=(16,), batch_size=50, max_epochs=1, random_state=0, checkpoint=path).fit(X)
    before = path.read_bytes()
    for other in (dict(latent_dim=4), dict(hidden=(8,)), dict(random_state=1), dict(lr=0.01)):
        kw = dict(latent_dim=3, hidden=(16,), batch_size=50, max_epochs=2, random_state=0, checkpoint=path)
        kw.update(other)
        with pytest.raises(ValueError, match="written by a different model"):
            fastlvm.VAE(**kw).fit(X)
    with pytest.raises(ValueError, match="different model: n_rows"):
        fastlvm.VAE(3, hidden=(16,), batch_size=50, max_epochs=2, random_state=0, checkpoint=path).fit(X[:500])
    assert path.read_bytes() == before


def test_a_finished_checkpoint_resumes_to_the_same_model_and_more_epochs_continue(X, tmp_path):
    path = tmp_path / "fit.ckpt"
    kw = dict(hidden=(16,), batch_size=50, random_state=0, early_stopping=False)
    a = fastlvm.VAE(3, max_epochs=2, checkpoint=path, **kw).fit(X)
    b = fastlvm.VAE(3, max_epochs=2, checkpoint=path, **kw).fit(X)
    assert _states_equal(a, b) and _losses(a) == _losses(b)
    c = fastlvm.VAE(3, max_epochs=4, checkpoint=path, **kw).fit(X)  # two more epochs
    full = fastlvm.VAE(3, max_epochs=4, **kw).fit(X)
    assert c.n_epochs_ == 4 and _states_equal(c, full) and _losses(c) == _losses(full)
    d = fastlvm.VAE(3, max_epochs=4, checkpoint=path, random_state=None, **{k: v for k, v in kw.items()
                                                                             if k != "random_state"}).fit(X)
    assert _states_equal(d, full)  # random_state=None takes the checkpoint's seed


_CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    from sklearn.datasets import load_digits
    import fastlvm
    torch.set_num_threads(int(sys.argv[2]))
    X = (load_digits().data[:600] / 16.0).astype(np.float32)
    fastlvm.VAE(3, hidden=(64,), batch_size=10, max_epochs=int(sys.argv[3]), random_state=0, verbose=1,
                checkpoint=sys.argv[1]).fit(X)
    print("finished", flush=True)
""")


def test_a_fit_killed_by_sigkill_resumes_to_the_uninterrupted_model(X, tmp_path):
    path = str(tmp_path / "fit.ckpt")
    epochs = 5
    threads = torch.get_num_threads()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, path, str(threads), str(epochs)],
                             stdout=subprocess.PIPE, text=True)
    seen = 0
    try:
        for line in child.stdout:
            assert not line.startswith("finished"), "the fit ended before it could be killed"
            if line.startswith("epoch"):
                seen += 1
                if seen == 2:  # the checkpoint of epoch 2 is written; kill it somewhere in epoch 3
                    os.kill(child.pid, signal.SIGKILL)
                    break
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with np.load(path, allow_pickle=False) as z:
        assert '"epoch": 2' in str(z["__config__"]) or '"epoch": 3' in str(z["__config__"])
    assert [f for f in os.listdir(tmp_path)] == ["fit.ckpt"] or all(
        f == "fit.ckpt" or f.endswith(".tmp") for f in os.listdir(tmp_path))
    kw = dict(hidden=(64,), batch_size=10, max_epochs=epochs, random_state=0)
    resumed = fastlvm.VAE(3, checkpoint=path, **kw).fit(X)
    uninterrupted = fastlvm.VAE(3, **kw).fit(X)
    assert resumed.n_epochs_ == uninterrupted.n_epochs_ == epochs
    assert _states_equal(resumed, uninterrupted)
    assert _losses(resumed) == _losses(uninterrupted)
