"""The latent-space terms (InfoVAE's MMD, VQ-VAE's vector quantisation) against plain PyTorch,
eager and compiled, and vector-quantize-pytorch, measured in one run.

Cases (float32, forward + backward):
  vq   fastlvm.functional.vector_quantize, B=32768 vectors, Dz=64, M=1024 codes (search: 2 B M Dz
       FLOP, reported as a fraction of this machine's GEMM rate, measured here);
  mmd  fastlvm.functional.mmd against in-kernel N(0, I) draws, B=4096, Dz=32.
Peers: the plain-PyTorch version (distance matrices through the norms, argmin / kernel matrices,
straight-through and stop-gradients by detach) run eagerly and through torch.compile, and for vq
vector_quantize_pytorch.VectorQuantize with its codebook learned by the loss (ema_update=False,
the same objective; its commitment weight 0.25).

Times are the best and median of interleaved rounds (contenders timed round-robin, so a noisy
shared machine slows them alike). Peak memory beyond inputs and outputs: large blocks are made to
go back to the system when freed (glibc mallopt), and a thread samples the process's resident set
during one call; the peak minus the resident set before it (which holds the call's inputs: z, the
codebook and the gradient standing in for the decoder's), minus the outputs and gradients the call
leaves, is the extra memory. (A sampler misses peaks shorter than its period, ~0.2 ms.)

    python bench/bench_latent.py [--rounds 10] [--threads N] [--no-compile] [--quick]
"""

import argparse
import ctypes
import statistics
import threading
import time

import torch

import fastlvm.functional as F
from bench_vae import race  # the round-robin timer of the objective's benchmark


def _keep_freed_memory_out():
    """Blocks of 128 KiB and more are mmapped and returned on free: the resident set is live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixes it: no dynamic raise)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:  # pragma: no cover - not glibc
        pass


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_extra(fn, inputs, output_bytes):
    """Peak resident bytes of one call fn(*inputs) beyond those before it (the inputs among them)
    and the outputs it leaves."""
    import gc

    gc.collect()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    keep = fn(*inputs)
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    del keep
    return max(0, peak[0] - base - output_bytes)


def gemm_gflops(n=2048, repeats=3):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- plain PyTorch


def eager_vq(z, codebook, commitment=0.25):
    d2 = (z * z).sum(1, keepdim=True) - 2 * z @ codebook.t() + (codebook * codebook).sum(1)
    codes = d2.argmin(1)
    e = codebook[codes]
    loss = ((z.detach() - e) ** 2).sum(1).mean() + commitment * ((z - e.detach()) ** 2).sum(1).mean()
    return z + (e - z).detach(), codes, loss


def eager_mmd(z, prior, c):
    def k(a, b):
        d2 = ((a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1)).clamp_min(0)
        return c / (c + d2)

    n, m = z.shape[0], prior.shape[0]
    kzz, kpp = k(z, z), k(prior, prior)
    return ((kzz.sum() - kzz.diagonal().sum()) / (n * (n - 1)) + (kpp.sum() - kpp.diagonal().sum()) / (m * (m - 1))
            - 2 * k(z, prior).mean())


# ----------------------------------------------------------------------------- cases


def vq_case(B, D, M, compile_peers):
    """(contenders, make_inputs, output bytes, search FLOPs): a contender takes the inputs that
    make_inputs() returns, fresh leaves z (B, D) and codebook (M, D) and the gradient that stands in
    for the decoder's on z_q, and runs forward + backward."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(B, D, generator=g)
    cb0 = torch.randn(M, D, generator=g)
    w = torch.randn(B, D, generator=g)

    def make_inputs():
        return z0.clone().requires_grad_(), cb0.clone().requires_grad_(), w

    def step(fn):
        def run(z, cb, grad_z_q):
            z_q, codes, loss = fn(z, cb)
            torch.autograd.backward((z_q, loss), (grad_z_q, None))
            return z_q, codes, z.grad, cb.grad
        return run

    contenders = {"fastlvm": step(lambda z, cb: F.vector_quantize(z, cb)), "eager": step(eager_vq)}
    if compile_peers:
        contenders["compiled"] = step(torch.compile(eager_vq))
    try:
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=D, codebook_size=M, decay=0.0, commitment_weight=0.25, ema_update=False,
                            learnable_codebook=True)
        with torch.no_grad():
            vq.codebook.copy_(cb0) if hasattr(vq, "codebook") and isinstance(vq.codebook, torch.Tensor) else None

        def lucid(z, cb, grad_z_q):  # its own codebook parameter stands in for cb
            z_q, codes, loss = vq(z[None])
            torch.autograd.backward((z_q[0], loss.sum()), (grad_z_q, None))
            return z_q, codes, z.grad

        contenders["vector-quantize-pytorch"] = lucid
    except ImportError:
        print("vector-quantize-pytorch is not installed: pip install vector-quantize-pytorch (make bench does)")
    out_bytes = B * D * 4 * 2 + B * 8 + M * D * 4
    return contenders, make_inputs, out_bytes, 2.0 * B * M * D


