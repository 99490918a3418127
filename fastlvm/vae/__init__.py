"""Variational autoencoders: fastlvm.VAE, its torch module and objectives, and its trainer."""

from fastlvm.vae.estimator import VAE
from fastlvm.vae.vqvae import VQVAE

__all__ = ["VAE", "VQVAE"]
