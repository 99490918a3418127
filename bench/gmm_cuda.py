"""EM for Gaussian mixtures on one GPU: fastlvm (backend='cuda') beside torchgmm and pomegranate.

    python bench/bench_gmm.py --device cuda [--quick] [--libs fastlvm,torchgmm,pomegranate]

Every library fits the same data, already on the device as a torch CUDA tensor, from the same
initial parameters with tol=0, so all do the same EM iterations. Per-iteration time is
(T(M) - T(1)) / (M - 1) with the device synchronised around each fit (fixed costs cancel), the
median over rounds; the fraction is the case's E+M-step FLOPs per second over the device's
measured float32 GEMM rate (torch.matmul, 8192^3). Nobody on the project's machines has a GPU:
this script has not been run there, and no GPU figure is claimed anywhere.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import numpy as np

# (name, N, D, K, covariance type); float32 data
CASES = [("full", 200_000, 32, 16, "full"), ("diag", 1_000_000, 64, 64, "diag")]
QUICK = [("full", 20_000, 16, 8, "full"), ("diag", 50_000, 32, 16, "diag")]
LIBRARIES = ("fastlvm", "torchgmm", "pomegranate")


def flop_per_iter(n, d, k, cov):
    """E-step X P_k and M-step sum r x x^T for full (2 N K D^2 each); 4 N K D for diag."""
    return 4.0 * n * k * d * d if cov == "full" else 4.0 * n * k * d


def gemm_rate(torch, n=8192, repeats=10):
    """The device's float32 GEMM rate in FLOP/s (best of repeats)."""
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    a @ b
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def initial(rng, k, d, cov, x):
    idx = rng.choice(x.shape[0], k, replace=False)
    means = x[idx].astype(np.float64)
    var = x.var(axis=0).astype(np.float64)
    covs = np.stack([np.diag(var)] * k) if cov == "full" else np.stack([var] * k)
    return np.full(k, 1.0 / k), means, covs


def fit_fastlvm(torch, x, init, cov, max_iter):
    from fastlvm import GaussianMixture

    w, m, c = init
    prec = np.linalg.inv(c) if cov == "full" else 1.0 / c
    gm = GaussianMixture(len(w), covariance_type=cov, tol=0.0, max_iter=max_iter, weights_init=w, means_init=m,
                         precisions_init=prec, backend="cuda")
    gm.fit(x)
    return gm.n_iter_


def fit_torchgmm(torch, x, init, cov, max_iter):
    from torchgmm.base.data import DataLoader, collate_tensor, dataset_from_tensors
    from torchgmm.bayes import GaussianMixture
    from torchgmm.bayes.gmm.lightning_module import GaussianMixtureLightningModule
    from torchgmm.bayes.gmm.model import GaussianMixtureModel, GaussianMixtureModelConfig

    w, m, c = init
    k, d = m.shape
    model = GaussianMixtureModel(GaussianMixtureModelConfig(k, d, cov)).to(torch.float32)
    model.component_probs.copy_(torch.from_numpy(w))
    model.means.copy_(torch.from_numpy(m))
    chol = np.linalg.cholesky(np.linalg.inv(c)) if cov == "full" else 1.0 / np.sqrt(c)
    model.precisions_cholesky.copy_(torch.from_numpy(chol))
    module = GaussianMixtureLightningModule(model, convergence_tolerance=0, covariance_regularization=1e-6,
                                            is_batch_training=False)
    trainer = GaussianMixture(k, covariance_type=cov, trainer_params={
        "max_epochs": max_iter, "enable_progress_bar": False, "accelerator": "gpu", "devices": 1}).trainer()
    trainer.fit(module, DataLoader(dataset_from_tensors(x), batch_size=len(x), collate_fn=collate_tensor))
    return int(module.current_epoch)


def fit_pomegranate(torch, x, init, cov, max_iter):
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    w, m, c = init
    dists = [Normal(torch.tensor(m[j], dtype=torch.float32), torch.tensor(c[j], dtype=torch.float32),
                    covariance_type=cov) for j in range(len(w))]
    model = GeneralMixtureModel(dists, priors=torch.tensor(w, dtype=torch.float32), max_iter=max_iter,
                                tol=-math.inf).cuda()
    model.fit(x)
    return max_iter


FITS = {"fastlvm": fit_fastlvm, "torchgmm": fit_torchgmm, "pomegranate": fit_pomegranate}


def timed(torch, fn, *args):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_iter = fn(torch, *args)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, n_iter


def main(argv=None):
    ap = argparse.ArgumentParser(description="GMM on one GPU: fastlvm beside torchgmm and pomegranate.")
    ap.add_argument("--quick", action="store_true", help="small cases, 5 iterations, one round")
    ap.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated libraries")
    ap.add_argument("--rounds", type=int, default=3)
    args, _ = ap.parse_known_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU visible to torch; none is.")
    warnings.filterwarnings("ignore")
    rate = gemm_rate(torch)
    M = 5 if args.quick else 20
    rounds = 1 if args.quick else args.rounds
    print(f"device: {torch.cuda.get_device_name()}; float32 GEMM {rate / 1e12:.1f} TFLOP/s (torch.matmul 8192^3)")
    print(f"{'case':<8}{'library':<13}{'ms/iter':>10}{'% of GEMM':>11}  note")
    rng = np.random.default_rng(0)
    for name, n, d, k, cov in QUICK if args.quick else CASES:
        host = (rng.normal(size=(n, d)) + rng.integers(0, 4, size=(n, 1))).astype(np.float32)
        x = torch.from_numpy(host).cuda()
        init = initial(rng, k, d, cov, host)
        for lib in [s.strip() for s in args.libs.split(",") if s.strip() in FITS]:  # GPU libraries only
            try:
                per_iter = []
                timed(torch, FITS[lib], x, init, cov, 1)  # warm-up: JIT compiles, CUDA context
                for _ in range(rounds):
                    t1, _ = timed(torch, FITS[lib], x, init, cov, 1)
                    tm, n_iter = timed(torch, FITS[lib], x, init, cov, M)
                    per_iter.append((tm - t1) / max(1, n_iter - 1))
                t = statistics.median(per_iter)
                frac = flop_per_iter(n, d, k, cov) / t / rate
                print(f"{name:<8}{lib:<13}{t * 1e3:>10.2f}{100 * frac:>10.1f}%  N={n} D={d} K={k} {cov}")
            except Exception as err:  # noqa: BLE001  (a peer that fails is left out of the table)
                print(f"{name:<8}{lib:<13}{'-':>10}{'-':>11}  failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
