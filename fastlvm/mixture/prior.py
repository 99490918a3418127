"""Conjugate priors for MAP-EM.

Weights ~ Dirichlet(alpha, ..., alpha). Per component (full): Sigma_k ~ InvWishart(Psi0, nu0),
mu_k | Sigma_k ~ N(m0, Sigma_k / kappa0). Tied: one Sigma ~ IW(Psi0, nu0), every mu_k ~ N(m0, Sigma/kappa0).
Diag: per feature j, sigma2_kj ~ InvGamma(nu0/2, psi0_j/2), mu_kj ~ N(m0_j, sigma2_kj / kappa0).
Spherical: sigma2_k ~ InvGamma(nu0 D/2, D psi0/2), mu_k ~ N(m0, sigma2_k I / kappa0).
"""

from dataclasses import dataclass

import numpy as np
from scipy import special


@dataclass(frozen=True)
class GaussianMixturePrior:
    """Hyper-parameters of the conjugate prior; None takes a data-dependent default
    (Fraley & Raftery, 2007): mean = data mean, mean_precision = 0.01,
    degrees_of_freedom = D + 2, covariance (the scale Psi0) = data covariance / K^(2/D),
    in the covariance type's form (diag: its diagonal; spherical: mean variance)."""

    weight_concentration: float = 1.0
    mean: object = None
    mean_precision: float = 0.01
    degrees_of_freedom: object = None
    covariance: object = None

    def resolve(self, cov_type, data_mean, data_cov, K):
        D = data_mean.shape[0]
        alpha = float(self.weight_concentration)
        if not alpha >= 1.0:
            raise ValueError(f"prior weight_concentration must be >= 1 for a MAP estimate, got {alpha}")
        kappa = float(self.mean_precision)
        if not kappa > 0:
            raise ValueError(f"prior mean_precision must be > 0, got {kappa}")
        m0 = data_mean if self.mean is None else np.asarray(self.mean, dtype=np.float64)
        if m0.shape != (D,) or not np.all(np.isfinite(m0)):
            raise ValueError(f"prior mean must be a finite vector of shape ({D},), got shape {m0.shape}")
        nu = D + 2.0 if self.degrees_of_freedom is None else float(self.degrees_of_freedom)
        if not nu > D - 1:
            raise ValueError(f"prior degrees_of_freedom must be > n_features - 1 = {D - 1}, got {nu}")
        if self.covariance is None:
            psi = cov_type.from_full(data_cov / K ** (2.0 / D))
        else:
            psi = cov_type.prior_scale(self.covariance, D)
        return ResolvedPrior(alpha, m0, kappa, nu, psi)


@dataclass(frozen=True)
class ResolvedPrior:
    weight_concentration: float
    mean: np.ndarray
    mean_precision: float
    degrees_of_freedom: float
    covariance: object  # Psi0 in the covariance type's form

    def log_density(self, cov_type, weights, means, covariances):
        """log p(weights, means, covariances), fully normalised."""
        K = means.shape[0]
        a = self.weight_concentration
        lp = special.gammaln(K * a) - K * special.gammaln(a) + (a - 1) * np.log(weights).sum()
        lp += cov_type.log_prior(means, covariances, self.mean, self.mean_precision, self.degrees_of_freedom,
                                 self.covariance)
        return float(lp)
