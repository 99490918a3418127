"""Variational autoencoders: fastlvm.VAE, its torch module and objectives, and its trainer."""

from fastlvm.vae.estimator import VAE

__all__ = ["VAE"]
