"""The `fastlvm` command.

    fastlvm demo --output demo-output [--quick] [--sections mixture-2d,wine,digits,vae-digits,infovae-digits,vqvae-digits]

The demo is a list of sections (SECTIONS). Each one fits something, prints a few lines,
may save figures and add curves to the shared log-likelihood figure, and returns a
JSON-able summary; `summary.json` collects them. To add a section, append a Section.
Every file is written to a temporary name in the output directory, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fastlvm.data.files import atomic_write

# ---------------------------------------------------------------------------------------
# Output plumbing


def new_figure(*subplots, size=(6.4, 4.8)):
    """A matplotlib Figure on the Agg canvas, without pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo draws figures with matplotlib: pip install 'fastlvm[plot]'") from e
    fig = Figure(figsize=size, layout="constrained")
    return fig, (fig.subplots(*subplots) if subplots else fig.add_subplot())


@dataclass
class DemoContext:
    output: str
    quick: bool = False
    seed: int = 0
    out: Callable[[str], None] = print
    files: list = field(default_factory=list)
    # (title, iterations, values, y label): drawn together in loglik.png at the end
    curves: list = field(default_factory=list)

    def save_figure(self, fig, name: str) -> str:
        path = os.path.join(self.output, name)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        self.files.append(name)
        return path


@dataclass
class Section:
    name: str
    title: str
    run: Callable[[DemoContext], dict]


# ---------------------------------------------------------------------------------------
# Helpers shared by the mixture sections


def fit_gmm(X, n_components, seed, **kw):
    from fastlvm import GaussianMixture

    t0 = time.perf_counter()
    gm = GaussianMixture(n_components, random_state=seed, **kw).fit(X)
    return gm, time.perf_counter() - t0


def loglik_lines(history, shown=8) -> list[str]:
    """The per-iteration log-likelihood, every iteration if few, else a spread of them."""
    n = len(history)
    idx = range(n) if n <= shown else sorted(set(np.linspace(0, n - 1, shown).round().astype(int)))
    return [f"    iter {i + 1:>3}: {history[i]:12.5f}" for i in idx]


def report_fit(ctx, label, gm, seconds, X):
    hist = [float(v) for v in gm.lower_bounds_]
    ctx.out(f"  {label}: {gm.n_components} components ({gm.covariance_type}), N={X.shape[0]} D={X.shape[1]}, "
            f"{gm.n_iter_} iterations ({'converged' if gm.converged_ else 'not converged'}), fit {seconds:.2f} s")
    ctx.out("    log-likelihood per row:")
    for line in loglik_lines(hist):
        ctx.out(line)
    ctx.curves.append((f"{label}, K={gm.n_components}", list(range(1, len(hist) + 1)), hist,
                       "log-likelihood per row"))
    return hist


def draw_ellipses(ax, means, covariances, colors, n_sigmas=(1, 2)):
    from matplotlib.patches import Ellipse

    for mean, cov, color in zip(means, covariances, colors):
        vals, vecs = np.linalg.eigh(cov)
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))  # direction of the major axis
        for s in n_sigmas:
            ax.add_patch(Ellipse(mean, 2 * s * np.sqrt(vals[1]), 2 * s * np.sqrt(vals[0]), angle=angle,
                                 fill=False, color=color, lw=2 if s == 1 else 1, ls="-" if s == 1 else "--"))


# ---------------------------------------------------------------------------------------
# Section: a 2-D mixture whose truth is known

SYNTHETIC_WEIGHTS = np.array([0.35, 0.25, 0.25, 0.15])
SYNTHETIC_MEANS = np.array([[-4.0, -2.0], [0.0, 3.5], [4.0, -1.0], [0.5, -4.5]])
SYNTHETIC_COVARIANCES = np.array([
    [[1.2, 0.6], [0.6, 0.8]],
    [[1.5, -0.7], [-0.7, 0.9]],
    [[0.6, 0.0], [0.0, 1.4]],
    [[0.9, 0.4], [0.4, 0.5]],
])


def synthetic_mixture(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(SYNTHETIC_WEIGHTS), size=n, p=SYNTHETIC_WEIGHTS)
    chol = np.linalg.cholesky(SYNTHETIC_COVARIANCES)
    x = SYNTHETIC_MEANS[labels] + np.einsum("nij,nj->ni", chol[labels], rng.standard_normal((n, 2)))
    return x, labels


