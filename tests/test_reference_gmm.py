"""Oracle tests for the plain-PyTorch Gaussian mixture reference (fastlvm.reference.gmm).

Oracles: scikit-learn's GaussianMixture and KMeans run from the same initial parameters,
torch.distributions for densities, scipy.stats for the prior, and the defining properties of
EM (monotone objective, tight ELBO, M-step as the maximiser).
"""

import functools
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, load_iris, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from fastlvm.reference import gmm

F64 = torch.float64
TYPES = ("full", "tied", "diag", "spherical")
# name -> (loader, number of components). Digits is used whole (1797 x 64, full covariance too).
DATASETS = {"iris": (load_iris, 3), "wine": (load_wine, 3), "digits": (load_digits, 10)}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tensors here are small: intra-op threads only add synchronisation, which on a shared
    machine turns into spinning (8x slower measured under load). Restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_err(ours, reference):
    """||ours - reference|| / ||reference||, refusing NaN."""
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape
    assert np.isfinite(ours).all()
    return np.linalg.norm(ours - reference) / np.linalg.norm(reference)


@functools.cache
def dataset(name):
    loader, n_components = DATASETS[name]
    return torch.tensor(loader().data, dtype=F64), n_components


def initial_params(X, n_components, covariance_type, seed=0):
    """Uniform weights, distinct random rows as means, the data covariance (+0.1 I) for every component."""
    generator = torch.Generator().manual_seed(seed)
    distinct = torch.unique(X, dim=0)
    means = distinct[torch.randperm(distinct.shape[0], generator=generator)[:n_components]]
    n_features = X.shape[1]
    cov = torch.cov(X.T) + 0.1 * torch.eye(n_features, dtype=F64)
    covariances = {
        "full": cov.expand(n_components, n_features, n_features).clone(),
        "tied": cov,
        "diag": cov.diagonal().expand(n_components, n_features).clone(),
        "spherical": cov.diagonal().mean().expand(n_components).clone(),
    }[covariance_type]
    return torch.full((n_components,), 1.0 / n_components, dtype=F64), means, covariances


def full_matrices(covariances, covariance_type, n_components, n_features):
    """The test's own expansion of a covariance parameter to (K, D, D) matrices."""
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return torch.stack([covariances] * n_components)
    if covariance_type == "diag":
        return torch.stack([torch.diag(c) for c in covariances])
    return torch.stack([c * torch.eye(n_features, dtype=F64) for c in covariances])


@functools.cache
def sklearn_fit(name, covariance_type, max_iter):
    X, n_components = dataset(name)
    weights, means, covariances = initial_params(X, n_components, covariance_type)
    if covariance_type in ("full", "tied"):
        precisions = torch.linalg.inv(covariances)
    else:
        precisions = 1 / covariances
    model = GaussianMixture(
        n_components,
        covariance_type=covariance_type,
        tol=0,  # never stop early
        max_iter=max_iter,
        reg_covar=1e-6,
        weights_init=weights.numpy(),
        means_init=means.numpy(),
        precisions_init=precisions.numpy(),
    )
    # One BLAS thread: the machines are shared, and oversubscription makes sklearn's full fit crawl.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X.numpy())


def random_covariances(covariance_type, n_components, n_features, generator):
    if covariance_type in ("full", "tied"):
        shape = (n_components, n_features, n_features) if covariance_type == "full" else (n_features, n_features)
        a = torch.randn(shape, generator=generator, dtype=F64)
        return a @ a.mT / n_features + 0.5 * torch.eye(n_features, dtype=F64)
    shape = (n_components, n_features) if covariance_type == "diag" else (n_components,)
    return 0.3 + 2 * torch.rand(shape, generator=generator, dtype=F64)


def random_mixture(n_components, n_features, covariance_type, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_components, generator=generator, dtype=F64) + 0.1
    means = torch.randn(n_components, n_features, generator=generator, dtype=F64)
    covariances = random_covariances(covariance_type, n_components, n_features, generator)
    return weights / weights.sum(), means, covariances


