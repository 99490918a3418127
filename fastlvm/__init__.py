"""fastlvm: fast fused kernels for latent variable models."""

__version__ = "0.1.0"

import os

# OpenMP workers (Numba's parallel loops, the C++ kernels, torch) that busy-wait between parallel
# regions steal the cores from whatever runs next; on a shared machine that made small kernel
# calls 10-100x slower. Read once, when the OpenMP runtime starts; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from fastlvm._config import show_config
from fastlvm.mixture import GaussianMixture, GaussianMixturePrior, KMeans

__all__ = ["GaussianMixture", "GaussianMixturePrior", "KMeans", "VAE", "VQVAE", "functional", "show_config"]


def __getattr__(name):
    # torch is heavy; the VAE objective and estimator are imported on first use.
    import importlib

    if name == "functional":
        return importlib.import_module("fastlvm.functional")
    if name in ("VAE", "VQVAE"):
        return getattr(importlib.import_module("fastlvm.vae"), name)
    raise AttributeError(f"module 'fastlvm' has no attribute {name!r}")
