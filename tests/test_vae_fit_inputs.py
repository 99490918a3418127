"""fastlvm.VAE's inputs: every bad one gets a clear error and loses nothing; out-of-core inputs
(memmap, h5py, Zarr, chunk callables, DataLoaders) are read in shuffled blocks."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError

import fastlvm
from fastlvm.data.shuffle import row_split, shuffled_batches
from fastlvm.data.sources import ArraySource
from fastlvm.vae import data as vae_data


@pytest.fixture(scope="module")
def X():
    return (load_digits().data[:400] / 16.0).astype(np.float32)


def _small(**kw):
    args = dict(hidden=(16,), batch_size=50, max_epochs=2, random_state=0)
    args.update(kw)
    return fastlvm.VAE(3, **args)


# ---------------------------------------------------------------------- bad data


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_first_bad_row(X, kind, bad):
    Y = X.copy()
    Y[37, 5] = bad
    Y[120, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 37\)"):
        _small().fit(torch.from_numpy(Y) if kind == "torch" else Y)


def test_bernoulli_data_outside_the_unit_interval_names_the_row(X):
    Y = X.copy()
    Y[12, 3] = 1.5
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\]; row 12"):
        _small().fit(Y)
    _small(likelihood="gaussian").fit(Y)  # a Gaussian takes any real numbers


def test_wrong_width_rank_and_empty_input(X):
    vae = _small().fit(X)
    with pytest.raises(ValueError, match="X has 5 features, but VAE is expecting 64 features"):
        vae.transform(X[:, :5])
    with pytest.raises(ValueError, match="X has 5 features, but VAE is expecting 64 features"):
        vae.score_samples(torch.from_numpy(X[:, :5]))
    with pytest.raises(ValueError, match="Expected 2D array"):
        vae.transform(X[0])
    with pytest.raises(ValueError, match="0 sample"):
        _small().fit(X[:0])
    with pytest.raises(ValueError, match="must hold numbers"):
        _small().fit(np.array([["a"] * 64] * 100))
    with pytest.raises(ValueError, match=r"Z must have shape \(n, latent_dim=3\)"):
        vae.decode(np.zeros((2, 4)))


def test_fewer_rows_than_a_batch_needs(X):
    with pytest.raises(ValueError, match="fewer than a batch needs"):
        _small(batch_size=400).fit(X)  # 10% are held out for validation
    _small(batch_size=400, validation_fraction=0.0).fit(X)
    with pytest.raises(ValueError, match="holds out none"):
        _small(validation_fraction=1e-6).fit(X)


@pytest.mark.parametrize("params,match", [
    (dict(latent_dim=0), "latent_dim must be >= 1"),
    (dict(n_samples=0), "n_samples must be >= 1"),
    (dict(hidden=(16, 0)), "hidden must be a tuple"),
    (dict(likelihood="poisson"), "likelihood must be one of"),
    (dict(likelihood="gaussian", decoder_variance="diag"), "decoder_variance must be one of"),
    (dict(likelihood="gaussian", decoder_variance=0.0), "decoder_variance must be > 0"),
    (dict(objective="vi"), "objective must be one of"),
    (dict(objective="iwae", beta=0.5), "objective='iwae' takes none"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(free_bits=-0.1), "free_bits must be >= 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(validation_fraction=1.0), "validation_fraction must be < 1"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(device="nowhere"), "device must name a torch device"),
])
def test_invalid_parameters(X, params, match):
    latent = params.pop("latent_dim", 3)
    with pytest.raises(ValueError, match=match):
        fastlvm.VAE(latent, **{"hidden": (16,), "batch_size": 50, "max_epochs": 1, **params}).fit(X)


def test_parameter_types_and_modules(X):
    with pytest.raises(TypeError, match="n_samples must be an integer"):
        _small(n_samples=1.5).fit(X)
    with pytest.raises(TypeError, match="encoder must be None or a torch.nn.Module"):
        _small(encoder="mlp").fit(X)
    with pytest.raises(NotFittedError):
        _small().transform(X)


def test_user_module_of_the_wrong_width_names_the_expected_one(X):
    with pytest.raises(ValueError, match=r"encoder must return \(batch, 2 \* latent_dim\) = \(batch, 6\)"):
        _small(encoder=torch.nn.Linear(64, 3)).fit(X)
    with pytest.raises(ValueError, match=r"decoder must return \(batch, 64\)"):
        _small(decoder=torch.nn.Linear(3, 60)).fit(X)
    with pytest.raises(ValueError, match=r"decoder must return \(batch, 128\) \[mean, logvar\]"):
        _small(likelihood="gaussian", decoder_variance="output", decoder=torch.nn.Linear(3, 64)).fit(X)
    with pytest.raises(ValueError, match="encoder fails on rows of 64 features"):
        _small(encoder=torch.nn.Linear(10, 6)).fit(X)


class _Exploding(torch.nn.Module):
    """An encoder that returns NaN from its ``after``-th training call on."""

    def __init__(self, after):
        super().__init__()
        self.inner = torch.nn.Linear(64, 6)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training and x.shape[0] == 50:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_non_finite_loss_names_epoch_and_batch_and_loses_nothing(X, tmp_path):
    path = tmp_path / "fit.ckpt"
    good = _small(validation_fraction=0.0).fit(X)
    state = {k: v.clone() for k, v in good.model_.state_dict().items()}
    history = list(good.history_)
    # 400 rows in batches of 50: 8 per epoch; the 11th batch is the 3rd of epoch 2
    good.set_params(encoder=_Exploding(after=11), checkpoint=path)
    with pytest.raises(FloatingPointError, match="epoch 2, batch 3"):
        good.fit(X)
    assert good.history_ == history  # the earlier fit is untouched
    assert all(torch.equal(v, state[k]) for k, v in good.model_.state_dict().items())
    saved = np.load(path, allow_pickle=False)  # the checkpoint of epoch 1 is intact
    assert '"epoch": 1' in str(saved["__config__"])
    fresh = _small(validation_fraction=0.0, encoder=_Exploding(after=3))
    with pytest.raises(FloatingPointError, match="epoch 1, batch 3"):
        fresh.fit(X)
    assert not hasattr(fresh, "model_")


# ---------------------------------------------------------------------- out-of-core inputs


class _Recording:
    """A row-sliceable array that records the rows of every read (an h5py stand-in)."""

    def __init__(self, A):
        self.A, self.reads = A, []
        self.shape, self.dtype = A.shape, A.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self.A[key]


def test_out_of_core_rows_are_read_in_blocks_in_a_shuffled_order(monkeypatch):
    A = np.arange(1000 * 3, dtype=np.float64).reshape(1000, 3)
    src = ArraySource(_Recording(A))
    keep = lambda rows: ~row_split(5, rows, 0.1)  # noqa: E731
    batches = list(shuffled_batches(src, 64, seed=1, epoch=0, block_rows=100, window_blocks=3, keep=keep))
    rows = np.concatenate([r for r, _ in batches])
    held = row_split(5, np.arange(1000), 0.1)
    assert np.array_equal(np.sort(rows), np.flatnonzero(~held))  # every training row once
    assert all(len(r) == 64 for r, _ in batches[:-1])
    for r, x in batches:
        np.testing.assert_array_equal(x, A[r])
    assert not np.array_equal(rows, np.sort(rows))
    reads = src.array.reads
    assert len(reads) == 10 and all(k.stop - k.start == 100 for k in reads)  # whole blocks, no row reads
    assert [k.start for k in reads] != sorted(k.start for k in reads)  # blocks in a shuffled order
    again = np.concatenate([r for r, _ in shuffled_batches(src, 64, 1, 0, 100, 3, keep)])
    other = np.concatenate([r for r, _ in shuffled_batches(src, 64, 1, 1, 100, 3, keep)])
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)


def test_the_validation_split_depends_on_the_row_only():
    rows = np.arange(100_000)
    held = row_split(3, rows, 0.1)
    assert abs(held.mean() - 0.1) < 0.005
    np.testing.assert_array_equal(row_split(3, rows[5000:6000], 0.1), held[5000:6000])
    assert not np.array_equal(row_split(4, rows, 0.1), held)


@pytest.mark.parametrize("kind", ["memmap", "h5py", "zarr", "chunks", "dataloader"])
def test_out_of_core_inputs_fit_like_the_array(X, tmp_path, kind, monkeypatch):
    monkeypatch.setattr(vae_data, "BLOCK_BYTES", 64 * 4 * 30)  # blocks of 30 rows, windows of 16 blocks
    if kind == "memmap":
        m = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
        m[:] = X
        m.flush()
        source = np.load(tmp_path / "x.npy", mmap_mode="r")
    elif kind == "h5py":
        h5py = pytest.importorskip("h5py")
        f = h5py.File(tmp_path / "x.h5", "w")
        source = f.create_dataset("x", data=X)
    elif kind == "zarr":
        zarr = pytest.importorskip("zarr")
        source = zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, dtype="f4", chunks=(50, 64))
        source[:] = X
    elif kind == "chunks":
        source = lambda: (X[a : a + 70] for a in range(0, len(X), 70))  # noqa: E731
    else:
        source = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X)), batch_size=70)
    vae = _small(max_epochs=4).fit(source)
    ref = _small(max_epochs=4).fit(X)
    assert vae.n_epochs_ == 4 and all(np.isfinite(e["loss"]) for e in vae.history_)
    # the same held-out rows: their losses after one epoch of different orders agree loosely
    assert vae.history_[-1]["val_loss"] == pytest.approx(ref.history_[-1]["val_loss"], rel=0.05)
    assert vae.history_[-1]["loss"] < vae.history_[0]["loss"]
    np.testing.assert_allclose(vae.transform(source), vae.transform(X), rtol=1e-5, atol=1e-6)
    again = _small(max_epochs=4).fit(source)
    assert all(torch.equal(a, b) for a, b in zip(vae.model_.state_dict().values(),
                                                 again.model_.state_dict().values()))


def test_out_of_core_bad_rows_are_named_as_read(X, tmp_path):
    Y = X.copy()
    Y[333, 2] = np.nan
    np.save(tmp_path / "y.npy", Y)
    with pytest.raises(ValueError, match=r"first at row 333"):
        _small().fit(np.load(tmp_path / "y.npy", mmap_mode="r"))
    Y[333, 2] = 2.0
    np.save(tmp_path / "y.npy", Y)
    with pytest.raises(ValueError, match=r"\[0, 1\]; row 333"):
        _small().fit(np.load(tmp_path / "y.npy", mmap_mode="r"))


def test_a_shuffling_dataloader_needs_no_validation_split(X):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X)), batch_size=64,
                                         shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        _small().fit(loader)
    assert _small(validation_fraction=0.0).fit(loader).n_epochs_ == 2


def test_out_of_core_data_is_never_read_whole(monkeypatch):
    # every read of the source is one block of rows, whatever the pass (training, validation, transform)
    monkeypatch.setattr(vae_data, "BLOCK_BYTES", 16 * 4 * 200)
    A = (np.random.default_rng(0).random((3000, 16)) < 0.3).astype(np.float32)
    rec = _Recording(A)
    vae = fastlvm.VAE(2, hidden=(8,), batch_size=100, max_epochs=2, random_state=0).fit(rec)
    vae.transform(rec)
    assert all(isinstance(k, slice) for k in rec.reads)
    assert max(k.stop - k.start for k in rec.reads) <= 200
    assert len(rec.reads) > 2 * 15