def section_mixture_2d(ctx: DemoContext) -> dict:
    from scipy.optimize import linear_sum_assignment

    k_true = len(SYNTHETIC_WEIGHTS)
    X, _ = synthetic_mixture(1000 if ctx.quick else 3000, ctx.seed)
    # started from random rows (best of 3) rather than k-means, so that the climb shows
    gm, seconds = fit_gmm(X, k_true, ctx.seed, n_init=3, init_params="random_from_data", tol=1e-5)
    hist = report_fit(ctx, "2-D mixture", gm, seconds, X)

    # fitted components in the order of the true ones (min total distance between means)
    dist = np.linalg.norm(SYNTHETIC_MEANS[:, None] - gm.means_[None], axis=-1)
    _, order = linear_sum_assignment(dist)
    fitted = gm.means_[order].astype(float)
    ctx.out("    true mean -> fitted mean:")
    for t, f in zip(SYNTHETIC_MEANS, fitted):
        ctx.out(f"      ({t[0]:5.2f}, {t[1]:5.2f}) -> ({f[0]:5.2f}, {f[1]:5.2f})")

    ks = list(range(1, 7))
    bics = []
    for k in ks:
        m, _ = fit_gmm(X, k, ctx.seed, n_init=1 if ctx.quick else 3)
        bics.append(float(m.bic(X)))
    best = ks[int(np.argmin(bics))]
    ctx.out("    BIC per number of components (lower is better):")
    ctx.out("      " + "  ".join(f"K={k}: {b:9.1f}{' *' if k == best else ''}" for k, b in zip(ks, bics)))

    colors = [f"C{i}" for i in range(k_true)]
    fig, ax = new_figure(size=(6.4, 5.6))
    true_index = np.argsort(order)  # fitted component j is drawn like true component true_index[j]
    ax.scatter(X[:, 0], X[:, 1], s=4, c=np.array(colors)[true_index[gm.predict(X)]], alpha=0.35, linewidths=0)
    draw_ellipses(ax, fitted, gm.covariances_[order], colors)
    ax.plot(*SYNTHETIC_MEANS.T, "k+", ms=14, mew=2, label="true means")
    ax.plot(*fitted.T, "kx", ms=9, mew=2, label="fitted means")
    ax.plot([], [], "k-", lw=2, label="1 sigma")
    ax.plot([], [], "k--", lw=1, label="2 sigma")
    ax.set(title=f"fastlvm.GaussianMixture, K={k_true}, full covariance (N={X.shape[0]})",
           xlabel="x1", ylabel="x2", aspect="equal")
    ax.legend(loc="upper left", fontsize=8)
    ctx.save_figure(fig, "mixture_2d.png")

    fig, ax = new_figure(size=(5.6, 4.0))
    ax.plot(ks, bics, "o-")
    ax.plot([best], [bics[best - 1]], "r*", ms=14, label=f"minimum: K={best}")
    ax.set(title=f"BIC of the 2-D mixture (truth: K={k_true})", xlabel="number of components K", ylabel="BIC")
    ax.legend()
    ctx.save_figure(fig, "bic_2d.png")
    return {"true_means": SYNTHETIC_MEANS.tolist(), "fitted_means": fitted.tolist(), "loglik": hist,
            "bic": dict(zip(map(str, ks), bics)), "best_k": best, "fit_seconds": seconds}


# ---------------------------------------------------------------------------------------
# Sections: scikit-learn's bundled data sets


def standardise(X):
    X = np.asarray(X, dtype=np.float64)
    return (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)


