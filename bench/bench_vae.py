"""The fused VAE objective against plain PyTorch, eager and compiled, measured in one run.

Cases (float32):
  elbo  forward + backward of reparameterize + gaussian_log_likelihood (learned per-pixel
        variance), B=4096, Dx=784, Dz=32; the decoder is stood in for by a fixed gradient
        for z. fastlvm twice: the per-term functions with loss = mean(kl - ll), and the
        loss-level ``negative_elbo`` whose reduction is inside the kernel.
  iwae  forward + backward of -mean(iwae_bound), S=1000, B=256, Dz=32.
Peers: the reference (fastlvm/reference/vae.py) run eagerly, and torch.compile of it.
fastlvm runs on the C++ kernels' ISA clone in use (FASTLVM_ISA, or the widest this CPU runs)
and, as extra contenders marked [isa], on every other clone this CPU runs, so both paths are
measured on one machine. The machine (fastlvm.show_config and its measured limits,
bench/machine.py) is printed first.

For each case it prints the time (best and median of interleaved rounds: all contenders are
timed round-robin so that a noisy, shared machine slows them alike), the ratios, and the
fraction of this machine's parallel copy bandwidth: torch's (multi-threaded) copy moving as
many bytes as the case (read + write) runs as one more contender in the same rounds, so the
fraction is its best time over the contender's. (A working set of tens of MB may stay in a
large last-level cache, and then so do the case's inputs: the copy of the same size is the
fair ceiling. The copy rate for 1 GiB, i.e. memory, is printed too.) The objective's bytes
count each input read once and each output and gradient written once: what a single fused
pass must move.

Every contender allocates its outputs and gradients afresh each step. glibc returns large
freed blocks to the system, so each step also pays page faults (the kernel zeroing the pages)
on those tens of MB; ``--keep-freed-memory`` sets glibc's mmap and trim thresholds (mallopt)
so that freed memory is reused, as a caching allocator (jemalloc, tcmalloc) would.

    python bench/bench_vae.py [--device cuda] [--rounds 30] [--threads N] [--no-compile]
                              [--keep-freed-memory] [--machine FILE] [--quick-machine]
"""

import argparse
import json
import statistics
import time

import torch

