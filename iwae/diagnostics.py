"""How far to trust one importance-sampled log p(x): pure math on ``(K, B)`` log-weights.

The k=5000 estimate L_k (Burda et al. 2016, sec. 5.1) is a single Monte Carlo number per image.
These per-image diagnostics come from the same log-weights, so they cost no extra model passes:

- ``kish_ess``: Kish's effective sample size ``(sum w)^2 / sum w^2`` (k for equal weights, 1 when
  one weight dominates).
- ``mc_stderr``: the Monte Carlo standard error of L_k by the delta method,
  ``se(log mean w) = sd(w) / (sqrt(k) mean(w)) = sqrt((k/ESS - 1) / (k - 1))`` in nats.
- ``pareto_khat``: the shape of a generalised Pareto fitted to the largest weights (PSIS, Vehtari,
  Simpson, Gelman, Yao, Gabry 2024). Above 0.7 the weights' variance is effectively infinite and
  L_k cannot be trusted however large k looks; below 0.5 the central limit theorem holds.

Shapes: ``log_w`` is ``(K, B)`` (samples on dim 0, images on dim 1); each function returns ``(B,)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KHAT_UNRELIABLE = 0.7  # Vehtari et al. 2024: above this the estimate is unreliable


def kish_ess(log_w: Tensor) -> Tensor:
    """Kish's effective sample size, ``exp(2 lse(log w) - lse(2 log w))``. ``(K, B) -> (B,)``."""
    log_w = log_w.double()  # float32 gives 4999.998 for 5000 equal weights
    return torch.exp(2 * torch.logsumexp(log_w, dim=0) - torch.logsumexp(2 * log_w, dim=0))


def mc_stderr(log_w: Tensor) -> Tensor:
    """Delta-method standard error of ``L_k = log mean w`` (nats). ``(K, B) -> (B,)``.

    ``Var(mean w) = s^2 / k`` with the sample variance ``s^2``; dividing by ``mean(w)^2`` gives
    ``(k / ESS - 1) / (k - 1)`` through Kish's ESS, which stays finite for any scale of ``log_w``.
    """
    k = log_w.shape[0]
    if k < 2:
        return torch.full(log_w.shape[1:], math.nan, dtype=log_w.dtype, device=log_w.device)
    return torch.sqrt(((k / kish_ess(log_w)) - 1).clamp(min=0) / (k - 1))


def psis_tail_length(k: int) -> int:
    """PSIS tail length: ``floor(3 sqrt(k))`` for k > 225, else ``floor(k / 5)`` (Vehtari et al. 2024
    with r_eff = 1; the same rule as arviz-stats, so the two agree to rounding)."""
    return int(math.floor(3 * math.sqrt(k))) if k > 225 else k // 5


def _gpd_khat(x: Tensor) -> Tensor:
    """Shape of a generalised Pareto fitted to exceedances ``x`` ``(B, M)`` sorted ascending, > 0.

    Zhang & Stephens (2009) empirical Bayes fit with the weakly informative prior of PSIS
    (``prior_k = 10`` pseudo-observations at 0.5), as in loo/arviz ``_gpdfit``.
    """
    b_, m = x.shape
    m_est = 30 + int(m**0.5)
    j = torch.arange(1, m_est + 1, dtype=x.dtype, device=x.device)
    quart = x[:, int(m / 4 + 0.5) - 1 : int(m / 4 + 0.5)]  # (B, 1): first quartile
    theta = 1 - torch.sqrt(m_est / (j - 0.5))  # (m_est,)
    theta = theta[None, :] / (3 * quart) + 1 / x[:, -1:]  # (B, m_est)
    k_theta = torch.log1p(-theta[:, :, None] * x[:, None, :]).mean(dim=-1)  # (B, m_est)
    log_lik = m * (torch.log(-theta / k_theta) - k_theta - 1)  # (B, m_est) profile log-likelihood
    post = torch.softmax(log_lik, dim=1)
    post = torch.where(post >= 10 * torch.finfo(x.dtype).eps, post, torch.zeros_like(post))
    post = post / post.sum(dim=1, keepdim=True)
    theta_hat = (theta * post).sum(dim=1, keepdim=True)  # (B, 1)
    k_hat = torch.log1p(-theta_hat * x).mean(dim=1)  # (B,)
    return (m * k_hat + 10 * 0.5) / (m + 10)


def pareto_khat(log_w: Tensor) -> Tensor:
    """PSIS Pareto k-hat of each column's importance weights. ``(K, B) -> (B,)``.

    The largest ``M = psis_tail_length(K)`` weights, less the next largest (the cut-off), are fitted
    in the scale ``w / max w``. A column whose tail is flat (all of them equal to the cut-off, e.g.
    equal weights) has no tail at all: ``-inf``.
    """
    log_w = log_w.double()
    k = log_w.shape[0]
    m = psis_tail_length(k)
    if k < 5 or m < 5 or m + 1 > k:
        return torch.full(log_w.shape[1:], math.nan, dtype=torch.float64, device=log_w.device)
    top = torch.topk(log_w, m + 1, dim=0).values  # (M+1, B) descending
    top = top - top[:1]  # w / max w, in logs
    cut = top[-1]  # (B,) the largest weight outside the tail
    x = (torch.exp(top[:-1]) - torch.exp(cut)).T.flip(dims=(1,))  # (B, M) ascending exceedances
    flat = x[:, -1] <= 0
    x = torch.where(flat[:, None], torch.ones_like(x), x)  # placeholder, masked below
    x = x.clamp(min=torch.finfo(torch.float64).tiny)
    out = _gpd_khat(x)
    return torch.where(flat, torch.full_like(out, -math.inf), out)