def pca(X, n_components):
    """Projection on the leading principal axes (SVD of the centred data)."""
    Xc = X - X.mean(0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    explained = float((s[:n_components] ** 2).sum() / (s**2).sum())
    return Xc @ vt[:n_components].T, explained


def fit_labelled(ctx, label, X, y, k, **kw):
    from sklearn.metrics import adjusted_rand_score

    gm, seconds = fit_gmm(X, k, ctx.seed, **kw)
    hist = report_fit(ctx, label, gm, seconds, X)
    ari = float(adjusted_rand_score(y, gm.predict(X)))
    ctx.out(f"    agreement of the clusters with the true classes (adjusted Rand index): {ari:.3f}")
    return {"loglik": hist, "ari": ari, "fit_seconds": seconds, "bic": float(gm.bic(X))}


def section_wine(ctx: DemoContext) -> dict:
    from sklearn.datasets import load_wine

    data = load_wine()
    return fit_labelled(ctx, "wine (standardised)", standardise(data.data), data.target, 3, tol=1e-6)


def section_digits(ctx: DemoContext) -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    Z, explained = pca(standardise(data.data), 10 if ctx.quick else 16)
    ctx.out(f"  digits: PCA to {Z.shape[1]} dimensions keeps {explained:.0%} of the variance")
    return fit_labelled(ctx, f"digits (PCA {Z.shape[1]})", Z, data.target, 10, tol=1e-5)


# ---------------------------------------------------------------------------------------
# A VAE fitted with fastlvm.VAE


def digit_grid(images, rows, cols, gap=2):
    """(rows * cols) 8x8 images tiled into one picture, rows x cols of them with blank gaps."""
    images = np.pad(np.asarray(images).reshape(rows, cols, 8, 8), ((0, 0), (0, 0), (0, gap), (0, gap)))
    size = 8 + gap
    return images.transpose(0, 2, 1, 3).reshape(rows * size, cols * size)[:-gap, :-gap]


def section_vae_digits(ctx: DemoContext) -> dict:
    """fastlvm.VAE (2-D latent space, Bernoulli decoder on pixel intensities / 16) on the digits;
    held-out log p(x) by its importance-weighted estimate (score_samples)."""
    from sklearn.datasets import load_digits

    from fastlvm import VAE

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(ctx.seed).permutation(X.shape[0])
    test, train = X[order[:297]], X[order[297:]]
    epochs = 15 if ctx.quick else 80
    vae = VAE(latent_dim=2, hidden=(128,), likelihood="bernoulli", batch_size=100, max_epochs=epochs, lr=3e-3,
              validation_fraction=0.1, early_stopping=False, random_state=ctx.seed)
    t0 = time.perf_counter()
    vae.fit(train)
    seconds = time.perf_counter() - t0
    history = [e["loss"] for e in vae.history_]
    validation = [e["val_loss"] for e in vae.history_]
    n_samples = 200 if ctx.quick else 2000
    elbo = vae.elbo(test, n_samples=1)
    iwae = vae.score_samples(test, n_samples=n_samples)
    ctx.out(f"  fastlvm.VAE: {vae.n_epochs_} epochs on {train.shape[0]} rows ({seconds:.1f} s): negative ELBO per "
            f"row {history[0]:.2f} -> {history[-1]:.2f} nats (validation {validation[-1]:.2f})")
    ctx.out(f"  held-out {test.shape[0]} rows: mean ELBO {elbo.mean():.2f}, importance-weighted bound "
            f"(S={n_samples}) {iwae.mean():.2f} nats per row (the estimate of log p(x)); "
            f"active units {vae.active_units(X)} of 2")

    fig, axes = new_figure(1, 4, size=(18, 4.4))
    epoch_axis = range(1, vae.n_epochs_ + 1)
    axes[0].plot(epoch_axis, history, "o-", ms=3, label="training")
    axes[0].plot(epoch_axis, validation, "s-", ms=3, label="validation")
    axes[0].set(title="fastlvm.VAE: loss per epoch", xlabel="epoch", ylabel="negative ELBO per row (nats)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    shown = 8
    recon = vae.reconstruct(test[:shown])
    axes[1].imshow(digit_grid(np.concatenate([test[:shown], recon]), 2, shown), cmap="gray_r",
                   interpolation="nearest")
    axes[1].set(title="held-out digits (top), reconstructed (bottom)", xticks=[], yticks=[])
    samples = vae.sample(4 * shown, random_state=ctx.seed)
    axes[2].imshow(digit_grid(samples, 4, shown), cmap="gray_r", interpolation="nearest")
    axes[2].set(title="samples: decoder means of z ~ N(0, I)", xticks=[], yticks=[])
    mu = vae.transform(X)
    pts = axes[3].scatter(mu[:, 0], mu[:, 1], c=data.target, cmap="tab10", s=6)
    fig.colorbar(pts, ax=axes[3], label="digit")
    axes[3].set(title="posterior means in the 2-D latent space", xlabel="z1", ylabel="z2")
    ctx.save_figure(fig, "vae_digits.png")
    return {"epochs": vae.n_epochs_, "loss_history": history, "validation_history": validation,
            "n_samples": n_samples, "heldout_elbo": float(elbo.mean()), "heldout_iwae": float(iwae.mean()),
            "fit_seconds": seconds}


def _digits_split(seed):
    from sklearn.datasets import load_digits

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(X.shape[0])
    return X, data.target, X[order[:297]], X[order[297:]]


def section_infovae_digits(ctx: DemoContext) -> dict:
    """A plain VAE and an InfoVAE (alpha = 1: MMD instead of KL) with 8 latent units on the digits:
    how many units each keeps active, and how close each one's aggregate posterior is to N(0, I)."""
    import torch

    import fastlvm.functional as F
    from fastlvm import VAE

    X, target, test, train = _digits_split(ctx.seed)
    common = dict(latent_dim=8, hidden=(128,), likelihood="bernoulli", batch_size=100, lr=3e-3,
                  max_epochs=6 if ctx.quick else 60, validation_fraction=0.1, early_stopping=False,
                  random_state=ctx.seed)
    models = {"VAE (KL)": VAE(**common), "InfoVAE (MMD, lambda=10)": VAE(regularizer="mmd", lambda_=10.0, **common)}
    result = {}
    fig, axes = new_figure(1, 3, size=(15, 4.2))
    for i, (name, model) in enumerate(models.items()):
        model.fit(train)
        mu = model.transform(X)
        mmd = float(F.mmd(torch.from_numpy(mu[:1000]).double(), generator=torch.Generator().manual_seed(ctx.seed)))
        active = model.active_units(X)
        ctx.out(f"  {name}: {active} of 8 units active, MMD^2 of the posterior means to N(0, I) {mmd:.4f}, "
                f"held-out negative ELBO per row {-float(model.elbo(test).mean()):.2f}")
        axes[0].bar(np.arange(8) + 0.4 * i, np.var(mu, axis=0), width=0.4, label=name)
        pts = axes[1 + i].scatter(mu[:, 0], mu[:, 1], c=target, cmap="tab10", s=5)
        axes[1 + i].set(title=f"{name}: posterior means, units 1-2", xlabel="z1", ylabel="z2")
        result[name] = {"active_units": active, "mmd": mmd}
    fig.colorbar(pts, ax=axes[2], label="digit")
    axes[0].axhline(0.01, color="k", lw=0.8, ls="--")
    axes[0].set(yscale="log", title="latent usage: Var_x E[z_j | x] (active above 0.01)", xlabel="unit j")
    axes[0].legend()
    ctx.save_figure(fig, "infovae_digits.png")
    return result


def section_vqvae_digits(ctx: DemoContext) -> dict:
    """fastlvm.VQVAE on the digits: reconstructions from 4 codes of a 64-code book, and codebook usage."""
    from fastlvm import VQVAE

    X, target, test, train = _digits_split(ctx.seed)
    vq = VQVAE(codebook_size=64, code_dim=4, codes_per_row=4, hidden=(128,), likelihood="bernoulli", batch_size=100,
               lr=3e-3, max_epochs=6 if ctx.quick else 60, validation_fraction=0.1, early_stopping=False,
               random_state=ctx.seed)
    t0 = time.perf_counter()
    vq.fit(train)
    seconds = time.perf_counter() - t0
    perplexity = vq.perplexity(test)
    reseeded = sum(e["reseeded_codes"] for e in vq.history_)
    ctx.out(f"  fastlvm.VQVAE: {vq.n_epochs_} epochs ({seconds:.1f} s): loss per row {vq.history_[0]['loss']:.2f} -> "
            f"{vq.history_[-1]['loss']:.2f}; held-out codebook perplexity {perplexity:.1f} of 64 codes; "
            f"{reseeded} dead codes re-seeded")
    fig, axes = new_figure(1, 3, size=(16, 4.2))
    shown = 8
    axes[0].imshow(digit_grid(np.concatenate([test[:shown], vq.reconstruct(test[:shown])]), 2, shown),
                   cmap="gray_r", interpolation="nearest")
    axes[0].set(title="held-out digits (top), from their 4 codes (bottom)", xticks=[], yticks=[])
    axes[1].bar(np.arange(64), np.sort(vq.code_frequencies_)[::-1])
    axes[1].set(title=f"codebook usage (perplexity {perplexity:.1f})", xlabel="code (by frequency)",
                ylabel="share of the vectors")
    axes[2].plot(range(1, vq.n_epochs_ + 1), [e["loss"] for e in vq.history_], "o-", ms=3, label="training")
    axes[2].plot(range(1, vq.n_epochs_ + 1), [e["val_loss"] for e in vq.history_], "s-", ms=3, label="validation")
    axes[2].set(title="fastlvm.VQVAE: loss per epoch", xlabel="epoch", ylabel="loss per row")
    axes[2].legend()
    ctx.save_figure(fig, "vqvae_digits.png")
    return {"perplexity": perplexity, "reseeded_codes": reseeded, "loss_history": [e["loss"] for e in vq.history_]}


SECTIONS = [
    Section("mixture-2d", "Synthetic 2-D mixture of 4 Gaussians", section_mixture_2d),
    Section("wine", "Wine recognition data (178 x 13)", section_wine),
    Section("digits", "Handwritten digits (1797 x 64)", section_digits),
    Section("vae-digits", "A VAE on the handwritten digits (fastlvm.VAE; importance-weighted log p(x))",
            section_vae_digits),
    Section("infovae-digits", "InfoVAE against the VAE on the digits: latent usage and MMD to the prior",
            section_infovae_digits),
    Section("vqvae-digits", "A VQ-VAE on the handwritten digits (fastlvm.VQVAE): reconstructions, codebook usage",
            section_vqvae_digits),
]


# ---------------------------------------------------------------------------------------
# The demo


def draw_curves(ctx: DemoContext) -> None:
    n = len(ctx.curves)
    fig, axes = new_figure(1, n, size=(4.2 * n, 3.6))
    for ax, (title, xs, ys, ylabel) in zip(np.atleast_1d(axes), ctx.curves):
        ax.plot(xs, ys, "o-", ms=3)
        ax.set(title=title, xlabel="EM iteration", ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Log-likelihood per EM iteration (fastlvm.GaussianMixture.lower_bounds_)")
    ctx.save_figure(fig, "loglik.png")


def run_demo(output: str, quick: bool = False, sections=None, seed: int = 0, out=print) -> dict:
    """Runs the chosen sections (all by default) and writes figures and summary.json to output."""
    names = [s.name for s in SECTIONS]
    chosen = names if sections is None else list(sections)
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ValueError(f"unknown demo section(s) {unknown}; available: {names}")
    os.makedirs(output, exist_ok=True)
    ctx = DemoContext(output=output, quick=quick, seed=seed, out=out)
    summary = {}
    for section in SECTIONS:
        if section.name in chosen:
            out(f"\n== {section.title} ==")
            t0 = time.perf_counter()
            summary[section.name] = section.run(ctx)
            out(f"  ({time.perf_counter() - t0:.1f} s)")
    if ctx.curves:
        draw_curves(ctx)
    summary["files"] = sorted(ctx.files) + ["summary.json"]
    text = json.dumps(summary, indent=1).encode()
    atomic_write(os.path.join(output, "summary.json"), lambda f: f.write(text))
    out(f"\nwrote {', '.join(summary['files'])} to {output}")
    return summary


def main(argv=None) -> int:
    from fastlvm import __version__

    parser = argparse.ArgumentParser(prog="fastlvm", description="fastlvm: fast latent variable models.")
    parser.add_argument("--version", action="version", version=f"fastlvm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit mixtures and a VAE on synthetic and bundled data; write figures")
    demo.add_argument("--output", default="demo-output", help="directory for figures and summary.json")
    demo.add_argument("--quick", action="store_true", help="smaller fits (a few seconds)")
    demo.add_argument("--sections", help="comma-separated subset of: " + ", ".join(s.name for s in SECTIONS))
    demo.add_argument("--seed", type=int, default=0, help="random seed for data and fits (default 0)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        sections = None if args.sections is None else [s.strip() for s in args.sections.split(",") if s.strip()]
        try:
            run_demo(args.output, quick=args.quick, sections=sections, seed=args.seed)
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
