"""EM for Gaussian mixtures (and Lloyd's k-means), fastlvm beside its peers, in one run.

Every library fits the same synthetic data from the same initial parameters with tol=0,
so all of them do the same EM iterations; the table checks that by printing each fit's
final mean log-likelihood (scored by scikit-learn from the fitted parameters).

Each (case, library) runs in its own subprocess, so that peak memory can be read from
the process's RSS high-water mark and libraries do not share thread pools:
  1. warm-up fit on tiny data of the same dimensions (numba / JIT compile excluded),
  2. the data are made; the RSS then is the baseline,
  3. in rounds, each library in turn (order rotated, so all see the same background
     load of a shared machine) fits max_iter=1 then max_iter=M (M = 20, or fewer if
     20 would take longer than --fit-cap seconds; the table says so); the first pair
     runs with the RSS high-water mark reset: peak extra memory = peak - baseline,
  4. per-iteration time = (T(M) - T(1)) / (n_iter(M) - 1), the median over rounds:
     fixed costs (validation, set-up, sklearn's final E-step, Lightning's trainer) cancel.

    python bench/bench_gmm.py [--quick] [--cases full-f32,kmeans] [--libs fastlvm,sklearn]
    python bench/bench_gmm.py --device cuda   (the GPU table: bench/gmm_cuda.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARIES = ("fastlvm", "sklearn", "pomegranate", "torchgmm")
SEED = 20240611


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    k: int
    cov: str  # "full", "tied", "diag", "spherical", or "kmeans"
    dtype: str
    max_iter: int = 20
    target: float = 0.0  # wanted speed-up over scikit-learn (AVX2)
    target_avx512: float = 0.0  # the same where the kernel may use AVX-512 (0: as on AVX2)

    @property
    def flop_per_iter(self) -> float:
        # full: E-step X P_k and M-step sum r x x^T, 2 N K D^2 each; tied: X P and the scatter x x^T,
        # 2 N D^2 each, plus 4 N K D; diag, spherical: 4 N K D (stated in the table)
        if self.cov == "full":
            return 4.0 * self.n * self.k * self.d**2
        if self.cov == "tied":
            return 4.0 * self.n * self.d**2 + 4.0 * self.n * self.k * self.d
        return 4.0 * self.n * self.k * self.d


CASES = (
    Case("full-f32", 200_000, 32, 16, "full", "float32", target=8, target_avx512=10),
    Case("full-f64", 200_000, 32, 16, "full", "float64", target=8, target_avx512=10),
    Case("diag-f32", 200_000, 32, 16, "diag", "float32", target=8),
    Case("diag-f64", 200_000, 32, 16, "diag", "float64", target=8),
    Case("diag-f32-2M", 2_000_000, 32, 64, "diag", "float32", target=8),
    Case("tied-f32", 200_000, 32, 16, "tied", "float32"),
    Case("spherical-f32", 200_000, 32, 16, "spherical", "float32"),
    Case("kmeans", 200_000, 32, 16, "kmeans", "float32"),
)
MEMORY_TARGET_MB = 96.0


def quick_case(c: Case) -> Case:
    return Case(c.name, max(c.n // 20, 5_000), c.d, c.k, c.cov, c.dtype, max_iter=5, target=c.target,
                target_avx512=c.target_avx512)


def numba_isa() -> str:
    """The CPU Numba compiles the kernels for (NUMBA_CPU_NAME when set: bench/run.py sets it and
    NUMBA_CPU_FEATURES to time each path, else the host's) and whether their vectors are AVX-512's
    (the features decide that: NUMBA_CPU_NAME=haswell alone leaves an AVX-512 host's features on)."""
    import llvmlite.binding as ll

    from fastlvm.kernels.simd import target_has_avx512

    name = os.environ.get("NUMBA_CPU_NAME") or ll.get_host_cpu_name()
    return f"{name} ({'AVX-512' if target_has_avx512() else 'AVX2 or older'})"


def target_of(case: Case, isa: str) -> float:
    return case.target_avx512 if "AVX-512" in isa and case.target_avx512 else case.target


# ---------------------------------------------------------------------------------------
# Data and initial parameters (the same in every subprocess: fixed seeds)


def make_data(n, d, k, dtype, seed=SEED, spread=1.0):
    """n rows from a mixture of k Gaussians with random full covariances, written in chunks
    so that no float64 copy of the whole array stays alive."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 5.0))
    means = rng.normal(0.0, spread, (k, d))
    mix = np.eye(d) + rng.normal(0.0, 0.3 / math.sqrt(d), (k, d, d))  # x = mean + mix @ z
    labels = rng.choice(k, size=n, p=weights)
    x = np.empty((n, d), dtype=dtype)
    step = 65_536
    for lo in range(0, n, step):
        lab = labels[lo : lo + step]
        z = rng.standard_normal((lab.size, d))
        x[lo : lo + step] = means[lab] + np.einsum("nij,nj->ni", mix[lab], z)
    return x


def initial_parameters(x, k, cov, seed=SEED + 1):
    """Uniform weights, k distinct data rows as means, the data's per-feature variance as
    every component's (diagonal) covariance, in sklearn's conventions and the data's dtype
    (float64 initial parameters would make scikit-learn run a float32 fit in float64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(x.shape[0], size=k, replace=False))
    means = x[idx].astype(np.float64)
    var = x.var(axis=0, dtype=np.float64)
    weights = np.full(k, 1.0 / k)
    if cov == "full":
        covariances = np.repeat(np.diag(var)[None], k, axis=0)
        precisions = np.repeat(np.diag(1.0 / var)[None], k, axis=0)
    elif cov == "tied":
        covariances, precisions = np.diag(var), np.diag(1.0 / var)
    elif cov == "spherical":
        covariances = np.full(k, var.mean())
        precisions = 1.0 / covariances
    else:
        covariances = np.repeat(var[None], k, axis=0)
        precisions = 1.0 / covariances
    params = {"weights": weights, "means": means, "covariances": covariances, "precisions": precisions}
    return {name: value.astype(x.dtype) for name, value in params.items()}


def precision_cholesky(covariances, cov):
    """sklearn's convention: upper-triangular U with precision = U U^T."""
    import numpy as np
    from scipy.linalg import solve_triangular

    covariances = np.asarray(covariances, dtype=np.float64)
    if cov == "diag":
        return 1.0 / np.sqrt(covariances)
    eye = np.eye(covariances.shape[-1])
    return np.stack([solve_triangular(np.linalg.cholesky(c), eye, lower=True).T for c in covariances])


def mean_log_likelihood(x, params, cov):
    """Scored by scikit-learn, in float64, from (weights, means, precisions_cholesky)."""
    import numpy as np
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(len(params["weights"]), covariance_type=cov)
    gm.weights_ = np.asarray(params["weights"], dtype=np.float64)
    gm.means_ = np.asarray(params["means"], dtype=np.float64)
    gm.precisions_cholesky_ = np.asarray(params["precisions_cholesky"], dtype=np.float64)
    total, step = 0.0, 262_144
    for lo in range(0, x.shape[0], step):
        total += gm.score_samples(x[lo : lo + step].astype(np.float64)).sum()
    return total / x.shape[0]


# ---------------------------------------------------------------------------------------
# One adapter per library: prepare(x) -> native data; fit(data, max_iter) -> (params, n_iter)


class SklearnLike:
    """scikit-learn's estimators and fastlvm's (which share their API)."""

    def __init__(self, lib, case, init):
        self.case, self.init = case, init
        if lib == "sklearn":
            from sklearn.cluster import KMeans
            from sklearn.mixture import GaussianMixture
        else:
            from fastlvm import GaussianMixture, KMeans
        self.lib = lib
        self.GaussianMixture, self.KMeans = GaussianMixture, KMeans

    def prepare(self, x):
        return x

    def fit(self, x, max_iter):
        c, init = self.case, self.init
        if c.cov == "kmeans":
            kw = {"algorithm": "lloyd"} if self.lib == "sklearn" else {}
            km = self.KMeans(c.k, init=init["means"], n_init=1, max_iter=max_iter, tol=0.0, **kw)
            km.fit(x)
            return {"inertia": float(km.inertia_)}, int(km.n_iter_)
        gm = self.GaussianMixture(
            c.k,
            covariance_type=c.cov,
            tol=0.0,
            reg_covar=1e-6,
            max_iter=max_iter,
            weights_init=init["weights"],
            means_init=init["means"],
            precisions_init=init["precisions"],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 on purpose
            gm.fit(x)
        params = {"weights": gm.weights_, "means": gm.means_, "precisions_cholesky": gm.precisions_cholesky_}
        return params, int(gm.n_iter_)


class Pomegranate:
    """pomegranate 1.x GeneralMixtureModel of Normal distributions (torch inside)."""

    note = "no reg_covar"

    def __init__(self, lib, case, init):
        import torch
        from pomegranate.distributions import Normal
        from pomegranate.gmm import GeneralMixtureModel

        if case.cov == "kmeans":
            raise NotImplementedError("not benchmarked for k-means")
        self.torch, self.Normal, self.GMM = torch, Normal, GeneralMixtureModel
        self.case, self.init = case, init
        self.dt = getattr(torch, case.dtype)

    def prepare(self, x):
        return self.torch.from_numpy(x)

    def fit(self, x, max_iter):
        t, c, init = self.torch, self.case, self.init
        dists = [
            self.Normal(t.tensor(init["means"][j], dtype=self.dt), t.tensor(init["covariances"][j], dtype=self.dt),
                        covariance_type=c.cov)
            for j in range(c.k)
        ]
        # tol=-inf: pomegranate stops when the gain drops below tol, and a converged fit's
        # gain can be a rounding-level negative number
        model = self.GMM(dists, priors=t.tensor(init["weights"], dtype=self.dt), max_iter=max_iter, tol=-math.inf)
        model.fit(x)
        params = {
            "weights": model.priors.detach().numpy(),
            "means": t.stack([d.means.detach() for d in model.distributions]).numpy(),
            "precisions_cholesky": precision_cholesky(
                t.stack([d.covs.detach() for d in model.distributions]).numpy(), c.cov),
        }
        return params, max_iter


class TorchGMM:
    """torchgmm 0.1 (PyTorch Lightning). Its public fit() treats one full batch as
    mini-batch training (two epochs per EM iteration) and cannot take initial
    covariances, so its own model and EM module are driven directly, one epoch each."""

    note = "EM module driven directly"

    def __init__(self, lib, case, init):
        import logging

        import torch
        from torchgmm.base.data import DataLoader, collate_tensor, dataset_from_tensors
        from torchgmm.bayes import GaussianMixture
        from torchgmm.bayes.gmm.lightning_module import GaussianMixtureLightningModule
        from torchgmm.bayes.gmm.model import GaussianMixtureModel, GaussianMixtureModelConfig

        if case.cov == "kmeans":
            raise NotImplementedError("not benchmarked for k-means")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        self.torch, self.case, self.init = torch, case, init
        self.loader = lambda x: DataLoader(dataset_from_tensors(x), batch_size=len(x), collate_fn=collate_tensor)
        self.Module, self.Model, self.Config, self.Estimator = (
            GaussianMixtureLightningModule, GaussianMixtureModel, GaussianMixtureModelConfig, GaussianMixture)

    def prepare(self, x):
        return self.torch.from_numpy(x)

    def fit(self, x, max_iter):
        t, c, init = self.torch, self.case, self.init
        model = self.Model(self.Config(c.k, c.d, c.cov)).to(getattr(t, c.dtype))
        model.component_probs.copy_(t.from_numpy(init["weights"]))
        model.means.copy_(t.from_numpy(init["means"]))
        model.precisions_cholesky.copy_(t.from_numpy(precision_cholesky(init["covariances"], c.cov)))
        module = self.Module(model, convergence_tolerance=0, covariance_regularization=1e-6, is_batch_training=False)
        trainer_params = {"max_epochs": max_iter, "enable_progress_bar": False, "accelerator": "cpu", "devices": 1}
        if c.dtype == "float64":
            trainer_params["precision"] = "64-true"
        self.Estimator(c.k, covariance_type=c.cov, trainer_params=trainer_params).trainer().fit(module, self.loader(x))
        params = {
            "weights": model.component_probs.numpy(),
            "means": model.means.numpy(),
            "precisions_cholesky": model.precisions_cholesky.numpy(),
        }
        return params, int(module.current_epoch)


ADAPTERS = {"fastlvm": SklearnLike, "sklearn": SklearnLike, "pomegranate": Pomegranate, "torchgmm": TorchGMM}


# ---------------------------------------------------------------------------------------
# Memory: the RSS high-water mark, reset through /proc (Linux >= 4.0), else a sampling thread


def _rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak RSS while the block runs."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._thread = None
        except OSError:
            import psutil

            proc, self._stop, self._samples = psutil.Process(), threading.Event(), [0]

            def sample():
                while not self._stop.is_set():
                    self._samples.append(proc.memory_info().rss)
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = _rss_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._samples)
        return False


# ---------------------------------------------------------------------------------------
# Workers: one process per (case, library), driven in rounds so that the libraries of a
# case are timed interleaved, under the same background load of a shared machine.

PREFIX = "@@bench "  # marks protocol lines; libraries may print to stdout too
# Pause before each timed contender: BLAS and OpenMP worker threads spin for up to ~0.1 s after a
# parallel call, and threads left spinning by one library halved the next one's speed.
SETTLE_S = 0.3


def _send(obj):
    print(PREFIX + json.dumps(obj), flush=True)


def serve(case: Case, lib: str) -> None:
    """The worker: set up, then answer 'pair CAP' (time fit(1) and fit(M)) and 'finish'."""
    spread = 0.35 if case.cov == "kmeans" else 1.0  # overlapping clusters keep Lloyd iterating
    try:
        # warm-up on tiny data of the same dimensions and dtype: compiles numba / JIT paths
        small = make_data(max(2_000, 20 * case.k), case.d, case.k, case.dtype, seed=SEED + 7, spread=spread)
        adapter = ADAPTERS[lib](lib, case, initial_parameters(small, case.k, case.cov))
        adapter.fit(adapter.prepare(small), 2)
        del small
        x = make_data(case.n, case.d, case.k, case.dtype, spread=spread)
        adapter.init = initial_parameters(x, case.k, case.cov)
        data = adapter.prepare(x)
    except (ImportError, NotImplementedError) as e:
        _send({"status": f"not run: {type(e).__name__}: {e}"})
        return
    gc.collect()
    baseline = _rss_bytes()
    _send({"status": "ready", "note": getattr(adapter, "note", "")})

    params, first = None, True
    for line in sys.stdin:
        command = line.split()
        if command and command[0] == "pair":
            # fit(1), then fit(M), M = max_iter unless that would take more than the cap
            # seconds (a slow peer on a large case): then as many iterations as fit the cap
            cap = float(command[1])
            out = {}
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                params_one, _ = adapter.fit(data, 1)
                out["one"] = time.perf_counter() - t0
                iters = case.max_iter
                if out["one"] * case.max_iter > cap:
                    iters = min(case.max_iter, int(cap / out["one"]))
                if iters >= 2:
                    t0 = time.perf_counter()
                    params, out["n_iter"] = adapter.fit(data, iters)
                    out["full"] = time.perf_counter() - t0
                else:  # fit(1) alone took over half the cap: it stands for one iteration, an upper bound
                    params, out["n_iter"], out["full"] = params_one, 1, out["one"]
            if first:
                out["peak_extra_mb"] = (peak.peak - baseline) / 2**20
                first = False
            _send(out)
        elif line.strip() == "finish":
            if case.cov == "kmeans":
                _send({"inertia_per_row": params["inertia"] / case.n})
            else:
                _send({"loglik": mean_log_likelihood(x, params, case.cov)})
            return


class Worker:
    """The parent's handle on one serve() subprocess."""

    def __init__(self, case: Case, lib: str, timeout: float):
        import tempfile

        self.lib, self.timeout = lib, timeout
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        spec = json.dumps({"case": asdict(case), "lib": lib})
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def ask(self, command=None) -> dict:
        import selectors

        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=deadline - time.monotonic()):
                break
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.err.seek(0)
                tail = (self.err.read().strip().splitlines() or ["no output"])[-1]
                self.close()
                raise RuntimeError(f"failed (exit {self.proc.returncode}): {tail[:160]}")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        self.close()
        raise RuntimeError(f"timed out after {self.timeout:.0f} s")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.err.close()


def run_case(case: Case, libs, timeout: float, budget_s: float, max_rounds: int, fit_cap: float) -> list[dict]:
    """All libraries of one case: set up side by side, then timed in rounds (order rotated
    each round) until max_rounds or the case's time budget is spent; at least one round."""
    results, workers = {}, {}
    for lib in libs:
        results[lib] = {"case": case.name, "lib": lib, "per_iter": [], "full": []}
        workers[lib] = Worker(case, lib, timeout)
    for lib, w in list(workers.items()):
        try:
            reply = w.ask()
        except RuntimeError as e:
            reply = {"status": str(e)}
        if reply["status"] != "ready":
            results[lib]["status"] = reply["status"]
            w.close()
            del workers[lib]
        else:
            results[lib].update(status="ok", note=reply["note"])
    started = time.perf_counter()
    for rnd in range(max_rounds):
        # a round whose T(M) <= T(1) (noise won) is discarded, so such a library earns another
        unsettled = any(not any(t > 0 for t in results[lib]["per_iter"]) for lib in workers)
        if rnd and time.perf_counter() - started > budget_s and not unsettled:
            break
        order = list(workers)[rnd % max(len(workers), 1):] + list(workers)[: rnd % max(len(workers), 1)]
        for lib in order:
            r = results[lib]
            time.sleep(SETTLE_S)  # the previous contender's spinning BLAS/OpenMP threads time out
            try:
                pair = workers[lib].ask(f"pair {fit_cap}")
            except RuntimeError as e:
                r["status"] = str(e)
                del workers[lib]
                continue
            if "peak_extra_mb" in pair and "peak_extra_mb" not in r:
                r["peak_extra_mb"] = pair["peak_extra_mb"]
            r["n_iter"] = pair["n_iter"]
            r["full"].append(pair["full"])
            if pair["n_iter"] >= 2:
                r["per_iter"].append((pair["full"] - pair["one"]) / (pair["n_iter"] - 1))
            else:  # too slow for a second fit: the whole fit(1), fixed costs and all
                r["per_iter"].append(pair["one"])
            print(f"[bench_gmm] {case.name:<12} {lib:<12} round {rnd + 1}: fit({pair['n_iter']}) {pair['full']:.2f} s, "
                  f"fit(1) {pair['one']:.2f} s", file=sys.stderr, flush=True)
    for lib, w in workers.items():
        try:
            results[lib].update(w.ask("finish"))
        except RuntimeError as e:
            results[lib]["status"] = str(e)
        w.close()
    for r in results.values():
        valid = [t for t in r["per_iter"] if t > 0]
        if r["status"] == "ok" and not valid:
            r["status"] = f"lost in noise: T(M) <= T(1) in all {len(r['per_iter'])} rounds; rerun on a quieter machine"
        elif r["status"] == "ok":
            r["s_per_iter"] = statistics.median(valid)
            r["fit_s"] = statistics.median(r["full"])
            r["rounds"] = f"{len(valid)}/{len(r['per_iter'])}"
    return list(results.values())


# ---------------------------------------------------------------------------------------
# The table


def _fmt_time(s):
    return f"{s * 1e3:8.1f} ms" if s < 10 else f"{s:8.2f} s "


def format_tables(results: list[dict], cases, machine: dict, load=None, isa="") -> str:
    gemm = machine["gemm_gflops"]
    lines = [f"Numba kernels compiled for: {isa}"] if isa else []
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    for case in cases:
        rows = by_case.get(case.name)
        if not rows:
            continue
        ref = next((r for r in rows if r["lib"] == "sklearn" and r["status"] == "ok"), None)
        kind = {"full": "full covariance", "tied": "tied covariance", "diag": "diagonal covariance",
                    "spherical": "spherical covariance", "kmeans": "k-means (Lloyd)"}[case.cov]
        lines.append("")
        lines.append(f"== {case.name}: {kind}, N={case.n:,} D={case.d} K={case.k} {case.dtype}, "
                     f"{case.max_iter} iterations, tol=0 ==")
        if case.cov == "kmeans":
            lines.append(f"{'library':<12} {'per iter':>11} {'vs sklearn':>10} {'iters':>5} "
                         f"{'inertia/row':>12} {'peak extra':>10}  note")
        else:
            flop = {"full": "4NKD^2", "tied": "4ND^2 + 4NKD"}.get(case.cov, f"4NKD ({case.cov})")
            lines.append(f"{'library':<12} {'per iter':>11} {'vs sklearn':>10} {'GFLOP/s':>8} "
                         f"{'of GEMM':>7} {'iters':>5} {'loglik/row':>11} {'peak extra':>10}  note  "
                         f"[FLOP/iter = {flop} = {case.flop_per_iter / 1e9:.2f} G; "
                         f"GEMM {case.dtype} = {gemm[case.dtype]:.0f} GFLOP/s]")
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"{r['lib']:<12} {r['status']}")
                continue
            t = r["s_per_iter"]
            ratio = ref["s_per_iter"] / t if ref else float("nan")
            ratio_s = f"{ratio:9.1f}x" if ref else "-"
            note = r.get("note", "")
            capped = case.cov != "kmeans" and r["n_iter"] < case.max_iter
            if capped and r["n_iter"] == 1:
                note = "; ".join(filter(None, [note, "fit(1) alone took over half the fit cap: its time, an upper bound"]))
            elif capped:
                note = "; ".join(filter(None, [note, f"timed on {r['n_iter']} iterations (fit cap)"]))
            if r["lib"] == "fastlvm":
                marks = []
                target = target_of(case, isa)
                if target:
                    marks.append(f"target >= {target:g}x: {'met' if ratio >= target else 'NOT met'}")
                marks.append(f"memory <= {MEMORY_TARGET_MB:g} MB: "
                             f"{'met' if r['peak_extra_mb'] <= MEMORY_TARGET_MB else 'NOT met'}")
                note = "; ".join([m for m in [note] if m] + marks)
            mem = f"{r['peak_extra_mb']:7.0f} MB"
            if case.cov == "kmeans":
                lines.append(f"{r['lib']:<12} {_fmt_time(t)} {ratio_s:>10} {r['n_iter']:>5} "
                             f"{r['inertia_per_row']:12.5f} {mem:>10}  {note}")
            else:
                rate = case.flop_per_iter / t / 1e9 if t > 0 else float("nan")
                frac = rate / gemm[case.dtype]
                lines.append(f"{r['lib']:<12} {_fmt_time(t)} {ratio_s:>10} {rate:8.1f} {frac:7.1%} "
                             f"{r['n_iter']:>5} {'-' if capped else format(r['loglik'], '.5f'):>11} {mem:>10}  {note}")
    lines.append("")
    if load and load["before"][0] > 0.5 * (os.cpu_count() or 1):
        lines.append(f"WARNING: load average {load['before'][0]:.1f} on {os.cpu_count()} CPUs before the run: other "
                     "processes competed for the cores, so times are inflated and ratios unreliable.")
    if load:
        lines.append(f"load average (1 min) before / after: {load['before'][0]:.1f} / {load['after'][0]:.1f} "
                     f"on {os.cpu_count()} CPUs")
    lines.append("per iter: median over rounds (rounds where T(M) <= T(1) dropped) of (T(max_iter) - T(1)) / (n_iter - 1), warm (JIT compiled "
                 "beforehand); peak extra: RSS high-water mark during one fit minus RSS with the data loaded; "
                 "same data and initial parameters for every library; libraries interleaved round by round.")
    return "\n".join(lines)


