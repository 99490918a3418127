"""Where one E+M pass of the diag type spends its time: the GMM kernel's helpers (fastlvm.kernels.cpu)
timed cumulatively, single-threaded, over N rows in sub-chunks as the driver runs them.

    python bench/gmm_pass_parts.py [--n 200704] [--d 32] [--k 16] [--dtype float32]

Prints the milliseconds of: the rows' squares and transposition, the E-step products and log
densities, the normalisation (exp, log-sum-exp), and the M-step's sums.
"""

import argparse
import time

import numpy as np
from numba import njit

from fastlvm.kernels import cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200704)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    N, D, K = args.n, args.d, args.k
    dt = np.dtype(args.dtype)
    sub = cpu.sub_rows(dt.itemsize)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D)).astype(dt)
    centre = X.mean(axis=0).astype(dt)
    W = -(-2 * D // cpu.PAD) * cpu.PAD
    Wt = np.zeros((W, K), dtype=dt)
    Wt[: 2 * D] = rng.normal(size=(2 * D, K)) * 0.1
    base = rng.normal(size=K)  # the log-probabilities' constants

    scratch = cpu._scratch(cpu.DIAG, dt, K, D, 0, W, 1)

    @njit(nogil=True, fastmath=cpu._FASTMATH)
    def parts(X, centre, Wt, base, upto, scratch):
        _, _, aa, _, logp, resp, row_ll, best, top, tot, _, mom = cpu._worker(scratch, 0)
        n, s, second = np.zeros(K), np.zeros((K, D)), np.zeros((K, 1, D))
        for r0 in range(0, X.shape[0] - sub + 1, sub):
            if upto == 1:
                cpu._squares_and_rows(True, X, r0, sub, centre, aa)
            if upto >= 2:  # the squares again, then the product
                cpu._log_prob_vector(True, X, r0, sub, base, centre, Wt, aa, logp)
            if upto >= 3:
                cpu._normalise(logp, sub, False, False, resp, row_ll, best, top, tot)
            if upto >= 4:
                # the next sub-chunk's rows requested among the M-step's products, as the driver does
                lo, hi = (r0 + sub) * X.strides[0], min(X.shape[0], r0 + 2 * sub) * X.strides[0]
                cpu._accumulate_vector(True, sub, resp, False, best, n, s, second, aa, mom, X, lo, hi)
        return n

    times = {u: [] for u in range(5)}
    for u in range(5):
        parts(X, centre, Wt, base, u, scratch)
    for _ in range(args.repeats):
        for u in range(5):
            t = time.perf_counter()
            parts(X, centre, Wt, base, u, scratch)
            times[u].append(time.perf_counter() - t)
    ms = [1e3 * min(times[u]) for u in range(5)]
    names = ["squares and transposition", "E-step products and log densities", "normalisation (exp)",
             "M-step sums"]
    print(f"diag {args.dtype} N={N} D={D} K={K}, one thread, best of {args.repeats}:")
    for u, name in enumerate(names, start=1):
        print(f"  {name:36s} {ms[u] - ms[u - 1]:7.2f} ms")
    print(f"  {'total':36s} {ms[4] - ms[0]:7.2f} ms")


if __name__ == "__main__":
    main()