def make_prior(X, covariance_type, alpha=2.5):
    n_features = X.shape[1]
    cov = torch.atleast_2d(torch.cov(X.T))
    psi = {"full": 0.5 * cov, "tied": 0.5 * cov, "diag": 0.5 * cov.diagonal(),
           "spherical": 0.5 * cov.diagonal().mean()}[covariance_type]
    return {"alpha": alpha, "mean": X.mean(0) + 0.3 * X.std(0), "kappa": 0.7, "dof": n_features + 1.5, "psi": psi}


# --------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("name", DATASETS)
def test_em_matches_sklearn(name, covariance_type):
    X, n_components = dataset(name)
    start = initial_params(X, n_components, covariance_type)
    for max_iter in (1, 25):
        model = sklearn_fit(name, covariance_type, max_iter)
        (weights, means, covariances), objectives = gmm.fit_em(X, *start, covariance_type, max_iter, reg_covar=1e-6)
        assert rel_err(weights, model.weights_) < 1e-8
        assert rel_err(means, model.means_) < 1e-8
        assert rel_err(covariances, model.covariances_) < 1e-8
        assert rel_err(gmm.precision_cholesky(covariances, covariance_type), model.precisions_cholesky_) < 1e-8
        # lower_bounds_[t] is the mean log-likelihood of the E-step of iteration t.
        assert len(objectives) == len(model.lower_bounds_) == max_iter
        assert rel_err(objectives, model.lower_bounds_) < 1e-10
        assert objectives[-1] == pytest.approx(model.lower_bound_, rel=1e-10)


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("name", ["wine", "digits"])
def test_e_step_matches_sklearn(name, covariance_type):
    """E-step under scikit-learn's fitted parameters = its score_samples and predict_proba."""
    X, _ = dataset(name)
    model = sklearn_fit(name, covariance_type, 25)
    prec_chol = torch.tensor(model.precisions_cholesky_)
    log_prob_norm, log_resp = gmm.estimate_log_prob_resp(
        X, torch.tensor(model.weights_), torch.tensor(model.means_), prec_chol, covariance_type
    )
    assert rel_err(log_prob_norm, model.score_samples(X.numpy())) < 1e-10
    assert rel_err(log_resp.exp(), model.predict_proba(X.numpy())) < 1e-8


# --------------------------------------------------------------------------- densities


SHAPES = [(1, 1, 1), (7, 1, 3), (5, 4, 1), (33, 5, 4)]  # (N, D, K): one row, one feature, one component


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("n_samples,n_features,n_components", SHAPES)
def test_densities_match_torch_distributions(covariance_type, n_samples, n_features, n_components):
    weights, means, covariances = random_mixture(n_components, n_features, covariance_type, seed=n_samples)
    X = torch.randn(n_samples, n_features, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    full = full_matrices(covariances, covariance_type, n_components, n_features)
    components = torch.distributions.MultivariateNormal(means, covariance_matrix=full)

    prec_chol = gmm.precision_cholesky(covariances, covariance_type)
    if covariance_type in ("full", "tied"):
        assert torch.equal(prec_chol, prec_chol.triu())  # upper triangular, scikit-learn's convention
        assert rel_err(prec_chol @ prec_chol.mT, torch.linalg.inv(covariances)) < 1e-12
    expected_log_det = -0.5 * torch.logdet(full)
    log_det = gmm.log_det_cholesky(prec_chol, covariance_type, n_features)
    if covariance_type == "tied":
        assert log_det.shape == ()
        expected_log_det = expected_log_det[0]
    assert rel_err(log_det, expected_log_det) < 1e-12

    log_gauss = gmm.estimate_log_gaussian_prob(X, means, prec_chol, covariance_type)
    assert log_gauss.shape == (n_samples, n_components)
    assert rel_err(log_gauss, components.log_prob(X[:, None, :])) < 1e-12

    mixture = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(probs=weights), components)
    log_prob_norm, log_resp = gmm.estimate_log_prob_resp(X, weights, means, prec_chol, covariance_type)
    assert rel_err(log_prob_norm, mixture.log_prob(X)) < 1e-12
    assert rel_err(log_resp.exp().sum(1), np.ones(n_samples)) < 1e-12


