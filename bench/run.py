"""The whole benchmark: this machine's ceilings, the GMM / k-means tables, the k-means peers table
(bench/bench_kmeans.py), the scale table (memmap and Dask fits, bench/bench_scale.py), then the VAE
tables (the objective, bench/bench_vae.py; fitting, bench/bench_vae_fit.py), printed as one report.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set in this environment, pin numpy's BLAS to
slower kernels. They are read when numpy loads, so every stage runs in a subprocess; the
machine is measured with them as they are and with both unset, and the benchmarks run with
both unset (the tests never change them).

    python bench/run.py [--quick] [--cases diag-*] [--skip-scale] [--skip-vae] [--vae-args "..."]
                        [--skip-vae-fit] [--vae-fit-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def without_openblas_vars() -> dict:
    return {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARS}


def stage(cmd, env, tmp, name) -> str:
    """Runs one stage: its progress (stderr) shows live, its stdout is returned."""
    out_path = os.path.join(tmp, name + ".out")
    print(f"[run] {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(out_path, "w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, cwd=os.path.dirname(HERE), check=False).returncode
    with open(out_path) as f:
        text = f.read()
    print(f"[run] {name}: done in {time.perf_counter() - t0:.0f} s (exit {rc})", file=sys.stderr, flush=True)
    if rc != 0:
        text += f"\n({name} exited with status {rc})"
    return text


def measure_machine(env, tmp, name, quick) -> dict | None:
    path = os.path.join(tmp, name + ".json")
    cmd = [sys.executable, os.path.join(HERE, "machine.py"), "--json", path] + (["--quick"] if quick else [])
    stage(cmd, env, tmp, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# The Numba code path timed besides the host's (AVX-512 where the CPU has it): AVX2 (haswell, with
# AVX-512 masked off). NUMBA_CPU_NAME / NUMBA_CPU_FEATURES pick Numba's target.
AVX2_ENV = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "-avx512f"}
GEMM_SHARE_TARGET = 0.60  # GMM full: wanted fraction of the measured GEMM rate
ISA_CASES = "full-f32,full-f64,diag-f32,diag-f64"  # timed again (with scikit-learn) on the other path


def host_cpu(env) -> tuple[str, bool]:
    """(the host CPU's LLVM name, whether it has AVX-512F), asked in a subprocess so that this process
    imports nothing heavy."""
    code = ("import llvmlite.binding as b; "
            "print(b.get_host_cpu_name(), int(bool(b.get_host_cpu_features().get('avx512f'))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False).stdout
    name, avx512 = (out.split() + ["?", "0"])[:2]
    return name, avx512 == "1"


def summary(gmm: dict) -> list[str]:
    """One line per case: fastlvm against scikit-learn and the fastest other peer."""
    gemm = gmm["machine"]["gemm_gflops"]
    lines = []
    for c in gmm["cases"]:
        rows = {r["lib"]: r for r in gmm["results"] if r["case"] == c["name"] and r.get("status") == "ok"}
        fast, ref = rows.get("fastlvm"), rows.get("sklearn")
        if not fast:
            lines.append(f"  {c['name']:<12} fastlvm did not run")
            continue
        t = fast["s_per_iter"]
        parts = [f"{t * 1e3:8.1f} ms/iter"]
        if ref:
            ratio = ref["s_per_iter"] / t
            target = f" (target {c['target']:g}x: {'met' if ratio >= c['target'] else 'NOT met'})" if c.get("target") else ""
            parts.append(f"{ratio:5.1f}x sklearn{target}")
        others = {k: v for k, v in rows.items() if k not in ("fastlvm", "sklearn")}
        if others:
            best = min(others, key=lambda k: others[k]["s_per_iter"])
            parts.append(f"{others[best]['s_per_iter'] / t:4.1f}x fastest other peer ({best})")
        if c["cov"] != "kmeans":
            flop = 4.0 * c["n"] * c["k"] * (c["d"] ** 2 if c["cov"] == "full" else c["d"])
            share = flop / t / 1e9 / gemm[c["dtype"]]
            goal = f" (target {GEMM_SHARE_TARGET:.0%}: {'met' if share >= GEMM_SHARE_TARGET else 'NOT met'})"
            parts.append(f"{share:5.1%} of GEMM" + (goal if c["cov"] == "full" else ""))
        parts.append(f"{fast['peak_extra_mb']:.0f} MB extra (target <= 96)")
        lines.append(f"  {c['name']:<12} " + ", ".join(parts))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description="The combined benchmark report.")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere: a smoke run")
    ap.add_argument("--cases", help="GMM cases to run (names or patterns, see bench_gmm.py --help)")
    ap.add_argument("--skip-scale", action="store_true", help="do not run bench/bench_scale.py")
    ap.add_argument("--skip-vae", action="store_true", help="do not run bench/bench_vae.py")
    ap.add_argument("--vae-args", default="", help="arguments for bench_vae.main, as one string")
    ap.add_argument("--skip-vae-fit", action="store_true", help="do not run bench/bench_vae_fit.py")
    ap.add_argument("--vae-fit-args", default="", help="arguments for bench_vae_fit.py, as one string")
    args = ap.parse_args(argv)

    clean = without_openblas_vars()
    set_vars = {k: os.environ[k] for k in OPENBLAS_VARS if k in os.environ}
    report = ["", "=" * 30 + " fastlvm benchmark report " + "=" * 30]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # 1. ceilings (and the BLAS kernel as the environment has it, if it was steered)
        report.append("\n## This machine (measured in this run)")
        if set_vars:
            as_set = measure_machine(dict(os.environ), tmp, "machine-as-set", args.quick)
            report.append(f"With {set_vars}: core type {as_set['core_type'] if as_set else '?'}, GEMM "
                          + (f"{as_set['gemm_gflops']['float32']:.0f} / {as_set['gemm_gflops']['float64']:.0f} "
                             "GFLOP/s f32 / f64" if as_set else "not measured"))
            report.append("Benchmarks below run with both unset:")
        else:
            report.append("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are not set; BLAS kernels as auto-detected.")
        ceilings = measure_machine(clean, tmp, "machine", args.quick)
        if ceilings is None:
            raise SystemExit("bench/machine.py failed; nothing to divide by")
        sys.path.insert(0, HERE)
        from machine import describe  # text only: numpy is never imported here

        report.append(describe(ceilings))
        machine_json = os.path.join(tmp, "machine.json")

        # 2. GMM and k-means, on the host's Numba code path, then on the other ISA paths this CPU runs
        report.append("\n## Gaussian mixtures (EM) and k-means")
        cpu_name, avx512 = host_cpu(clean)
        paths = [("host, " + ("AVX-512" if avx512 else "AVX2"), {}, args.cases, ""),
                 ("AVX2", AVX2_ENV, args.cases or ISA_CASES, "fastlvm,sklearn")]
        for label, isa_env, cases, libs in paths:
            gmm_json = os.path.join(tmp, f"gmm-{label.replace(', ', '-')}.json")
            cmd = [sys.executable, os.path.join(HERE, "bench_gmm.py"), "--machine", machine_json, "--json", gmm_json]
            cmd += (["--quick"] if args.quick else []) + (["--cases", cases] if cases else [])
            cmd += ["--libs", libs] if libs else []
            gmm_text = stage(cmd, {**clean, **isa_env}, tmp, f"bench_gmm-{label.replace(', ', '-')}")
            report.append(f"\n### Numba path: {label} ({', '.join(f'{k}={v}' for k, v in isa_env.items()) or cpu_name})")
            if os.path.exists(gmm_json):
                with open(gmm_json) as f:
                    report += ["fastlvm at a glance:"] + summary(json.load(f))
            report.append(gmm_text.rstrip())
        if not avx512:
            report.append(f"\n### Numba path: AVX-512: not supported by this CPU ({cpu_name}); not timed")

        # 2b. k-means against scikit-learn (lloyd, elkan), oneDAL and faiss
        km = [sys.executable, os.path.join(HERE, "bench_kmeans.py"), "--machine", machine_json]
        report.append("\n## k-means (Lloyd) against every CPU k-means")
        report.append(stage(km + (["--quick"] if args.quick else []), clean, tmp, "bench_kmeans").rstrip())

        # 3. GMM at scale: out-of-core memmap fits and a 2-worker Dask cluster
        if not args.skip_scale:
            scale = [sys.executable, os.path.join(HERE, "bench_scale.py")] + (["--quick"] if args.quick else [])
            report.append("\n## Gaussian mixtures at scale (memmap, Dask)")
            report.append(stage(scale, clean, tmp, "bench_scale").rstrip())

        # 4. VAE objective, if its benchmark exists
        vae = os.path.join(HERE, "bench_vae.py")
        if os.path.exists(vae) and not args.skip_vae:
            code = (f"import sys, shlex; sys.path.insert(0, {HERE!r}); import bench_vae; "
                    f"bench_vae.main(shlex.split({args.vae_args!r}))")
            report.append("\n## VAE objective")
            report.append(stage([sys.executable, "-c", code], clean, tmp, "bench_vae").rstrip())

        # 4b. InfoVAE's MMD and VQ-VAE's vector quantisation
        if not args.skip_vae:
            latent = [sys.executable, os.path.join(HERE, "bench_latent.py")] + (["--quick"] if args.quick else [])
            report.append("\n## Latent-space terms (MMD, vector quantisation)")
            report.append(stage(latent, clean, tmp, "bench_latent").rstrip())

        # 5. VAE fitting: time per epoch of fastlvm.VAE and its peers
        if not args.skip_vae_fit:
            fit = [sys.executable, os.path.join(HERE, "bench_vae_fit.py"), "--machine", machine_json]
            fit += (["--quick"] if args.quick else []) + shlex.split(args.vae_fit_args)
            report.append("\n## VAE fitting (time per epoch)")
            report.append(stage(fit, clean, tmp, "bench_vae_fit").rstrip())
    report.append(f"\n(total {time.perf_counter() - started:.0f} s; load average now "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: a busy shared machine slows every "
                  "library, and its noise is in the ratios too)")
    print("\n".join(report))


if __name__ == "__main__":
    main()
