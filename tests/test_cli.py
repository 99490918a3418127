"""The `fastlvm demo` command: files written whole, figures that are real PNGs, a 2-D fit
that finds the mixture the data were drawn from, and a VAE that learns."""

import json
import os

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from fastlvm import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("mixture_2d.png", "loglik.png", "bic_2d.png", "vae_digits.png", "infovae_digits.png", "vqvae_digits.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = cli.main(["demo", "--output", str(out), "--quick"])
    with open(out / "summary.json") as f:
        return out, code, json.load(f)


def test_demo_writes_valid_pngs_and_nothing_half_written(demo):
    from matplotlib.image import imread

    out, code, summary = demo
    assert code == 0
    for name in FIGURES:
        path = out / name
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
        img = imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name} looks blank"
    assert sorted(os.listdir(out)) == sorted(FIGURES + ("summary.json",))  # no temporary files left
    assert sorted(summary["files"]) == sorted(FIGURES + ("summary.json",))


def test_demo_recovers_the_true_means_of_the_synthetic_mixture(demo):
    _, _, summary = demo
    fitted = np.array(summary["mixture-2d"]["fitted_means"])
    true = cli.SYNTHETIC_MEANS
    assert fitted.shape == true.shape
    dist = np.linalg.norm(true[:, None] - fitted[None], axis=-1)
    rows, cols = linear_sum_assignment(dist)
    # 1000 rows: each mean is estimated from 150-350 points of variance <= 1.5
    assert dist[rows, cols].max() < 0.3, dist[rows, cols]


def test_demo_bic_picks_the_true_number_of_components(demo):
    _, _, summary = demo
    bic = summary["mixture-2d"]["bic"]
    assert set(bic) == {str(k) for k in range(1, 7)}
    assert min(bic, key=bic.get) == str(len(cli.SYNTHETIC_WEIGHTS)) == str(summary["mixture-2d"]["best_k"])


def test_demo_loglik_curves_never_decrease(demo):
    # EM's objective is monotone; the curves come from the estimator's per-iteration history
    _, _, summary = demo
    for section in ("mixture-2d", "wine", "digits"):
        ll = np.array(summary[section]["loglik"])
        assert ll.size >= 2, section
        assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:])), section


def test_demo_prints_the_tables(tmp_path, capsys):
    cli.main(["demo", "--output", str(tmp_path), "--quick", "--sections", "wine"])
    text = capsys.readouterr().out
    assert "wine (standardised): 3 components" in text
    assert "iter   1:" in text and "adjusted Rand index" in text
    assert sorted(os.listdir(tmp_path)) == ["loglik.png", "summary.json"]


def test_unknown_section_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--output", str(tmp_path), "--sections", "wine,nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cli.atomic_write(str(target), failing)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.png"]


@pytest.mark.parametrize("cov", [[[1.2, 0.6], [0.6, 0.8]], [[0.6, 0.0], [0.0, 1.4]], [[1.5, -0.7], [-0.7, 0.9]]])
def test_ellipses_lie_on_the_mahalanobis_contours(cov):
    # the points of the n-sigma ellipse satisfy (x - m)^T C^-1 (x - m) = n^2
    cov, mean = np.array(cov), np.array([0.5, -1.0])
    _, ax = cli.new_figure()
    cli.draw_ellipses(ax, [mean], [cov], ["C0"], n_sigmas=(1, 2))
    for patch, n in zip(ax.patches, (1, 2)):
        # points on the drawn Bezier curves (matplotlib's circle is exact to ~3e-4)
        path = patch.get_patch_transform().transform_path(patch.get_path())
        pts = np.concatenate([seg(np.linspace(0, 1, 7)) for seg, _ in path.iter_bezier()]) - mean
        d2 = np.einsum("ni,ij,nj->n", pts, np.linalg.inv(cov), pts)
        assert len(d2) > 20
        np.testing.assert_allclose(d2, n**2, rtol=2e-3)


def test_demo_vae_learns_and_its_bounds_are_ordered(demo):
    _, _, summary = demo
    vae = summary["vae-digits"]
    history, validation = vae["loss_history"], vae["validation_history"]
    assert len(history) == len(validation) == vae["epochs"] and all(np.isfinite(history + validation))
    assert history[-1] < history[0] - 5.0, history  # 64 pixels: an untrained decoder is far worse
    assert validation[-1] < validation[0]
    # The importance-weighted bound (S samples) is above the single-sample ELBO on average (Jensen),
    # and both are log-likelihoods of 64 intensities in [0, 1], so negative.
    assert vae["heldout_elbo"] <= vae["heldout_iwae"] < 0.0
    assert vae["heldout_iwae"] > -history[0]  # better than the first epoch's training ELBO


def test_demo_vae_section_fits_through_the_estimator(tmp_path, capsys, monkeypatch):
    # the section trains fastlvm.VAE (no model code of its own): fitting goes through VAE.fit
    import fastlvm

    calls = []
    fit = fastlvm.VAE.fit

    def spy(self, X, y=None):
        calls.append(X.shape)
        return fit(self, X, y)

    monkeypatch.setattr(fastlvm.VAE, "fit", spy)
    cli.main(["demo", "--output", str(tmp_path), "--quick", "--sections", "vae-digits"])
    assert calls == [(1500, 64)]
    text = capsys.readouterr().out
    assert "fastlvm.VAE: 15 epochs on 1500 rows" in text and "active units" in text
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "vae_digits.png"]
