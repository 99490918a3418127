"""fastlvm.show_config: what it reports agrees with the kernels it describes, and asking for it
costs nothing at import."""

import json
import os
import subprocess
import sys

import fastlvm
from fastlvm import _C
from fastlvm.kernels import simd


def test_show_config_returns_the_dict_without_printing(capsys):
    cfg = fastlvm.show_config(print_out=False)
    assert capsys.readouterr().out == ""
    assert cfg["fastlvm"] == fastlvm.__version__
    assert cfg["cpp_kernels"]["isa"] == _C.isa()
    assert cfg["cpp_kernels"]["compiled"] == _C.isa_compiled()
    assert set(cfg["cpp_kernels"]["supported"]) <= set(cfg["cpp_kernels"]["compiled"])
    assert set(cfg["cpu"]["features"]) == {"avx2", "fma", "avx512f"}
    # a clone is runnable only where the CPU has its features
    if not cfg["cpu"]["features"]["avx512f"]:
        assert "avx512" not in cfg["cpp_kernels"]["supported"]
    assert cfg["numba"]["target_cpu"]
    # the kernels' vectors are 512 bits wide only where Numba's target has AVX-512 (the host's,
    # unless NUMBA_CPU_FEATURES says)
    from numba.core import config

    avx512 = simd.target_has_avx512()
    if config.CPU_FEATURES is None:
        assert avx512 == bool(cfg["cpu"]["features"]["avx512f"])
    assert cfg["numba"]["vector_bits"] == (512 if avx512 else 256)
    assert any(p.get("api") == "blas" for p in cfg["threadpools"])
    json.dumps(cfg)  # plain data, for bench/machine.py's JSON


def test_vector_width_follows_numba_target_features(monkeypatch):
    """NUMBA_CPU_FEATURES decides (as it does for Numba's target machine), also against the host's."""
    from numba.core import config

    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert not simd.target_has_avx512()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,+avx512f,+avx512vl")
    assert simd.target_has_avx512()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512vl")  # no AVX-512F: not AVX-512 vectors
    assert not simd.target_has_avx512()


def test_show_config_prints_the_isa_path_in_use(capsys):
    before = _C.isa()
    try:
        _C.set_isa("generic")
        fastlvm.show_config()
    finally:
        _C.set_isa(before)
    out = capsys.readouterr().out
    assert "C++ kernels: ISA path generic" in out
    assert f"fastlvm {fastlvm.__version__}" in out and "torch:" in out and "numba:" in out


def test_import_fastlvm_does_not_import_torch():
    code = "import sys, fastlvm; fastlvm.show_config; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "False"