def select_cases(spec: str | None, quick: bool):
    """--cases: comma-separated names or shell patterns (diag-*)."""
    from fnmatch import fnmatch

    cases = [quick_case(c) if quick else c for c in CASES]
    if spec:
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [w for w in wanted if not any(fnmatch(c.name, w) for c in cases)]
        if unknown:
            raise SystemExit(f"--cases: no case matches {unknown}; cases are {[c.name for c in CASES]}")
        cases = [c for c in cases if any(fnmatch(c.name, w) for w in wanted)]
    return cases


def measure_machine(quick: bool) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "machine.json")
        cmd = [sys.executable, os.path.join(HERE, "machine.py"), "--json", path] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        with open(path) as f:
            return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description="GMM / k-means benchmark: fastlvm beside its peers.")
    ap.add_argument("--quick", action="store_true", help="small N and 5 iterations, one round: a smoke run")
    ap.add_argument("--cases", help=f"comma-separated names or patterns among {[c.name for c in CASES]}")
    ap.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated libraries")
    ap.add_argument("--machine", help="machine.py --json output to divide by (else measured now)")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per case at most (default 3)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="no new round once a case has been timed this many seconds (default 60)")
    ap.add_argument("--fit-cap", type=float, default=75.0,
                    help="a library whose fit(max_iter) would take longer is timed on fewer iterations (default 75 s)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one worker may take for one answer")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU table (bench/gmm_cuda.py)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        sys.path.insert(0, HERE)
        from gmm_cuda import main as gpu_main

        return gpu_main(["--quick"] * args.quick + ["--libs", args.libs, "--rounds", str(args.rounds)])

    if args.worker:
        spec = json.loads(args.worker)
        serve(Case(**spec["case"]), spec["lib"])
        return None

    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    bad = [lib for lib in libs if lib not in LIBRARIES]
    if bad:
        raise SystemExit(f"--libs: unknown {bad}; choose from {list(LIBRARIES)}")
    cases = select_cases(args.cases, args.quick)
    if args.machine:
        with open(args.machine) as f:
            machine = json.load(f)
    else:
        machine = measure_machine(args.quick)
    rounds = 1 if args.quick else args.rounds
    isa = numba_isa()

    load_before = os.getloadavg()
    results = []
    for case in cases:
        # the peers are adapted for the full and diag types only
        case_libs = [lib for lib in libs if case.cov in ("full", "diag") or lib in ("fastlvm", "sklearn")]
        results += run_case(case, case_libs, args.timeout, args.budget, rounds, args.fit_cap)
    load = {"before": load_before, "after": os.getloadavg()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "load": load, "isa": isa,
                       "cases": [asdict(c) | {"target": target_of(c, isa)} for c in cases], "results": results}, f)
    print(format_tables(results, cases, machine, load, isa))
    return results


if __name__ == "__main__":
    main()
