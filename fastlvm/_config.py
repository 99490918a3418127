"""``fastlvm.show_config()``: what this process runs on, and which code paths it takes.

Everything heavy (numba, torch, threadpoolctl, the compiled kernels) is imported inside the
function, so ``import fastlvm`` stays light; a part that cannot be loaded is reported as such
rather than failing the whole report.
"""

import os
import platform

# Variables that steer threads and code paths, reported as set (or unset).
_ENV_VARS = ("FASTLVM_ISA", "OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES",
             "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS",
             "NUMBA_NUM_THREADS", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_CACHE_DIR")
_FEATURES = ("avx2", "fma", "avx512f")


def _cpu():
    """CPU model and the ISA features that decide the fast paths."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not flags:  # not Linux: numpy's own detection
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as np_features
        except ImportError:
            np_features = {}
        flags = {name.lower() for name, on in np_features.items() if on}
    return {"model": model or platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(),
            "features": {name: name in flags for name in _FEATURES}}


def _cpp():
    try:
        from fastlvm import _C
    except Exception as err:  # not built, or FASTLVM_ISA invalid
        return {"error": f"{type(err).__name__}: {err}"}
    return {"isa": _C.isa(), "compiled": _C.isa_compiled(), "supported": _C.isa_supported(),
            "omp_threads": _C.num_threads()}


def _numba():
    try:
        import numba
        import llvmlite.binding as llvm
    except ImportError as err:
        return {"error": str(err)}
    from fastlvm.kernels import simd

    return {"version": numba.__version__,
            "target_cpu": numba.config.CPU_NAME or llvm.get_host_cpu_name(),
            "cpu_features": numba.config.CPU_FEATURES or "host",
            "cache_dir": numba.config.CACHE_DIR or "(beside each module, in __pycache__)",
            "threads": numba.config.NUMBA_NUM_THREADS,
            "vector_bits": 8 * simd.VECTOR_BYTES}  # of the GMM and k-means kernels' products


def _blas():
    try:
        import numpy  # noqa: F401  (loads the BLAS so that threadpoolctl sees it)
        from threadpoolctl import threadpool_info
    except ImportError as err:
        return [{"error": str(err)}]
    return [{"api": p.get("user_api"), "library": p.get("internal_api"),
             "version": p.get("version"), "core": p.get("architecture"),
             "threads": p.get("num_threads"), "path": p.get("filepath")}
            for p in threadpool_info()]


def _torch():
    try:
        import torch
    except ImportError as err:
        return {"error": str(err)}
    return {"version": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads()}


def config():
    """The report as a dict (see :func:`show_config`)."""
    import fastlvm

    return {"fastlvm": fastlvm.__version__, "python": platform.python_version(),
            "cpu": _cpu(), "cpp_kernels": _cpp(), "numba": _numba(),
            "threadpools": _blas(), "torch": _torch(),
            "env": {name: os.environ.get(name) for name in _ENV_VARS}}


def format_config(cfg):
    """The report as text, one ``section: key=value ...`` line per part."""
    cpu, cpp = cfg["cpu"], cfg["cpp_kernels"]
    feats = " ".join(f"{name}={'yes' if on else 'no'}" for name, on in cpu["features"].items())
    lines = [f"fastlvm {cfg['fastlvm']} (Python {cfg['python']})",
             f"cpu: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; {feats}"]
    if "error" in cpp:
        lines.append(f"C++ kernels: {cpp['error']}")
    else:
        lines.append(f"C++ kernels: ISA path {cpp['isa']} (compiled: {', '.join(cpp['compiled'])}; "
                     f"this CPU runs: {', '.join(cpp['supported'])}); "
                     f"{cpp['omp_threads']} OpenMP threads")
    nb = cfg["numba"]
    lines.append("numba: " + (nb["error"] if "error" in nb else
                              f"{nb['version']}, target CPU {nb['target_cpu']} (features: "
                              f"{nb['cpu_features']}), {nb['vector_bits']}-bit vectors, {nb['threads']} threads, "
                              f"cache {nb['cache_dir']}"))
    for p in cfg["threadpools"]:
        if "error" in p:
            lines.append(f"threadpools: {p['error']}")
        else:
            core = f", core {p['core']}" if p["core"] else ""
            lines.append(f"{p['api']}: {p['library']} {p['version'] or ''}{core}, "
                         f"{p['threads']} threads ({os.path.basename(p['path'] or '?')})")
    th = cfg["torch"]
    lines.append("torch: " + (th["error"] if "error" in th else
                              f"{th['version']}, {th['threads']} threads "
                              f"({th['interop_threads']} inter-op)"))
    env = ", ".join(f"{k}={v}" for k, v in cfg["env"].items() if v is not None)
    lines.append(f"environment: {env or 'none of ' + ', '.join(_ENV_VARS[:3]) + ', ... set'}")
    return "\n".join(lines)


def show_config(print_out=True):
    """Print (and return as a dict) what fastlvm runs on: its version; the CPU model and its
    AVX2 / FMA / AVX-512 features; the C++ kernels' ISA path in use (``FASTLVM_ISA`` forces one)
    and the clones compiled in; Numba's target CPU, features and cache directory; the BLAS
    (OpenBLAS core type and threads) and OpenMP pools; torch's version and threads; and the
    environment variables that steer them.

    With ``print_out=False`` nothing is printed; the dict is returned either way.
    """
    cfg = config()
    if print_out:
        print(format_config(cfg))
    return cfg
