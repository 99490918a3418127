"""fastlvm: fast fused kernels for latent variable models."""

__version__ = "0.1.0"

from fastlvm.mixture import GaussianMixture, GaussianMixturePrior, KMeans

__all__ = ["GaussianMixture", "GaussianMixturePrior", "KMeans", "VAE", "functional"]


def __getattr__(name):
    # torch is heavy; the VAE objective and estimator are imported on first use.
    import importlib

    if name == "functional":
        return importlib.import_module("fastlvm.functional")
    if name == "VAE":
        return importlib.import_module("fastlvm.vae").VAE
    raise AttributeError(f"module 'fastlvm' has no attribute {name!r}")
