"""Gaussian mixtures and k-means in plain PyTorch, float64, written from the equations.

This module defines what "correct" means for the fast kernels. It is meant to be read next
to the theory, not to be fast, and imports nothing from fastlvm.

Conventions are scikit-learn's ``GaussianMixture``: a mixture is ``weights`` (K,), ``means``
(K, D) and, per ``covariance_type``, covariances of shape

    'full' (K, D, D)   'tied' (D, D)   'diag' (K, D)   'spherical' (K,)

The Cholesky factor of the precision, ``prec_chol``, has the same shape. For 'full' and 'tied'
it is the upper-triangular P with Sigma^{-1} = P P^T, so that

    log N(x | mu, Sigma) = -D/2 log(2 pi) + log|P| - 1/2 ||(x - mu)^T P||^2,

and for 'diag' and 'spherical' it is 1 / sqrt(variance).

One EM iteration is an E-step under the current parameters followed by an M-step; the
objective it reports is the one of the parameters it started from (scikit-learn's
``lower_bound_`` convention). With a ``prior`` (a dict, see :func:`log_prior`) the M-step is
the MAP estimate and the objective is (log p(X) + log p(params)) / N.
"""

import math

import torch

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
PRIOR_KEYS = ("alpha", "mean", "kappa", "dof", "psi")
_F64 = torch.float64
# scikit-learn adds this to every n_k so that an empty component does not divide by zero.
_NK_FLOOR = 10 * torch.finfo(_F64).eps


# --------------------------------------------------------------------------- validation


def _check_tensor(name, value, ndim):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != _F64:
        raise TypeError(f"{name} must be float64 (the reference works in float64), got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    finite = torch.isfinite(value)
    if not finite.all():
        if ndim == 0:
            raise ValueError(f"{name} is NaN or inf")
        row = int((~finite).reshape(value.shape[0], -1).any(1).nonzero()[0])
        raise ValueError(f"{name} contains NaN or inf (first at index {row} along axis 0)")


def _check_covariance_type(covariance_type):
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")


def _check_data(X):
    _check_tensor("X", X, 2)
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must have at least one row and one feature, got shape {tuple(X.shape)}")


def _covariance_shape(covariance_type, n_components, n_features):
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def _check_per_type(name, value, covariance_type, n_components, n_features):
    """Check a covariance-shaped tensor (covariances or their precision Cholesky factors)."""
    _check_covariance_type(covariance_type)
    shape = _covariance_shape(covariance_type, n_components, n_features)
    _check_tensor(name, value, len(shape))
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{name} for covariance_type={covariance_type!r} must have shape {shape}, "
            f"got {tuple(value.shape)}"
        )


def _check_mixture(X, weights, means, covariances, covariance_type):
    _check_data(X)
    _check_tensor("weights", weights, 1)
    _check_tensor("means", means, 2)
    n_components, n_features = means.shape
    if n_features != X.shape[1]:
        raise ValueError(f"means have {n_features} features but X has {X.shape[1]}")
    if weights.shape[0] != n_components:
        raise ValueError(f"weights have {weights.shape[0]} components but means have {n_components}")
    if (weights < 0).any() or abs(float(weights.sum()) - 1.0) > 1e-8:
        raise ValueError("weights must be non-negative and sum to 1")
    _check_per_type("covariances", covariances, covariance_type, n_components, n_features)