# --------------------------------------------------------------------------- prior


def scipy_log_prior(weights, means, covariances, covariance_type, prior):
    w, mu, cov = weights.numpy(), means.numpy(), covariances.numpy()
    m0, kappa, nu = np.asarray(prior["mean"]), prior["kappa"], prior["dof"]
    psi = np.asarray(prior["psi"])
    n_components, n_features = mu.shape
    total = scipy.stats.dirichlet.logpdf(w, np.full(n_components, prior["alpha"]))
    if covariance_type in ("full", "tied"):
        per_component = cov if covariance_type == "full" else [cov] * n_components
        if covariance_type == "tied":
            total += scipy.stats.invwishart.logpdf(cov, df=nu, scale=psi)
        for k in range(n_components):
            if covariance_type == "full":
                total += scipy.stats.invwishart.logpdf(per_component[k], df=nu, scale=psi)
            total += scipy.stats.multivariate_normal.logpdf(mu[k], m0, per_component[k] / kappa)
        return total
    if covariance_type == "diag":
        total += scipy.stats.invgamma.logpdf(cov, nu / 2, scale=psi / 2).sum()
        return total + scipy.stats.norm.logpdf(mu, m0, np.sqrt(cov / kappa)).sum()
    total += scipy.stats.invgamma.logpdf(cov, nu * n_features / 2, scale=n_features * psi / 2).sum()
    return total + scipy.stats.norm.logpdf(mu, m0, np.sqrt(cov / kappa)[:, None]).sum()


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("n_features,n_components", [(1, 1), (3, 4)])
def test_log_prior_matches_scipy(covariance_type, n_features, n_components):
    weights, means, covariances = random_mixture(n_components, n_features, covariance_type, seed=3)
    X = torch.randn(20, n_features, generator=torch.Generator().manual_seed(4), dtype=F64)
    prior = make_prior(X, covariance_type, alpha=1.7)
    ours = gmm.log_prior(weights, means, covariances, covariance_type, prior)
    assert ours.shape == ()
    assert float(ours) == pytest.approx(scipy_log_prior(weights, means, covariances, covariance_type, prior), rel=1e-10)


def perturb(params, covariance_type, block, eps, generator):
    """Move one block of parameters (or all) a step eps in a random direction, staying feasible."""
    weights, means, covariances = params
    if block in ("weights", "all"):
        weights = weights * torch.exp(eps * torch.randn(weights.shape, generator=generator, dtype=F64))
        weights = weights / weights.sum()
    if block in ("means", "all"):
        means = means + eps * torch.randn(means.shape, generator=generator, dtype=F64) * means.abs().mean()
    if block in ("covariances", "all"):
        direction = torch.randn(covariances.shape, generator=generator, dtype=F64)
        if covariance_type in ("full", "tied"):
            a = torch.eye(covariances.shape[-1], dtype=F64) + eps * direction
            covariances = a @ covariances @ a.mT  # stays positive definite
        else:
            covariances = covariances * torch.exp(eps * direction)
    return weights, means, covariances


