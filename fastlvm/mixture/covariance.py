"""One object per covariance type: shapes, Cholesky factors of the precision, and the
covariance part of the M-step. Parameters are NumPy float64 arrays here; the estimator casts.

Shapes (scikit-learn's): full (K,D,D), tied (D,D), diag (K,D), spherical (K,).
precisions_cholesky: full/tied upper-triangular P with precision = P P^T; diag/spherical 1/sigma.
"""

import numpy as np
from scipy import linalg, stats

from fastlvm import engine


def _cholesky_precision(cov):
    """Upper-triangular P with P P^T = cov^{-1}, or None when cov is not positive definite."""
    # One BLAS thread: D x D factorisations gain nothing from threads, and threaded BLAS next to
    # the kernels' still-spinning worker threads is many times slower.
    with engine.single_thread_blas():
        try:
            lower = linalg.cholesky(cov, lower=True)
        except linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(lower)):
            return None
        return linalg.solve_triangular(lower, np.eye(cov.shape[0]), lower=True).T


def _symmetric(upper):
    """Full symmetric matrices from their upper triangles (last two axes)."""
    return np.triu(upper) + np.swapaxes(np.triu(upper, 1), -1, -2)


class CovarianceType:
    name = ""
    kind = -1

    def shape(self, K, D):
        raise NotImplementedError

    def n_cov_parameters(self, K, D):
        raise NotImplementedError

    def precision_cholesky(self, cov):
        """(P, bad): P as in scikit-learn, bad = indices of components that are not PD."""
        raise NotImplementedError

    def covariance_from_precision_cholesky(self, P):
        raise NotImplementedError

    def precisions(self, P):
        raise NotImplementedError

    def log_det(self, P, D):
        """(K,) or scalar: log det P = -1/2 log det Sigma."""
        raise NotImplementedError

    def kernel_precision(self, P, K):
        """The kernels' common 3-D layout (see fastlvm.kernels.cpu)."""
        raise NotImplementedError

    def scatter(self, second, n, delta):
        """Per-component biased scatter n_k C_k about the new means, from moments centred on the
        old shift: n C = second - n delta delta^T with delta = s / n."""
        raise NotImplementedError

    def isotropic(self, K, D):
        """Unit-variance precision Cholesky factors (used for hard assignment to centres)."""
        raise NotImplementedError

    def from_full(self, cov):
        """One component's form of a full (D, D) covariance: full/tied (D,D), diag (D,), spherical scalar."""
        raise NotImplementedError

    def m_step(self, scatter, n, d, reg_covar, prior, D):
        """Covariances from scatter (MLE), or the joint posterior mode under the conjugate prior.
        d = xbar - m0 (K,D) when prior is given."""
        raise NotImplementedError

    def statistics_shift(self, means, centre):
        """(K, D): the shift c_k the kernels centre this type's moments on (the mixture mean c)."""
        return np.broadcast_to(centre, means.shape)

    def recentre_second(self, second, update):
        """The second moment moved to another shift, given the per-component full update (K, D, D)
        (see SufficientStatistics.recentred)."""
        raise NotImplementedError

    def prior_scale(self, psi, D):
        """The user's prior covariance scale Psi0 in one component's form (that of from_full), or
        ValueError naming the shape."""
        psi = np.asarray(psi, dtype=np.float64)
        expected = np.shape(self.from_full(np.eye(D)))
        if psi.shape != expected:
            raise ValueError(f"prior covariance must have shape {expected} for covariance_type={self.name!r}, "
                             f"got {psi.shape}")
        return psi if psi.ndim else float(psi)

    def log_prior(self, means, covariances, m0, kappa, nu, psi):
        """log p(means, covariances) under the conjugate prior (see fastlvm.mixture.prior)."""
        raise NotImplementedError

    def borrowed_covariances(self, c, collapsed, data_covariance):
        """Positive definite covariances for re-seeding the collapsed components: those of the healthy
        components averaged (an average of positive definite matrices is one); None when none is
        healthy. data_covariance(): the data's covariance plus reg_covar (a pass over the data)."""
        healthy = [k for k in range(c.shape[0]) if k not in collapsed]
        if not healthy:
            return None
        c[collapsed] = np.mean(c[healthy], axis=0)
        return c

    def check_precisions(self, precisions, name):
        """ValueError unless the user's precisions are valid values (positive entries; symmetric positive
        definite matrices for full and tied), with scikit-learn's wording."""
        if np.any(precisions <= 0.0):
            raise ValueError(f"'{name}' should be positive")

    def cholesky_of_precisions(self, precisions):
        """P with P P^T = precision: the square root (diag, spherical); see _MatrixValued."""
        return np.sqrt(precisions)

    def sample(self, rng, mean, P, k, n):
        cov = self.covariance_from_precision_cholesky(P)
        return rng.multivariate_normal(mean, self.component_covariance(cov, k, mean.shape[0]), n)

    def component_covariance(self, cov, k, D):
        raise NotImplementedError