def _check_prior(prior, covariance_type, n_features):
    """Validate a prior dict; return (alpha, m0, kappa0, nu0, psi0) with tensors in float64."""
    if not isinstance(prior, dict):
        raise TypeError(f"prior must be a dict with keys {PRIOR_KEYS}, got {type(prior).__name__}")
    missing = [key for key in PRIOR_KEYS if key not in prior]
    if missing:
        raise ValueError(f"prior is missing the key(s) {missing}")
    alpha, kappa0, nu0 = float(prior["alpha"]), float(prior["kappa"]), float(prior["dof"])
    if not alpha >= 1:
        raise ValueError(f"prior['alpha'] must be >= 1 (the Dirichlet mode needs it), got {alpha}")
    if not kappa0 > 0:
        raise ValueError(f"prior['kappa'] must be > 0, got {kappa0}")
    min_dof = n_features - 1 if covariance_type in ("full", "tied") else 0
    if not nu0 > min_dof:
        raise ValueError(f"prior['dof'] must be > {min_dof} for covariance_type={covariance_type!r}, got {nu0}")
    m0 = torch.as_tensor(prior["mean"], dtype=_F64)
    _check_tensor("prior['mean']", m0, 1)
    if m0.shape[0] != n_features:
        raise ValueError(f"prior['mean'] must have shape ({n_features},), got {tuple(m0.shape)}")
    psi0 = torch.as_tensor(prior["psi"], dtype=_F64)
    psi_shape = {"full": (n_features, n_features), "tied": (n_features, n_features),
                 "diag": (n_features,), "spherical": ()}[covariance_type]
    _check_tensor("prior['psi']", psi0, len(psi_shape))
    if tuple(psi0.shape) != psi_shape:
        raise ValueError(f"prior['psi'] must have shape {psi_shape} for {covariance_type!r}, got {tuple(psi0.shape)}")
    if psi0.ndim == 2:
        if not torch.allclose(psi0, psi0.mT) or torch.linalg.cholesky_ex(psi0).info != 0:
            raise ValueError("prior['psi'] must be symmetric positive definite")
    elif not (psi0 > 0).all():
        raise ValueError("prior['psi'] must be positive")
    return alpha, m0, kappa0, nu0, psi0


# --------------------------------------------------------------------------- shapes


def _expand(per_type, covariance_type, n_components, n_features):
    """The (K, D, D) matrices a covariance-shaped tensor stands for.

    Works for covariances and for precision Cholesky factors alike: 'tied' repeats the one
    matrix, 'diag' puts the vector on the diagonal, 'spherical' multiplies the identity.
    """
    if covariance_type == "full":
        return per_type
    if covariance_type == "tied":
        return per_type.expand(n_components, n_features, n_features)
    if covariance_type == "diag":
        return torch.diag_embed(per_type)
    return per_type[:, None, None] * torch.eye(n_features, dtype=per_type.dtype)


def _reduce(matrices, covariance_type):
    """Sum the entries of (K, D, D) scatter matrices that inform one covariance parameter.

    'full' keeps each matrix, 'tied' adds them over components, 'diag' keeps the diagonals,
    'spherical' the traces. Applied to scatter matrices this gives the sums of squares the
    M-step divides by a count.
    """
    if covariance_type == "full":
        return matrices
    if covariance_type == "tied":
        return matrices.sum(0)
    diagonals = torch.diagonal(matrices, dim1=-2, dim2=-1)
    return diagonals if covariance_type == "diag" else diagonals.sum(-1)


def _add_reg(covariances, reg_covar, covariance_type):
    """Add reg_covar to every variance (the diagonal of each covariance matrix)."""
    if covariance_type in ("full", "tied"):
        return covariances + reg_covar * torch.eye(covariances.shape[-1], dtype=covariances.dtype)
    return covariances + reg_covar


# --------------------------------------------------------------------------- densities
# Each public function validates its arguments and calls the private one of the same name,
# which holds the maths; composite functions (em_step, fit_em, ...) validate once and call
# only private functions.


def precision_cholesky(covariances, covariance_type):
    """Cholesky factors of the precisions, scikit-learn's convention.

    full / tied: with Sigma = L L^T (L lower triangular), P = L^{-T} is upper triangular
    and Sigma^{-1} = L^{-T} L^{-1} = P P^T.   diag / spherical: P = 1 / sqrt(sigma^2).
    Raises ValueError if a covariance is not positive definite.
    """
    _check_covariance_type(covariance_type)
    _check_tensor("covariances", covariances, len(_covariance_shape(covariance_type, 1, 1)))
    if covariance_type in ("full", "tied") and covariances.shape[-1] != covariances.shape[-2]:
        raise ValueError(f"{covariance_type!r} covariances must be square, got shape {tuple(covariances.shape)}")
    return _precision_cholesky(covariances, covariance_type)