@pytest.mark.parametrize("use_prior", [False, True], ids=["mle", "map"])
@pytest.mark.parametrize("covariance_type", TYPES)
def test_m_step_is_the_maximiser(covariance_type, use_prior):
    """With fixed responsibilities r, the M-step maximises sum_ik r_ik log(pi_k N(x_i|k)) + log p(params),
    i.e. ELBO(params, r) + log p(params) (the entropy of r does not depend on the parameters)."""
    X, n_components = dataset("iris")
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(6)  # Dirichlet.sample draws from the global generator
    resp = torch.distributions.Dirichlet(torch.ones(n_components, dtype=F64)).sample((X.shape[0],))
    prior = make_prior(X, covariance_type) if use_prior else None

    def objective(params):
        value = gmm.elbo(X, *params, covariance_type, resp)
        return value + gmm.log_prior(*params, covariance_type, prior) if use_prior else value

    best = gmm.m_step(X, resp, covariance_type, reg_covar=0.0, prior=prior)
    best_value = float(objective(best))
    slack = 1e-11 * (1 + abs(best_value))
    for block in ("weights", "means", "covariances", "all"):
        for eps in (1e-4, 1e-2, 1e-1):
            for _ in range(10):
                moved = float(objective(perturb(best, covariance_type, block, eps, generator)))
                assert moved <= best_value + slack, (block, eps, moved - best_value)


# --------------------------------------------------------------------------- EM properties


@pytest.mark.parametrize("use_prior", [False, True], ids=["mle", "map"])
@pytest.mark.parametrize("covariance_type", TYPES)
def test_em_never_decreases_the_objective(covariance_type, use_prior):
    X, n_components = dataset("wine")
    prior = make_prior(X, covariance_type) if use_prior else None
    start = initial_params(X, n_components, covariance_type, seed=1)
    # reg_covar=0 so that every M-step is the exact maximiser the monotonicity proof needs.
    _, objectives = gmm.fit_em(X, *start, covariance_type, 30, reg_covar=0.0, prior=prior)
    objectives = np.array(objectives)
    assert np.isfinite(objectives).all()
    assert (np.diff(objectives) >= -1e-12 * np.abs(objectives[1:])).all()
    assert objectives[-1] > objectives[0] + 0.1  # it did climb


def test_map_objective_includes_the_prior():
    X, n_components = dataset("iris")
    prior = make_prior(X, "full")
    start = initial_params(X, n_components, "full")
    _, (first, second) = gmm.fit_em(X, *start, "full", 2, prior=prior)
    _, mean_loglik = gmm.em_step(X, *start, "full", 1e-6)
    expected = float(mean_loglik + gmm.log_prior(*start, "full", prior) / X.shape[0])
    assert first == pytest.approx(expected, rel=1e-12)
    assert second > first


def test_fit_em_stops_at_tol_like_sklearn():
    X, n_components = dataset("iris")
    weights, means, covariances = initial_params(X, n_components, "diag")
    (_, final_means, _), objectives = gmm.fit_em(X, weights, means, covariances, "diag", 500, tol=1e-3)
    assert 1 < len(objectives) < 500
    assert abs(objectives[-1] - objectives[-2]) < 1e-3
    assert all(abs(b - a) >= 1e-3 for a, b in zip(objectives[:-2], objectives[1:-1]))
    model = GaussianMixture(n_components, covariance_type="diag", tol=1e-3, max_iter=500, weights_init=weights.numpy(),
                            means_init=means.numpy(), precisions_init=(1 / covariances).numpy()).fit(X.numpy())
    assert model.converged_ and model.n_iter_ == len(objectives)
    assert rel_err(final_means, model.means_) < 1e-8


@pytest.mark.parametrize("covariance_type", TYPES)
def test_elbo_is_tight_at_the_posterior(covariance_type):
    X, n_components = dataset("iris")
    params = gmm.fit_em(X, *initial_params(X, n_components, covariance_type), covariance_type, 3)[0]
    prec_chol = gmm.precision_cholesky(params[2], covariance_type)
    log_prob_norm, log_resp = gmm.estimate_log_prob_resp(X, *params[:2], prec_chol, covariance_type)
    log_likelihood = float(log_prob_norm.sum())
    assert float(gmm.elbo(X, *params, covariance_type, log_resp.exp())) == pytest.approx(log_likelihood, rel=1e-12)
    torch.manual_seed(7)
    other = torch.distributions.Dirichlet(torch.ones(n_components, dtype=F64)).sample((X.shape[0],))
    assert float(gmm.elbo(X, *params, covariance_type, other)) < log_likelihood - 1.0


