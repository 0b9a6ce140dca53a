"""Bound math: identities, stability, closed forms (linear-Gaussian) in float64."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from iwae.bounds import CIWAE, IWAE, MIWAE, PIWAE, VAE, ciwae_bound, iwae_bound, log_mean_exp, miwae_bound, objective_from_dict, vae_bound


def test_log_mean_exp_is_stable():
    """log_mean_exp is finite for huge and tiny inputs and treats -inf as a zero weight."""
    x = torch.tensor([[1000.0, -1000.0, 5.0], [1000.0, -1000.0, -math.inf]], dtype=torch.float64)
    out = log_mean_exp(x, dim=0)
    assert torch.allclose(out[:2], torch.tensor([1000.0, -1000.0], dtype=torch.float64))
    assert out[2].item() == pytest.approx(5.0 - math.log(2))
    all_neg_inf = log_mean_exp(torch.full((3, 1), -math.inf))
    assert all_neg_inf.item() == -math.inf and not torch.isnan(all_neg_inf).any()


def test_k1_iwae_equals_vae_on_same_sample():
    """With one sample the IWAE bound is exactly the ELBO."""
    log_w = torch.randn(1, 7, dtype=torch.float64) * 30
    assert torch.equal(iwae_bound(log_w), vae_bound(log_w))


def test_iwae_at_least_vae_and_jensen_gap():
    """L_k >= ELBO_k on every sample set (Jensen), equality only for equal weights."""
    log_w = torch.randn(10, 100, dtype=torch.float64) * 5
    assert (iwae_bound(log_w) >= vae_bound(log_w) - 1e-12).all()
    flat = torch.full((4, 3), -2.5, dtype=torch.float64)
    assert torch.allclose(iwae_bound(flat), vae_bound(flat))


def test_miwae_special_cases():
    """MIWAE(1, K) = IWAE(K); MIWAE(M, 1) = VAE(M); groups are the leading chunks of dim 0."""
    log_w = torch.randn(12, 5, dtype=torch.float64) * 3
    assert torch.allclose(miwae_bound(log_w, 1), iwae_bound(log_w))
    assert torch.allclose(miwae_bound(log_w, 12), vae_bound(log_w))
    manual = torch.stack([iwae_bound(log_w[i * 4 : (i + 1) * 4]) for i in range(3)]).mean(0)
    assert torch.allclose(miwae_bound(log_w, 3), manual)


def test_ciwae_endpoints():
    """CIWAE(beta=1) is the ELBO and CIWAE(beta=0) is IWAE."""
    log_w = torch.randn(6, 4, dtype=torch.float64)
    assert torch.allclose(ciwae_bound(log_w, 1.0), vae_bound(log_w))
    assert torch.allclose(ciwae_bound(log_w, 0.0), iwae_bound(log_w))


def test_grad_weights_equal_autograd_of_bound():
    """Each objective's (non-DReG) weights reproduce autograd of its bound w.r.t. log w."""
    for obj in (VAE(k=6), IWAE(k=6), MIWAE(m=2, k=3), CIWAE(k=6, beta=0.3)):
        log_w = (torch.randn(6, 4, dtype=torch.float64) * 4).requires_grad_()
        (g,) = torch.autograd.grad(obj.bound(log_w).sum(), log_w)
        dec, enc = obj.grad_weights(log_w)
        assert torch.allclose(dec, g) and torch.allclose(enc, g), type(obj).__name__
    # PIWAE: decoder follows IWAE(MK), encoder follows MIWAE(M, K)
    log_w = torch.randn(6, 4, dtype=torch.float64).requires_grad_()
    dec, enc = PIWAE(m=2, k=3).grad_weights(log_w)
    (g_iw,) = torch.autograd.grad(iwae_bound(log_w).sum(), log_w)
    (g_mi,) = torch.autograd.grad(miwae_bound(log_w, 2).sum(), log_w)
    assert torch.allclose(dec, g_iw) and torch.allclose(enc, g_mi)


def test_objectives_validate():
    """Bad objective arguments are rejected with a message; unknown names raise TypeError."""
    with pytest.raises(ValueError, match="k must be"):
        IWAE(k=0)
    with pytest.raises(ValueError, match="beta"):
        CIWAE(k=2, beta=1.5)
    with pytest.raises(TypeError, match="unknown objective"):
        objective_from_dict({"name": "elbo2"})
    assert objective_from_dict({"name": "miwae", "m": 2, "k": 3}).num_samples == 6


def _linear_gaussian(d_h=2, d_x=3, noise=0.5):
    """p(h) = N(0, I), p(x|h) = N(W h + b, noise^2 I): exact p(x) and p(h|x) in closed form."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d_x, d_h, generator=g, dtype=torch.float64)
    b = torch.randn(d_x, generator=g, dtype=torch.float64)
    x = torch.randn(d_x, generator=g, dtype=torch.float64)
    marginal = MultivariateNormal(b, W @ W.T + noise**2 * torch.eye(d_x, dtype=torch.float64))
    prec = torch.eye(d_h, dtype=torch.float64) + W.T @ W / noise**2
    cov = torch.linalg.inv(prec)
    mean = cov @ W.T @ (x - b) / noise**2
    posterior = MultivariateNormal(mean, cov)

    def log_joint(h):  # (K, d_h) -> (K,)
        prior = Normal(0.0, 1.0).log_prob(h).sum(-1)
        lik = Normal(h @ W.T + b, noise).log_prob(x).sum(-1)
        return prior + lik

    return marginal.log_prob(x).item(), posterior, log_joint


def test_exact_posterior_gives_log_px_for_every_k():
    """With q = p(h|x) every weight equals p(x), so every L_k is exactly log p(x)."""
    log_px, post, log_joint = _linear_gaussian()
    for k in (1, 5, 50):
        h = post.sample((k,))
        log_w = (log_joint(h) - post.log_prob(h)).unsqueeze(1)  # (K, 1)
        assert iwae_bound(log_w).item() == pytest.approx(log_px, abs=1e-10)


def test_linear_gaussian_bound_rises_with_k_below_log_px_and_k5000_is_close():
    """Mean L_k rises with k, stays below log p(x), and L_5000 is within 0.05 nats of it."""
    log_px, post, log_joint = _linear_gaussian()
    q = MultivariateNormal(post.mean + 0.4, post.covariance_matrix * 2.0)  # a wrong but wide q
    means, ses = [], []
    for k in (1, 5, 50, 500):
        h = q.sample((k, 2000))  # (K, R, d_h): R independent replicates of the bound
        bounds = iwae_bound(log_joint(h) - q.log_prob(h))  # (R,)
        means.append(bounds.mean().item())
        ses.append(bounds.std().item() / math.sqrt(bounds.numel()))
    for i in range(3):  # Theorem 1: E L_k non-decreasing in k (up to 3 standard errors)
        assert means[i + 1] > means[i] - 3 * math.hypot(ses[i], ses[i + 1]), means
    assert means[0] < means[1] < means[2]  # the early steps are far larger than the noise
    assert all(m < log_px + 3 * s for m, s in zip(means, ses))
    h = q.sample((5000, 1))
    est = iwae_bound(log_joint(h) - q.log_prob(h)).item()
    assert abs(est - log_px) < 0.05