def _precision_cholesky(covariances, covariance_type):
    if covariance_type in ("full", "tied"):
        lower, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any():
            raise ValueError(f"a {covariance_type!r} covariance matrix is not positive definite")
        eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype).expand_as(lower)
        return torch.linalg.solve_triangular(lower, eye, upper=False).mT
    if not (covariances > 0).all():
        raise ValueError(f"a {covariance_type!r} variance is not positive")
    return covariances.rsqrt()


def log_det_cholesky(prec_chol, covariance_type, n_features):
    """log|P| = sum_j log P_jj = -1/2 log|Sigma|, per component.

    Shape (K,) for 'full', 'diag', 'spherical' (where it is D log P_k) and () for 'tied'.
    """
    _check_covariance_type(covariance_type)
    _check_tensor("prec_chol", prec_chol, len(_covariance_shape(covariance_type, 1, 1)))
    if covariance_type in ("full", "tied"):
        return torch.diagonal(prec_chol, dim1=-2, dim2=-1).log().sum(-1)
    if covariance_type == "diag":
        return prec_chol.log().sum(-1)
    return n_features * prec_chol.log()


def estimate_log_gaussian_prob(X, means, prec_chol, covariance_type):
    """(N, K) matrix of log N(x_i | mu_k, Sigma_k).

    log N(x | mu, Sigma) = -D/2 log(2 pi) + log|P| - 1/2 ||(x - mu)^T P||^2 with P P^T = Sigma^{-1};
    every covariance type is written as its (K, D, D) factor so that this is one equation.
    """
    _check_data(X)
    _check_tensor("means", means, 2)
    n_components, n_features = means.shape
    if n_features != X.shape[1]:
        raise ValueError(f"means have {n_features} features but X has {X.shape[1]}")
    _check_per_type("prec_chol", prec_chol, covariance_type, n_components, n_features)
    return _estimate_log_gaussian_prob(X, means, prec_chol, covariance_type)


def _estimate_log_gaussian_prob(X, means, prec_chol, covariance_type):
    n_components, n_features = means.shape
    factors = _expand(prec_chol, covariance_type, n_components, n_features)
    y = torch.einsum("nkd,kde->nke", X[:, None, :] - means[None, :, :], factors)
    mahalanobis = (y**2).sum(-1)
    log_det = log_det_cholesky(prec_chol, covariance_type, n_features)
    return -0.5 * (n_features * math.log(2 * math.pi) + mahalanobis) + log_det


def estimate_log_prob_resp(X, weights, means, prec_chol, covariance_type):
    """E-step: log p(x_i) = logsumexp_k [log pi_k + log N(x_i | k)] and log r_ik = that term - log p(x_i).

    Returns (log_prob_norm (N,), log_resp (N, K)).
    """
    _check_tensor("weights", weights, 1)
    _check_tensor("means", means, 2)
    if weights.shape[0] != means.shape[0]:
        raise ValueError(f"weights have {weights.shape[0]} components but means have {means.shape[0]}")
    log_gauss = estimate_log_gaussian_prob(X, means, prec_chol, covariance_type)
    return _log_prob_resp(log_gauss + weights.log())


def _log_prob_resp(weighted_log_prob):
    log_prob_norm = torch.logsumexp(weighted_log_prob, dim=1)
    return log_prob_norm, weighted_log_prob - log_prob_norm[:, None]


# --------------------------------------------------------------------------- M-step and prior