class _MatrixValued(CovarianceType):
    def check_precisions(self, precisions, name):
        D = precisions.shape[-1]
        for p in precisions.reshape(-1, D, D):
            if not (np.all(np.isclose(p, p.T)) and np.all(np.linalg.eigvalsh(p) > 0.0)):
                raise ValueError(f"'{name}' should be symmetric, positive-definite")

    def cholesky_of_precisions(self, precisions):
        """Upper-triangular P with P P^T = precision (the kernels read the upper triangle): the lower
        Cholesky factor of the index-reversed matrix, reversed back."""
        return np.linalg.cholesky(precisions[..., ::-1, ::-1])[..., ::-1, ::-1].copy()


class Full(_MatrixValued):
    name, kind = "full", engine.FULL

    def statistics_shift(self, means, centre):
        return means  # moments about each component's own mean: no cancellation

    def recentre_second(self, second, update):
        return second + update  # symmetric: right for a full or an upper-triangular layout

    def log_prior(self, means, covariances, m0, kappa, nu, psi):
        return sum(stats.invwishart.logpdf(c, df=nu, scale=psi) + stats.multivariate_normal.logpdf(m, m0, c / kappa)
                   for m, c in zip(means, covariances))

    def shape(self, K, D):
        return (K, D, D)

    def n_cov_parameters(self, K, D):
        return K * D * (D + 1) // 2

    def precision_cholesky(self, cov):
        P = np.empty_like(cov)
        bad = []
        for k in range(cov.shape[0]):
            pk = _cholesky_precision(cov[k])
            if pk is None:
                bad.append(k)
                pk = np.eye(cov.shape[1])
            P[k] = pk
        return P, bad

    def covariance_from_precision_cholesky(self, P):
        return np.stack([np.linalg.inv(p @ p.T) for p in P])

    def precisions(self, P):
        return P @ np.swapaxes(P, -1, -2)

    def log_det(self, P, D):
        return np.log(np.diagonal(P, axis1=1, axis2=2)).sum(axis=1)

    def kernel_precision(self, P, K):
        return np.triu(P)

    def scatter(self, second, n, delta):
        return _symmetric(second) - n[:, None, None] * delta[:, :, None] * delta[:, None, :]

    def isotropic(self, K, D):
        return np.broadcast_to(np.eye(D), (K, D, D)).copy()

    def from_full(self, cov):
        return cov

    def m_step(self, scatter, n, d, reg_covar, prior, D):
        if prior is None:
            cov = scatter / n[:, None, None]
        else:
            kappa = prior.mean_precision
            shrink = (kappa * n / (kappa + n))[:, None, None] * d[:, :, None] * d[:, None, :]
            denom = (prior.degrees_of_freedom + n + D + 2)[:, None, None]
            cov = (prior.covariance + scatter + shrink) / denom
        cov = cov + reg_covar * np.eye(D)
        return cov

    def component_covariance(self, cov, k, D):
        return cov[k]


class Tied(_MatrixValued):
    name, kind = "tied", engine.TIED

    def recentre_second(self, second, update):
        return second + update.sum(axis=0)[None]  # unweighted about one centre: the sum over k

    def log_prior(self, means, covariances, m0, kappa, nu, psi):
        return (stats.invwishart.logpdf(covariances, df=nu, scale=psi)
                + stats.multivariate_normal.logpdf(means, m0, covariances / kappa).sum())

    def borrowed_covariances(self, c, collapsed, data_covariance):
        """The one covariance if it is positive definite, else the data's (reg_covar added)."""
        if not np.all(np.isfinite(c)) or self.precision_cholesky(c)[1]:
            return data_covariance()
        return c

    def shape(self, K, D):
        return (D, D)

    def n_cov_parameters(self, K, D):
        return D * (D + 1) // 2

    def precision_cholesky(self, cov):
        P = _cholesky_precision(cov)
        if P is None:
            return np.eye(cov.shape[0]), [0]
        return P, []

    def covariance_from_precision_cholesky(self, P):
        return np.linalg.inv(P @ P.T)

    def precisions(self, P):
        return P @ P.T

    def log_det(self, P, D):
        return np.log(np.diag(P)).sum()

    def kernel_precision(self, P, K):
        return np.triu(P)[None]

    def scatter(self, second, n, delta):
        # second is sum_i (x_i - c)(x_i - c)^T, delta = (xbar_k - c): subtract each component's
        # between-scatter so the sum over k of within-component scatter remains.
        return _symmetric(second[0]) - np.einsum("k,ki,kj->ij", n, delta, delta)

    def isotropic(self, K, D):
        return np.eye(D)

    def from_full(self, cov):
        return cov

    def m_step(self, scatter, n, d, reg_covar, prior, D):
        K = n.shape[0]
        if prior is None:
            cov = scatter / n.sum()
        else:
            kappa = prior.mean_precision
            shrink = np.einsum("k,ki,kj->ij", kappa * n / (kappa + n), d, d)
            cov = (prior.covariance + scatter + shrink) / (prior.degrees_of_freedom + n.sum() + D + 1 + K)
        return cov + reg_covar * np.eye(D)

    def component_covariance(self, cov, k, D):
        return cov


