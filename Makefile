# Every target creates or reuses .venv and installs what it needs. Installing also compiles the
# Numba kernels once (fastlvm.warm), so that no first fit pays for compilation.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastlvm-installed
# The CPU build of torch lies on disk; installing it first keeps pip from fetching a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo test test-fast test-triton bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet scikit-build-core pybind11
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test,plot,triton,dask]'
	$(PY) -m fastlvm.warm
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastlvm.cli demo --output demo-output

# The main suite, then the Triton kernels and the numba.cuda kernels each in their own process under
# their simulators, so that TRITON_INTERPRET and NUMBA_ENABLE_CUDASIM (read when triton / numba is
# imported) do not leak into the main suite.
test: $(STAMP)
	$(PY) -m pytest -q -m "not triton_interpret and not cuda_sim" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton_interpret tests
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q -m cuda_sim tests

# Peers for the GMM and VAE-fitting tables, installed with --no-deps so that no pin of theirs can
# replace the CPU torch build; a peer that fails to install is left out of the tables, not fatal.
# pythae's own imports need pydantic (with its three dependencies) and imageio; tqdm comes below.
# vector-quantize-pytorch (the VQ peer) imports einops, einx (with frozendict), loguru and torch-einops-utils.
BENCH_PEERS := pomegranate==1.1.2 apricot-select==0.6.1 torchgmm==0.1.4 pytorch-lightning==2.6.6 \
               torchmetrics==1.9.0 lightning-utilities==0.15.3 \
               pythae==0.1.2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
               typing-inspection==0.4.5 imageio==2.38.1 \
               vector-quantize-pytorch==1.32.0 einops==0.8.2 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3 \
               torch-einops-utils==0.2.0
# Peers for the k-means table (oneDAL through scikit-learn-intelex, and faiss), installed apart so
# that one failing cannot keep the GMM peers out.
KMEANS_PEERS := scikit-learn-intelex==2026.2.0 daal==2026.2.0 tbb==2023.2.0 faiss-cpu==1.15.1

bench: $(STAMP)
	-$(PY) -m pip install --quiet --no-deps $(BENCH_PEERS)
	-$(PY) -m pip install --quiet --no-deps $(KMEANS_PEERS)
	-$(PY) -m pip install --quiet tqdm
	$(PY) bench/run.py

clean:
	rm -rf build demo-output .pytest_cache