def m_step(X, resp, covariance_type, reg_covar, prior=None):
    """M-step from responsibilities: returns (weights, means, covariances), reg_covar added.

    With n_k = sum_i r_ik (+ 10 eps), xbar_k = sum_i r_ik x_i / n_k and the scatter
    S_k = sum_i r_ik (x_i - xbar_k)(x_i - xbar_k)^T:

    MLE:  pi_k = n_k / sum n_k,  mu_k = xbar_k,
          full Sigma_k = S_k / n_k;  tied Sigma = sum_k S_k / sum_k n_k;
          diag sigma2_kj = (S_k)_jj / n_k;  spherical sigma2_k = tr S_k / (D n_k).

    MAP (prior dict, see :func:`log_prior`), with d_k = xbar_k - m0 and the same reduction of
    B_k = S_k + kappa0 n_k / (kappa0 + n_k) d_k d_k^T:
          pi_k = (n_k + alpha - 1) / (N + K (alpha - 1)),
          mu_k = (kappa0 m0 + n_k xbar_k) / (kappa0 + n_k),
          full      Sigma_k   = (Psi0 + B_k) / (nu0 + n_k + D + 2)
          tied      Sigma     = (Psi0 + sum_k B_k) / (nu0 + N + D + 1 + K)
          diag      sigma2_kj = (psi0_j + (B_k)_jj) / (nu0 + n_k + 3)
          spherical sigma2_k  = (D psi0 + tr B_k) / (D (nu0 + n_k + 1) + 2)
    These are the exact maximisers of sum_ik r_ik (log pi_k + log N(x_i | k)) + log p(params)
    (each denominator is the total power of |Sigma| collected from likelihood and prior).
    """
    _check_data(X)
    _check_tensor("resp", resp, 2)
    _check_covariance_type(covariance_type)
    if resp.shape[0] != X.shape[0]:
        raise ValueError(f"resp has {resp.shape[0]} rows but X has {X.shape[0]}")
    if (resp < 0).any():
        raise ValueError("resp must be non-negative")
    _check_reg_covar(reg_covar)
    prior = None if prior is None else _check_prior(prior, covariance_type, X.shape[1])
    return _m_step(X, resp, covariance_type, reg_covar, prior)


def _check_reg_covar(reg_covar):
    if not reg_covar >= 0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")


def _m_step(X, resp, covariance_type, reg_covar, prior):
    """prior: None or the tuple (alpha, m0, kappa0, nu0, psi0) from _check_prior."""
    n_features = X.shape[1]
    n_components = resp.shape[1]
    nk = resp.sum(0) + _NK_FLOOR
    xbar = resp.T @ X / nk[:, None]
    centred = X[None, :, :] - xbar[:, None, :]  # (K, N, D)
    scatter = torch.einsum("nk,knd,kne->kde", resp, centred, centred)

    if prior is None:
        weights = nk / nk.sum()
        means = xbar
        counts = {
            "full": nk[:, None, None],
            "tied": nk.sum(),
            "diag": nk[:, None],
            "spherical": n_features * nk,
        }[covariance_type]
        covariances = _reduce(scatter, covariance_type) / counts
        return weights, means, _add_reg(covariances, reg_covar, covariance_type)

    alpha, m0, kappa0, nu0, psi0 = prior
    weights = nk + (alpha - 1)
    weights = weights / weights.sum()
    means = (kappa0 * m0 + nk[:, None] * xbar) / (kappa0 + nk)[:, None]
    d = xbar - m0
    shrink = kappa0 * nk / (kappa0 + nk)
    spread = _reduce(scatter + shrink[:, None, None] * d[:, :, None] * d[:, None, :], covariance_type)
    prior_scale = n_features * psi0 if covariance_type == "spherical" else psi0
    denominators = {
        "full": (nu0 + nk + n_features + 2)[:, None, None],
        "tied": nu0 + nk.sum() + n_features + 1 + n_components,
        "diag": (nu0 + nk + 3)[:, None],
        "spherical": n_features * (nu0 + nk + 1) + 2,
    }[covariance_type]
    covariances = (prior_scale + spread) / denominators
    return weights, means, _add_reg(covariances, reg_covar, covariance_type)


def _log_inverse_wishart(sigma, psi, nu):
    """log IW(Sigma | Psi, nu) = nu/2 log|Psi| - nu D/2 log 2 - log Gamma_D(nu/2)
    - (nu + D + 1)/2 log|Sigma| - 1/2 tr(Psi Sigma^{-1}); Sigma may be a stack (..., D, D)."""
    n_features = psi.shape[-1]
    return (
        0.5 * nu * torch.logdet(psi)
        - 0.5 * nu * n_features * math.log(2)
        - torch.mvlgamma(torch.tensor(0.5 * nu, dtype=_F64), n_features)
        - 0.5 * (nu + n_features + 1) * torch.logdet(sigma)
        # expand psi: a (D, D) right-hand side beside a stack of D matrices would read as D vectors
        - 0.5 * torch.linalg.solve(sigma, psi.expand_as(sigma)).diagonal(dim1=-2, dim2=-1).sum(-1)
    )


