"""fastlvm: fast fused kernels for latent variable models."""

__version__ = "0.1.0"

from fastlvm._config import show_config
from fastlvm.mixture import GaussianMixture, GaussianMixturePrior, KMeans

__all__ = ["GaussianMixture", "GaussianMixturePrior", "KMeans", "functional", "show_config"]


def __getattr__(name):
    # torch is heavy; the VAE objective is imported on first use.
    if name == "functional":
        import importlib

        return importlib.import_module("fastlvm.functional")
    raise AttributeError(f"module 'fastlvm' has no attribute {name!r}")