def mmd_case(B, D, compile_peers):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(B, D, generator=g) * 0.8 + 0.1
    c = 2.0 * D

    def make_inputs():
        return (z0.clone().requires_grad_(),)

    def fast(z):
        F.mmd(z).backward()
        return z.grad

    def plain(fn):
        def run(z):
            fn(z, torch.randn(B, D), c).backward()
            return z.grad
        return run

    contenders = {"fastlvm": fast, "eager": plain(eager_mmd)}
    if compile_peers:
        contenders["compiled"] = plain(torch.compile(eager_mmd))
    return contenders, make_inputs, B * D * 4, None


def memory_of(case, contender, argv):
    """peak_extra of one contender of a case, in a fresh process with freed memory returned."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, __file__, *argv, "--memory", case, contender]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return float("nan")


def report(name, case, contenders, make_inputs, out_bytes, flops, rounds, gflops, argv):
    times = race({k: (lambda run=run: run(*make_inputs())) for k, run in contenders.items()}, torch.device("cpu"),
                 rounds)
    memory = {k: memory_of(case, k, argv) for k in contenders}
    best_fast = times["fastlvm"][0]
    print(f"\n{name}")
    for k, v in times.items():
        line = (f"  {k:<24} best {v[0] * 1e3:8.1f} ms  median {statistics.median(v) * 1e3:8.1f} ms  "
                f"fastlvm {v[0] / best_fast:5.2f}x faster  extra memory {memory[k] / 2**20:7.1f} MB")
        if flops:
            line += f"  search {flops / v[0] / 1e9:6.1f} GFLOP/s = {flops / v[0] / 1e9 / gflops:4.0%} of GEMM"
        print(line)
    if memory.get("eager"):
        print(f"  fastlvm's extra memory: {memory['fastlvm'] / memory['eager']:.1%} of eager's")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    ap.add_argument("--memory", nargs=2, metavar=("CASE", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 8 if args.quick else 1
    cases = {"vq": lambda: vq_case(32768 // scale, 64, 1024 // scale, not args.no_compile),
             "mmd": lambda: mmd_case(4096 // scale, 32, not args.no_compile)}
    if args.memory:
        _keep_freed_memory_out()
        contenders, make_inputs, out_bytes, _ = cases[args.memory[0]]()
        fn = contenders[args.memory[1]]
        fn(*make_inputs())  # compile / warm up; the measured call comes after
        print(peak_extra(fn, make_inputs(), out_bytes))
        return
    passed = [a for a in (argv if argv is not None else __import__("sys").argv[1:])]
    gflops = gemm_gflops(1024 if args.quick else 2048)
    print(f"threads {torch.get_num_threads()}, float32 GEMM {gflops:.0f} GFLOP/s (measured)")
    report(f"vector_quantize B={32768 // scale} Dz=64 M={1024 // scale}, forward + backward", "vq",
           *cases["vq"](), args.rounds, gflops, passed)
    report(f"mmd B={4096 // scale} Dz=32 (imq, prior drawn), forward + backward", "mmd",
           *cases["mmd"](), args.rounds, gflops, passed)


if __name__ == "__main__":
    main()