def log_prior(weights, means, covariances, covariance_type, prior):
    """Fully normalised log density of the conjugate prior at (weights, means, covariances).

    prior = {'alpha': a >= 1, 'mean': m0 (D,), 'kappa': kappa0 > 0, 'dof': nu0, 'psi': psi0}:
      weights ~ Dirichlet(a, ..., a);
      full:      Sigma_k ~ IW(Psi0, nu0),                mu_k | Sigma_k ~ N(m0, Sigma_k / kappa0)
      tied:      Sigma ~ IW(Psi0, nu0) (once),           mu_k | Sigma ~ N(m0, Sigma / kappa0)
      diag:      sigma2_kj ~ InvGamma(nu0/2, psi0_j/2),  mu_kj | sigma2_kj ~ N(m0_j, sigma2_kj / kappa0)
      spherical: sigma2_k ~ InvGamma(nu0 D/2, D psi0/2), mu_k | sigma2_k ~ N(m0, sigma2_k I / kappa0)
    Psi0 is (D, D) for full/tied, psi0 (D,) for diag and a scalar for spherical;
    nu0 > D - 1 for full/tied, > 0 otherwise. InvGamma(a, b) has density b^a/Gamma(a) x^{-a-1} e^{-b/x}.
    """
    _check_tensor("weights", weights, 1)
    _check_tensor("means", means, 2)
    n_components, n_features = means.shape
    if weights.shape[0] != n_components:
        raise ValueError(f"weights have {weights.shape[0]} components but means have {n_components}")
    _check_per_type("covariances", covariances, covariance_type, n_components, n_features)
    return _log_prior(weights, means, covariances, covariance_type, _check_prior(prior, covariance_type, n_features))


def _log_prior(weights, means, covariances, covariance_type, prior):
    alpha, m0, kappa0, nu0, psi0 = prior
    n_components, n_features = means.shape
    dirichlet = torch.distributions.Dirichlet(torch.full((n_components,), alpha, dtype=_F64))
    full_covariances = _expand(covariances, covariance_type, n_components, n_features)
    normal = torch.distributions.MultivariateNormal(m0, covariance_matrix=full_covariances / kappa0)
    total = dirichlet.log_prob(weights) + normal.log_prob(means).sum()
    if covariance_type in ("full", "tied"):
        return total + _log_inverse_wishart(covariances, psi0, nu0).sum()
    if covariance_type == "diag":
        inv_gamma = torch.distributions.InverseGamma(0.5 * nu0, 0.5 * psi0)
    else:
        inv_gamma = torch.distributions.InverseGamma(0.5 * nu0 * n_features, 0.5 * n_features * psi0)
    return total + inv_gamma.log_prob(covariances).sum()


# --------------------------------------------------------------------------- EM


def _weighted_log_prob(X, weights, means, covariances, covariance_type):
    """(N, K) matrix of log pi_k + log N(x_i | mu_k, Sigma_k)."""
    prec_chol = _precision_cholesky(covariances, covariance_type)
    return _estimate_log_gaussian_prob(X, means, prec_chol, covariance_type) + weights.log()


def em_step(X, weights, means, covariances, covariance_type, reg_covar, prior=None):
    """One EM iteration: E-step under the given parameters, then the M-step.

    Returns ((weights, means, covariances), mean_log_likelihood) where the mean
    log-likelihood (1/N) sum_i log p(x_i) is that of the parameters passed in.
    """
    _check_mixture(X, weights, means, covariances, covariance_type)
    _check_reg_covar(reg_covar)
    prior = None if prior is None else _check_prior(prior, covariance_type, X.shape[1])
    return _em_step(X, (weights, means, covariances), covariance_type, reg_covar, prior)


