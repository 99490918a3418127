"""fastlvm: fast fused kernels for latent variable models."""

__version__ = "0.1.0"

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
