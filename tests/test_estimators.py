"""Gradient estimators: exact identities per sample, and statistical tests of their expectations.

Each statistical test is paired with a control that the same test must reject (a known-biased or
sign-flipped estimator), so the test is shown to have the power to catch such a mistake.
"""

import math

import torch

from iwae.bounds import IWAE, MIWAE, PIWAE, VAE
from iwae.estimators import bound_and_surrogate
from tests.tiny import tiny_model

X = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)


def grads(model, objective, estimator, seed, x=X):
    """(encoder grad, decoder grad) flattened, for one draw of the samples from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    _, surrogate = bound_and_surrogate(model, x, objective, estimator, g)
    model.zero_grad(set_to_none=True)
    surrogate.sum().backward()
    enc = torch.cat([p.grad.flatten() for p in model.encoder_parameters()])
    dec = torch.cat([p.grad.flatten() for p in model.decoder_parameters()])
    return enc, dec


def many(model, objective, estimator, n, seed0=0):
    encs = [grads(model, objective, estimator, seed0 + i)[0] for i in range(n)]
    return torch.stack(encs)  # (n, P)


def max_z(a, b):
    """Largest |z| over coordinates of the difference of two independent sample means."""
    se = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b)).clamp_min(1e-12)
    return ((a.mean(0) - b.mean(0)).abs() / se).max().item()


# With ~70 coordinates, max |z| over independent normals exceeds 4.5 with probability ~5e-4.
Z_SAME, Z_DIFFERENT = 4.5, 6.0


def model():
    return tiny_model(x_dim=6, latent=(2,), hidden=4, seed=1, scale=1.5)


def test_dreg_decoder_gradient_is_the_standard_one_per_sample():
    """DReG and STL change only the encoder: on the same samples the decoder gradient is identical."""
    m = model()
    for est in ("stl", "dreg"):
        _, d_std = grads(m, IWAE(k=5), "standard", seed=7)
        _, d_est = grads(m, IWAE(k=5), est, seed=7)
        assert torch.allclose(d_std, d_est, atol=1e-12)


def test_dreg_matches_standard_iwae_gradient_in_expectation():
    """E[DReG encoder grad] = E[standard IWAE encoder grad] at k=5; a sign flip is detected."""
    m = model()
    std = many(m, IWAE(k=5), "standard", 3000, seed0=0)
    dreg = many(m, IWAE(k=5), "dreg", 3000, seed0=10_000)
    assert max_z(std, dreg) < Z_SAME
    assert max_z(std, -dreg) > Z_DIFFERENT  # power: a wrong sign would be caught


def test_stl_matches_standard_elbo_gradient_at_k1_in_expectation():
    """At k=1 (the ELBO) E[STL grad] = E[standard grad]; STL on IWAE k=5 (biased) is detected."""
    m = model()
    std = many(m, VAE(k=1), "standard", 3000, seed0=0)
    stl = many(m, VAE(k=1), "stl", 3000, seed0=10_000)
    assert max_z(std, stl) < Z_SAME
    # power: STL's IWAE gradient is biased for k > 1 (Tucker et al. 2019) and this test sees it
    std5 = many(m, IWAE(k=5), "standard", 3000, seed0=20_000)
    stl5 = many(m, IWAE(k=5), "stl", 3000, seed0=30_000)
    assert max_z(std5, stl5) > Z_DIFFERENT


def test_stl_catches_a_missing_entropy_term():
    """Dropping log q altogether (a missing term) is rejected by the same k=1 test."""
    m = model()
    std = many(m, VAE(k=1), "standard", 3000, seed0=0)
    wrong = []
    for i in range(3000):
        post = m.sample_q(X, 1, torch.Generator().manual_seed(10_000 + i))
        m.zero_grad(set_to_none=True)
        m.log_p(X, post.h).sum().backward()
        wrong.append(torch.cat([p.grad.flatten() for p in m.encoder_parameters()]))
    assert max_z(std, torch.stack(wrong)) > Z_DIFFERENT


def test_dreg_has_lower_variance_than_standard_near_the_posterior():
    """Tucker et al. 2019: once q is near the posterior, DReG's encoder gradient is far less noisy."""
    m = model()
    opt = torch.optim.Adam(m.encoder_parameters(), lr=1e-2)
    for i in range(600):  # fit q(h|x) to this x first; at a random q no ordering is promised
        _, s = bound_and_surrogate(m, X, IWAE(k=50), "dreg", torch.Generator().manual_seed(10**6 + i))
        opt.zero_grad()
        (-s.sum()).backward()
        opt.step()
    std = many(m, IWAE(k=50), "standard", 300)
    dreg = many(m, IWAE(k=50), "dreg", 300, seed0=5000)
    assert dreg.var(0).sum() < 0.1 * std.var(0).sum()


def test_miwae_1_k_equals_iwae_k_for_every_estimator():
    """MIWAE(1, K) is IWAE(K): same bound and same gradients on the same samples."""
    m = model()
    for est in ("standard", "stl", "dreg"):
        e1, d1 = grads(m, IWAE(k=6), est, seed=3)
        e2, d2 = grads(m, MIWAE(m=1, k=6), est, seed=3)
        assert torch.allclose(e1, e2, atol=1e-12) and torch.allclose(d1, d2, atol=1e-12), est
    g = torch.Generator().manual_seed(0)
    b1, _ = bound_and_surrogate(m, X, IWAE(k=6), "standard", g)
    b2, _ = bound_and_surrogate(m, X, MIWAE(m=1, k=6), "standard", torch.Generator().manual_seed(0))
    assert torch.allclose(b1, b2)


def test_piwae_splits_decoder_and_encoder_gradients():
    """PIWAE(M, K): decoder gets IWAE(MK)'s gradient, encoder gets MIWAE(M, K)'s, on the same samples."""
    m = model()
    for est in ("standard", "stl", "dreg"):
        e_p, d_p = grads(m, PIWAE(m=2, k=3), est, seed=5)
        _, d_iw = grads(m, IWAE(k=6), est, seed=5)
        e_mi, _ = grads(m, MIWAE(m=2, k=3), est, seed=5)
        assert torch.allclose(d_p, d_iw, atol=1e-10), est
        assert torch.allclose(e_p, e_mi, atol=1e-10), est


def test_two_layer_dreg_matches_standard_in_expectation():
    """With two stochastic layers (path through q(h2|h1)) DReG is still unbiased for IWAE."""
    m = tiny_model(x_dim=6, latent=(3, 2), hidden=4, seed=2, scale=1.2)
    std = many(m, IWAE(k=4), "standard", 2500)
    dreg = many(m, IWAE(k=4), "dreg", 2500, seed0=10_000)
    assert max_z(std, dreg) < Z_SAME + math.log(2)  # more coordinates, slightly higher max
