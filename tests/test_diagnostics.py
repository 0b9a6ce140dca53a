"""Per-image reliability of the k-sample estimate: ESS, Pareto k-hat, Monte Carlo error, jackknife,
checked against closed forms (constant weights, the linear-Gaussian model) and against arviz-stats."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from iwae.bounds import iwae_bound, jackknife_bound
from iwae.diagnostics import KHAT_UNRELIABLE, kish_ess, mc_stderr, pareto_khat
from tests.test_bounds import _linear_gaussian


def test_constant_weights_give_ess_k_no_tail_and_no_error():
    """k equal weights: ESS = k exactly, a k-hat that flags nothing, zero Monte Carlo error, jackknife = L_k."""
    for k in (10, 5000):
        log_w = torch.full((k, 3), -7.25, dtype=torch.float64)
        assert torch.allclose(kish_ess(log_w), torch.full((3,), float(k), dtype=torch.float64), rtol=1e-12)
        assert (pareto_khat(log_w) < 0.5).all() if k >= 25 else pareto_khat(log_w).isnan().all()  # < 5 tail draws: no fit
        assert torch.allclose(mc_stderr(log_w), torch.zeros(3, dtype=torch.float64), atol=1e-6)  # roundoff of k/ESS - 1
        assert torch.allclose(jackknife_bound(log_w), iwae_bound(log_w), atol=1e-9)
    jitter = 0.01 * torch.randn(5000, 4, dtype=torch.float64)  # nearly equal weights
    assert (kish_ess(jitter) > 0.99 * 5000).all() and (pareto_khat(jitter) < 0.5).all()


def test_one_dominant_weight_gives_ess_one_and_a_finite_jackknife():
    """A weight e^1000 times the rest: ESS 1, and the leave-one-out sums stay finite (no log 0)."""
    log_w = torch.zeros(50, 2, dtype=torch.float64)
    log_w[7] = 1000.0
    assert torch.allclose(kish_ess(log_w), torch.ones(2, dtype=torch.float64))
    jk = jackknife_bound(log_w)
    assert torch.isfinite(jk).all()
    # closed form: L_k = 1000 - log 50; the 49 leave-one-outs that keep it give 1000 - log 49, the other log(49/49) = 0
    expected = 50 * (1000 - math.log(50)) - 49 * (49 * (1000 - math.log(49)) + 0.0) / 50
    assert jk[0].item() == pytest.approx(expected, abs=1e-6)


def test_jackknife_is_closer_to_exact_log_px_than_l_k_at_small_k():
    """Linear-Gaussian model, q wrong but wide, k=10: the mean jackknife is nearer log p(x) than the mean L_10."""
    log_px, post, log_joint = _linear_gaussian()
    q = MultivariateNormal(post.mean + 0.4, post.covariance_matrix * 2.0)
    h = q.sample((10, 20_000))  # (K, R, d_h): R independent replicates
    log_w = log_joint(h) - q.log_prob(h)  # (K, R)
    bias_lk = (iwae_bound(log_w).mean() - log_px).abs().item()
    bias_jk = (jackknife_bound(log_w).mean() - log_px).abs().item()
    assert bias_jk < 0.5 * bias_lk, (bias_jk, bias_lk)


def test_mc_stderr_matches_the_spread_of_l_k_across_replicates():
    """The delta-method standard error of one L_500 predicts the standard deviation of L_500 over replicates."""
    _, post, log_joint = _linear_gaussian()
    q = MultivariateNormal(post.mean + 0.4, post.covariance_matrix * 2.0)
    h = q.sample((500, 2000))
    log_w = log_joint(h) - q.log_prob(h)  # (K, R)
    spread = iwae_bound(log_w).std().item()
    predicted = mc_stderr(log_w).mean().item()
    assert predicted == pytest.approx(spread, rel=0.15)


def test_prior_as_proposal_for_a_peaked_posterior_has_khat_above_07():
    """q = p(h) while p(h|x) is narrow (noise 0.05): heavy-tailed weights, k-hat > 0.7; the posterior as q: low."""
    _, post, log_joint = _linear_gaussian(d_h=2, d_x=3, noise=0.05)
    prior = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    h = prior.sample((5000, 8))
    log_w = log_joint(h) - prior.log_prob(h)  # (K, B)
    assert (pareto_khat(log_w) > KHAT_UNRELIABLE).all()
    h = post.sample((5000, 8))
    good = log_joint(h) - post.log_prob(h) + 1e-3 * torch.randn(5000, 8, dtype=torch.float64)
    assert (pareto_khat(good) < 0.5).all()


def test_khat_agrees_with_arviz_stats():
    """Our vectorised k-hat equals arviz-stats' psislw on the same weights (arviz takes *negative* log-weights)."""
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    rng = np.random.default_rng(0)
    cols = [rng.normal(0, s, 5000) for s in (0.1, 0.5, 1, 2, 3)] + [rng.standard_t(df, 5000) for df in (1.2, 2, 5)]
    log_w = np.stack(cols, axis=1)  # (K, B)
    for k in (5000, 300):
        ours = pareto_khat(torch.tensor(log_w[:k])).numpy()
        theirs = np.asarray(array_stats.psislw(-log_w[:k].T, r_eff=1, axis=-1)[1])
        assert np.allclose(ours, theirs, atol=1e-10), (ours, theirs)