def _em_step(X, params, covariance_type, reg_covar, prior):
    log_prob_norm, log_resp = _log_prob_resp(_weighted_log_prob(X, *params, covariance_type))
    new_params = _m_step(X, log_resp.exp(), covariance_type, reg_covar, prior)
    return new_params, log_prob_norm.mean()


def fit_em(X, weights, means, covariances, covariance_type, n_iter, reg_covar=1e-6, tol=None, prior=None):
    """Run up to n_iter EM iterations from the given parameters.

    Returns ((weights, means, covariances), objectives), objectives[t] (a float) being the
    objective of the parameters at the start of iteration t: (1/N) sum_i log p(x_i), or with a
    prior (log p(X) + log p(params)) / N. Stops early, as scikit-learn does, once two
    consecutive objectives differ by less than tol (the M-step of that iteration is kept).
    """
    _check_mixture(X, weights, means, covariances, covariance_type)
    _check_reg_covar(reg_covar)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be None or >= 0, got {tol}")
    prior = None if prior is None else _check_prior(prior, covariance_type, X.shape[1])
    params = (weights, means, covariances)
    objectives = []
    for _ in range(n_iter):
        new_params, objective = _em_step(X, params, covariance_type, reg_covar, prior)
        if prior is not None:
            objective = objective + _log_prior(*params, covariance_type, prior) / X.shape[0]
        params = new_params
        objectives.append(float(objective))
        if tol is not None and len(objectives) > 1 and abs(objectives[-1] - objectives[-2]) < tol:
            break
    return params, objectives


def elbo(X, weights, means, covariances, covariance_type, resp):
    """ELBO(q) = sum_i sum_k r_ik (log pi_k + log N(x_i | k) - log r_ik), with 0 log 0 = 0.

    Equals log p(X) = sum_i log p(x_i) when r is the E-step posterior, and is below it otherwise.
    """
    _check_mixture(X, weights, means, covariances, covariance_type)
    _check_tensor("resp", resp, 2)
    if tuple(resp.shape) != (X.shape[0], means.shape[0]):
        raise ValueError(f"resp must have shape {(X.shape[0], means.shape[0])}, got {tuple(resp.shape)}")
    log_joint = _weighted_log_prob(X, weights, means, covariances, covariance_type)
    # Entries with r_ik = 0 contribute nothing, even where log pi_k = -inf.
    terms = torch.where(resp > 0, resp * (log_joint - resp.log()), torch.zeros_like(resp))
    return terms.sum()


# --------------------------------------------------------------------------- k-means


def _check_centers(X, centers):
    _check_data(X)
    _check_tensor("centers", centers, 2)
    if centers.shape[1] != X.shape[1]:
        raise ValueError(f"centers have {centers.shape[1]} features but X has {X.shape[1]}")
    if centers.shape[0] < 1:
        raise ValueError("centers must hold at least one centre")


def _nearest(X, centers):
    """Index of the nearest centre of each row and the squared distance to it (first on ties)."""
    squared_distances = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    distances, labels = squared_distances.min(dim=1)
    return labels, distances


def kmeans_step(X, centers):
    """One Lloyd iteration: hard EM for a mixture with equal weights and a shared sigma^2 I, sigma -> 0.

    labels_i = argmin_k ||x_i - c_k||^2 (the hard E-step), inertia = sum_i min_k ||x_i - c_k||^2,
    new c_k = mean of the rows labelled k (an empty cluster keeps its centre).
    Returns (new_centers, labels, inertia); labels and inertia are those of the given centres.
    """
    _check_centers(X, centers)
    return _kmeans_step(X, centers)


def _kmeans_step(X, centers):
    labels, distances = _nearest(X, centers)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(_F64)
    sums = torch.zeros_like(centers).index_add_(0, labels, X)
    new_centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
    return new_centers, labels, distances.sum()


def fit_kmeans(X, centers, n_iter):
    """n_iter Lloyd iterations from the given centres.

    Returns (centers, labels, inertia) with labels and inertia those of the final centres,
    as scikit-learn's KMeans reports them.
    """
    _check_centers(X, centers)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    for _ in range(n_iter):
        centers, _, _ = _kmeans_step(X, centers)
    labels, distances = _nearest(X, centers)
    return centers, labels, distances.sum()
