"""Gaussian mixtures by EM and K-means on fastlvm's fused sufficient-statistics kernel."""

from fastlvm.mixture.gaussian_mixture import CollapsedComponentWarning, GaussianMixture
from fastlvm.mixture.kmeans import KMeans
from fastlvm.mixture.prior import GaussianMixturePrior

__all__ = ["CollapsedComponentWarning", "GaussianMixture", "GaussianMixturePrior", "KMeans"]
