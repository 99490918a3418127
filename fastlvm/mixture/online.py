"""Stepwise (online) EM: Cappé & Moulines (2009), Liang & Klein (2009).

The running statistics are a per-row average, updated by every batch with a decaying step size,

    sigma_1 = s(batch_1) / |batch_1|,    sigma_t = (1 - rho_t) sigma_{t-1} + rho_t s(batch_t) / |batch_t|,
    rho_t = (t - 1 + learning_offset) ^ (-learning_decay),

where s(batch) are the batch's sufficient statistics under the current parameters; the usual
M-step of the running statistics gives the new parameters. With learning_decay in (0.5, 1] the
steps satisfy sum rho = inf, sum rho^2 < inf (Robbins-Monro), and the estimate converges to a
stationary point of the likelihood.
"""

from dataclasses import dataclass, replace


def step_size(t, learning_offset, learning_decay):
    """rho_t for the t-th batch (t >= 2; the first batch replaces the statistics)."""
    return (t - 1 + learning_offset) ** (-learning_decay)


def stepwise_update(running, batch, rho):
    """Running per-row statistics after absorbing a batch's statistics with weight rho; the result
    is centred on the batch's shift and keeps the batch's worst rows (candidates for re-seeding)."""
    mean = batch.scaled(1.0 / batch.n_rows)
    if running is None:
        return mean
    blended = running.recentred(batch.shift).scaled(1.0 - rho) + mean.scaled(rho)
    return replace(blended, worst=batch.worst, worst_x=batch.worst_x)


@dataclass(frozen=True)
class OnlineState:
    """What partial_fit carries between batches: the running per-row statistics, the number of
    batches seen and each batch's mean log-likelihood before its update."""

    running: object
    t: int = 0
    history: tuple = ()