import fastlvm.functional as F
import machine
from fastlvm import _C
from fastlvm.reference import vae as ref


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copier(device, nbytes):
    """A torch (multi-threaded) copy that moves ``nbytes``, read + write."""
    src = torch.ones(max(nbytes // 8, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(device, nbytes, repeats=10):
    """Bytes per second of the copier's best run."""
    copy = copier(device, nbytes)
    copy()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        copy()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def race(contenders, device, rounds, warmup=3):
    """{name: sorted seconds}, timing the contenders round-robin."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts) for name, ts in times.items()}


def elbo_case(device, dtype, batch=4096, dx=784, dz=32):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        t = (scale * torch.randn(*shape, generator=g, dtype=dtype)).to(device)
        return t.requires_grad_(grad)

    mu, lv_z = rand(batch, dz, grad=True), rand(batch, dz, scale=0.1, grad=True)
    eps, grad_z = rand(batch, dz), rand(batch, dz)
    x = torch.rand(batch, dx, generator=g, dtype=dtype).to(device)
    mean, lv_x = rand(batch, dx, grad=True), rand(batch, dx, scale=0.1, grad=True)
    params = (mu, lv_z, mean, lv_x)

    def reference_loss(mu, lv_z, eps, x, mean, lv_x):
        z = ref.reparameterize(mu, lv_z, eps)
        kl = ref.kl_standard_normal(mu, lv_z)
        return (kl - ref.gaussian_log_likelihood(x, mean, lv_x)).mean(), z

    def per_term(mu, lv_z, eps, x, mean, lv_x):
        z, kl = F.reparameterize(mu, lv_z, eps)
        return (kl - F.gaussian_log_likelihood(x, mean, lv_x)).mean(), z

    def loss_level(mu, lv_z, eps, x, mean, lv_x):
        z, kl = F.reparameterize(mu, lv_z, eps)
        return F.negative_elbo(x, kl, mean=mean, logvar=lv_x), z

    def step(loss_fn):
        def run():
            loss, z = loss_fn(mu, lv_z, eps, x, mean, lv_x)
            return torch.autograd.grad([loss, z], params, [None, grad_z])
        return run

    impls = {"fastlvm per-term": per_term, "fastlvm negative_elbo": loss_level,
             "torch eager": reference_loss, "torch.compile": reference_loss}
    n_in = 3 * batch * dx + 3 * batch * dz          # x, mean, lv_x; mu, lv_z, eps
    n_out = 2 * batch * dx + 3 * batch * dz + batch  # grads of mean, lv_x, mu, lv_z; z; loss rows
    return impls, step, (n_in + n_out) * dtype.itemsize


def iwae_case(device, dtype, samples=1000, batch=256, dz=32):
    g = torch.Generator(device="cpu").manual_seed(1)
    lpx = (-90.0 + torch.randn(samples, batch, generator=g, dtype=dtype)).to(device)
    lpx.requires_grad_(True)
    mu = torch.randn(batch, dz, generator=g, dtype=dtype).to(device).requires_grad_(True)
    lv = (0.1 * torch.randn(batch, dz, generator=g, dtype=dtype)).to(device).requires_grad_(True)
    eps = torch.randn(samples, batch, dz, generator=g, dtype=dtype).to(device)
    params = (lpx, mu, lv)

    def step(bound_fn):
        def run():
            return torch.autograd.grad(-bound_fn(lpx, mu, lv, eps).mean(), params)
        return run

    impls = {"fastlvm": F.iwae_bound, "torch eager": ref.iwae_bound,
             "torch.compile": ref.iwae_bound}
    n_in = samples * batch * dz + samples * batch + 2 * batch * dz
    n_out = batch + samples * batch + 2 * batch * dz
    return impls, step, (n_in + n_out) * dtype.itemsize


COPY = "copy (same bytes)"
# The targets for the loss-level objective (elbo case).
TARGETS = {"copy": 0.70, "compile": 1.5, "eager": 8.0}


def on_clone(isa, fn):
    """fn run on the C++ kernels' clone `isa`, then back to the clone in use."""
    def run():
        before = _C.isa()
        _C.set_isa(isa)
        try:
            return fn()
        finally:
            _C.set_isa(before)
    return run


def other_clones(contenders):
    """A contender [isa] per other ISA clone this CPU runs, for fastlvm's loss-level entry."""
    extra = {}
    for isa in _C.isa_supported():
        if isa == _C.isa():
            continue
        for label, fn in contenders.items():
            if label in ("fastlvm negative_elbo", "fastlvm"):
                extra[f"{label} [{isa}]"] = on_clone(isa, fn)
    return extra


def run_case(name, case, device, dtype, rounds, compile_peer):
    impls, step, nbytes = case(device, dtype)
    contenders = {}
    for label, fn in impls.items():
        if label == "torch.compile":
            if not compile_peer:
                continue
            fn = torch.compile(fn)
        contenders[label] = step(fn)
    if device.type == "cpu":
        contenders.update(other_clones(contenders))
    t0 = time.perf_counter()
    for label, fn in contenders.items():  # compile (and check it runs) outside the timing
        fn()
    setup = time.perf_counter() - t0
    # The ceiling runs in the same rounds, so that the machine's noise hits it alike.
    contenders[COPY] = copier(device, nbytes)
    times = race(contenders, device, rounds)
    best = {label: ts[0] for label, ts in times.items()}
    print(f"\n{name}: {nbytes / 1e6:.1f} MB moved at best; the copy moving as many bytes "
          f"ran at {nbytes / best[COPY] / 1e9:.1f} GB/s (setup incl. compile {setup:.0f} s)")
    print(f"  {'':32s} {'best ms':>8s} {'median ms':>10s} {'vs eager':>9s} {'vs compile':>11s} "
          f"{'of copy bw':>11s}")
    rows = []
    for label, ts in times.items():
        vs_eager = best["torch eager"] / ts[0]
        vs_comp = best["torch.compile"] / ts[0] if "torch.compile" in best else float("nan")
        frac = best[COPY] / ts[0]
        print(f"  {label:32s} {ts[0] * 1e3:8.2f} {statistics.median(ts) * 1e3:10.2f} "
              f"{vs_eager:8.2f}x {vs_comp:10.2f}x {frac:10.0%}")
        rows.append({"case": name, "impl": label, "best_s": ts[0],
                     "median_s": statistics.median(ts), "speedup_vs_eager": vs_eager,
                     "speedup_vs_compile": vs_comp, "fraction_of_copy_bandwidth": frac})
    for r in rows:
        if r["impl"].startswith("fastlvm negative_elbo"):
            checks = [(r["fraction_of_copy_bandwidth"], TARGETS["copy"], "of copy bw"),
                      (r["speedup_vs_compile"], TARGETS["compile"], "vs compile"),
                      (r["speedup_vs_eager"], TARGETS["eager"], "vs eager")]
            print(f"  targets, {r['impl']}: " + ", ".join(
                f"{what} {got:.2f} >= {want:g}: {'met' if got >= want else 'NOT met'}"
                for got, want, what in checks))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per contender")
    parser.add_argument("--cases", default="elbo,iwae", help="comma-separated: elbo, iwae")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for everyone (torch.set_num_threads, which the "
                             "OpenMP kernels of fastlvm._C follow too); default: all")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="reuse freed memory (glibc mallopt) instead of page-faulting afresh")
    parser.add_argument("--machine", help="bench/machine.py --json output (else measured now)")
    parser.add_argument("--quick-machine", action="store_true",
                        help="measure the machine's limits on small sizes")
    args = parser.parse_args(argv)
    if args.machine:
        with open(args.machine) as f:
            print(machine.describe(json.load(f)))
    else:
        print(machine.describe(machine.measure(quick=args.quick_machine)))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    dram = copy_bandwidth(device, 2**30)
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    isa = f"C++ ISA path {_C.isa()}, " if device.type == "cpu" else ""
    print(f"device {device}, {args.dtype}, {isa}threads {threads}, load average {_load()}, "
          f"freed memory {'kept' if args.keep_freed_memory else 'returned (glibc default)'}; "
          f"copy bandwidth for 1 GiB moved: {dram / 1e9:.1f} GB/s")
    cases = {"elbo": elbo_case, "iwae": iwae_case}
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, cases[name], device, dtype, args.rounds, not args.no_compile)
    print(f"\nload average at the end {_load()} (other processes share this machine's cores)")
    return rows


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of unmapping it (Linux/glibc only)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = (libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**31 - 1)
          and libc.mallopt(m_top_pad, 256 * 2**20))
    if not ok:
        raise RuntimeError("mallopt refused the thresholds")


def _load():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