class Diag(CovarianceType):
    name, kind = "diag", engine.DIAG

    def recentre_second(self, second, update):
        return second + np.diagonal(update, axis1=1, axis2=2)[:, None, :]

    def log_prior(self, means, covariances, m0, kappa, nu, psi):
        return (stats.invgamma.logpdf(covariances, nu / 2, scale=np.asarray(psi) / 2).sum()
                + stats.norm.logpdf(means, m0, np.sqrt(covariances / kappa)).sum())

    def shape(self, K, D):
        return (K, D)

    def n_cov_parameters(self, K, D):
        return K * D

    def precision_cholesky(self, cov):
        ok = np.all(cov > 0, axis=1) & np.all(np.isfinite(cov), axis=1)
        P = np.where(ok[:, None], 1.0 / np.sqrt(np.where(ok[:, None], cov, 1.0)), 1.0)
        return P, list(np.flatnonzero(~ok))

    def covariance_from_precision_cholesky(self, P):
        return 1.0 / P**2

    def precisions(self, P):
        return P**2

    def log_det(self, P, D):
        return np.log(P).sum(axis=1)

    def kernel_precision(self, P, K):
        return P[:, None, :]

    def scatter(self, second, n, delta):
        return second[:, 0, :] - n[:, None] * delta**2

    def isotropic(self, K, D):
        return np.ones((K, D))

    def from_full(self, cov):
        return np.diag(cov).copy()

    def m_step(self, scatter, n, d, reg_covar, prior, D):
        if prior is None:
            cov = scatter / n[:, None]
        else:
            kappa = prior.mean_precision
            shrink = (kappa * n / (kappa + n))[:, None] * d**2
            cov = (prior.covariance + scatter + shrink) / (prior.degrees_of_freedom + n + 3)[:, None]
        return cov + reg_covar

    def component_covariance(self, cov, k, D):
        return np.diag(cov[k])


class Spherical(CovarianceType):
    name, kind = "spherical", engine.SPHERICAL

    def recentre_second(self, second, update):
        return second + np.trace(update, axis1=1, axis2=2)[:, None, None]

    def log_prior(self, means, covariances, m0, kappa, nu, psi):
        D = means.shape[1]
        return (stats.invgamma.logpdf(covariances, nu * D / 2, scale=D * psi / 2).sum()
                + stats.norm.logpdf(means, m0, np.sqrt(covariances / kappa)[:, None]).sum())

    def shape(self, K, D):
        return (K,)

    def n_cov_parameters(self, K, D):
        return K

    def precision_cholesky(self, cov):
        ok = (cov > 0) & np.isfinite(cov)
        P = np.where(ok, 1.0 / np.sqrt(np.where(ok, cov, 1.0)), 1.0)
        return P, list(np.flatnonzero(~ok))

    def covariance_from_precision_cholesky(self, P):
        return 1.0 / P**2

    def precisions(self, P):
        return P**2

    def log_det(self, P, D):
        return D * np.log(P)

    def kernel_precision(self, P, K):
        return P[:, None, None]

    def scatter(self, second, n, delta):
        return second[:, 0, 0] - n * (delta**2).sum(axis=1)

    def isotropic(self, K, D):
        return np.ones(K)

    def from_full(self, cov):
        return float(np.mean(np.diag(cov)))

    def m_step(self, scatter, n, d, reg_covar, prior, D):
        if prior is None:
            cov = scatter / (n * D)
        else:
            kappa = prior.mean_precision
            shrink = kappa * n / (kappa + n) * (d**2).sum(axis=1)
            cov = (D * prior.covariance + scatter + shrink) / (D * (prior.degrees_of_freedom + n + 1) + 2)
        return cov + reg_covar

    def component_covariance(self, cov, k, D):
        return cov[k] * np.eye(D)


COVARIANCE_TYPES = {c.name: c for c in (Full(), Tied(), Diag(), Spherical())}


def get_covariance_type(name):
    if not isinstance(name, str) or name not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {sorted(COVARIANCE_TYPES)}, got {name!r}"
        )
    return COVARIANCE_TYPES[name]