# --------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("n_iter", [1, 10])
@pytest.mark.parametrize("name", DATASETS)
def test_kmeans_matches_sklearn(name, n_iter):
    X, n_clusters = dataset(name)
    # Data rows, jittered: digits are integers, and exact distance ties would make labels ambiguous.
    centers = initial_params(X, n_clusters, "spherical", seed=2)[1]
    centers = centers + 0.01 * torch.randn(centers.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    with threadpool_limits(1):
        model = KMeans(n_clusters, init=centers.numpy(), n_init=1, max_iter=n_iter, tol=0, algorithm="lloyd")
        model.fit(X.numpy())
    ours, labels, inertia = gmm.fit_kmeans(X, centers, n_iter)
    # scikit-learn relocates empty clusters; the comparison holds only if none emptied.
    assert (torch.bincount(labels, minlength=n_clusters) > 0).all()
    np.testing.assert_array_equal(labels.numpy(), model.labels_)
    assert rel_err(ours, model.cluster_centers_) < 1e-10
    assert float(inertia) == pytest.approx(model.inertia_, rel=1e-10)


def test_kmeans_inertia_never_increases_and_empty_cluster_stays():
    X, _ = dataset("wine")
    far = X.mean(0) + 1e6
    centers = torch.cat([X[:3], far[None]])
    inertias = []
    for _ in range(8):
        new_centers, labels, inertia = gmm.kmeans_step(X, centers)
        assert not (labels == 3).any()
        assert torch.equal(new_centers[3], far)  # empty cluster keeps its centre
        for k in range(3):
            assert torch.allclose(new_centers[k], X[labels == k].mean(0), rtol=1e-14, atol=0)
        inertias.append(float(inertia))
        centers = new_centers
    assert all(b <= a for a, b in zip(inertias, inertias[1:]))
    assert inertias[-1] < inertias[0]


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected():
    X, _ = dataset("iris")
    weights, means, covariances = initial_params(X, 3, "full")
    with pytest.raises(TypeError, match="float64"):
        gmm.em_step(X.float(), weights, means, covariances, "full", 1e-6)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gmm.em_step(X.numpy(), weights, means, covariances, "full", 1e-6)
    bad = X.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(ValueError, match="index 17"):
        gmm.em_step(bad, weights, means, covariances, "full", 1e-6)
    with pytest.raises(ValueError, match="covariance_type"):
        gmm.em_step(X, weights, means, covariances, "ful", 1e-6)
    with pytest.raises(ValueError, match="shape"):
        gmm.em_step(X, weights, means, covariances[0], "full", 1e-6)
    with pytest.raises(ValueError, match="features"):
        gmm.em_step(X[:, :3], weights, means, covariances, "full", 1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        gmm.em_step(X, weights * 2, means, covariances, "full", 1e-6)
    not_pd = covariances.clone()
    not_pd[1] = -torch.eye(4, dtype=F64)
    with pytest.raises(ValueError, match="positive definite"):
        gmm.em_step(X, weights, means, not_pd, "full", 1e-6)
    resp = torch.full((X.shape[0], 3), 1 / 3, dtype=F64)
    prior = make_prior(X, "full")
    with pytest.raises(ValueError, match="missing"):
        gmm.m_step(X, resp, "full", 0.0, {k: v for k, v in prior.items() if k != "kappa"})
    with pytest.raises(ValueError, match="alpha"):
        gmm.m_step(X, resp, "full", 0.0, {**prior, "alpha": 0.5})
    with pytest.raises(ValueError, match="dof"):
        gmm.m_step(X, resp, "full", 0.0, {**prior, "dof": 2.0})
    with pytest.raises(ValueError, match="psi"):
        gmm.m_step(X, resp, "full", 0.0, {**prior, "psi": -torch.eye(4, dtype=F64)})
    with pytest.raises(ValueError, match="n_iter"):
        gmm.fit_em(X, weights, means, covariances, "full", -1)
