"""Any latent-variable model through the evaluators' protocol (iwae.latent): a user's linear-Gaussian
model, written with torch.distributions and a Gaussian decoder on continuous data, whose log p(x)
is known in closed form; and the paper's model through the adapter, which gives its own numbers."""

import math

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from iwae.adapter import DistributionModel, gaussian_encoder
from iwae.ais import AISConfig, ais_log_px, bdmc
from iwae.evaluate import EvalConfig, binarize_by_id, estimate_log_px
from iwae.latent import check
from tests.tiny import tiny_model


class LinearGaussian:
    """h ~ N(0, I_d), x | h ~ N(W h + b, s^2 I): x ~ N(b, W W^T + s^2 I) exactly. The encoder is the
    exact posterior made worse on purpose (mean shrunk, spread widened), so estimates have work to do."""

    def __init__(self, d: int = 2, x_dim: int = 5, s: float = 0.6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(x_dim, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(x_dim, generator=g, dtype=torch.float64)
        self.s, self.d = s, d
        prec = torch.eye(d, dtype=torch.float64) + self.W.T @ self.W / s**2
        self.cov = torch.linalg.inv(prec)
        self.gain = self.cov @ self.W.T / s**2  # posterior mean = gain (x - b)

    def encoder(self, x):
        mean = 0.8 * (x - self.b) @ self.gain.T  # (B, d)
        return Independent(Normal(mean, 1.3 * self.cov.diagonal().sqrt().expand_as(mean)), 1)

    def decoder(self, h):
        return Independent(Normal(h @ self.W.T + self.b, torch.full_like(h @ self.W.T, self.s)), 1)

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(len(self.b), dtype=torch.float64)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def model(self):
        return DistributionModel(self.encoder, self.decoder, self.d).double()  # float64, as its tensors: the prior's draws follow


def test_a_user_model_with_a_gaussian_decoder_matches_its_closed_form_log_px():
    """k=5000 importance sampling and AIS agree with the exact log p(x) within their errors, per image
    and on average; BDMC's two bounds bracket the exact value on images simulated from the model; the
    model says its log p(x) is a density."""
    lg = LinearGaussian()
    model = check(lg.model())
    x = MultivariateNormal(lg.b, lg.W @ lg.W.T + lg.s**2 * torch.eye(5, dtype=torch.float64)).sample((30,))
    exact = lg.log_px(x)
    ids = list(range(30))
    est = estimate_log_px(model, x, ids, EvalConfig(k=5000, block=500))
    gap = est.log_px - exact
    assert (gap.abs() < 4 * est.mcse + 0.01).all(), (gap, est.mcse)
    assert abs(float(gap.mean())) < 4 * float(est.mcse.square().sum().sqrt()) / 30 + 0.005
    assert float(est.prefix[:, 0].mean()) < float(est.log_px.mean())  # on average L_1 is below L_5000: the bound tightens with k
    assert model.continuous
    a = ais_log_px(model, x, AISConfig(steps=200, chains=16, pilot_steps=50), ids)
    assert abs(float((a.log_px - exact).mean())) < 0.03 and float((a.log_px - exact).abs().max()) < 0.2, a.log_px - exact
    b = bdmc(model, 20, AISConfig(steps=200, chains=16, pilot_steps=50))
    truth = lg.log_px(b.x)
    lo, up = b.lower - truth, b.upper - truth  # stochastic bounds: each one noisy, their means bracket the truth
    assert float(lo.mean()) < 2 * float(lo.std()) / math.sqrt(20) and float(up.mean()) > -2 * float(up.std()) / math.sqrt(20), (lo, up)
    assert float(b.gap.mean()) < 0.1 and float(lo.mean()) < float(up.mean())


def test_the_paper_model_through_the_adapter_gives_its_own_numbers():
    """The paper's model wrapped as encoder and decoder distributions (Normal, Bernoulli logits, N(0, I)
    prior) gives its own per-image L_k and AIS, to float tolerance, from the same seeds per image id."""
    m = tiny_model(x_dim=6, latent=(3,), hidden=8, dtype=torch.float64)
    enc = m.encoders[0]

    def decoder(h):
        return Independent(torch.distributions.Bernoulli(logits=m.decoder_x(h)), 1)

    adapted = DistributionModel(gaussian_encoder(enc), decoder, 3)
    ids = [5, 9, 11, 40]
    x = binarize_by_id(torch.rand(4, 6, dtype=torch.float64), ids, 123)
    cfg = EvalConfig(k=300, block=100)
    a, b = estimate_log_px(m, x, ids, cfg), estimate_log_px(adapted, x, ids, cfg)
    for name in ("log_px", "prefix", "ess", "khat", "mcse", "log_px_jk"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-9, msg=name)
    ac = AISConfig(steps=20, chains=4, pilot_steps=10, leapfrog=3)
    torch.testing.assert_close(ais_log_px(adapted, x, ac, ids).log_px, ais_log_px(m, x, ac, ids).log_px, rtol=1e-7, atol=1e-7)


def test_a_model_without_the_protocol_is_refused_naming_what_it_lacks():
    """A model that lacks a method the evaluators call is refused in one line naming what it lacks."""
    import pytest

    class Half:
        def propose(self, x, k, generators): ...

    with pytest.raises(TypeError, match="it has no log_joint, simulate"):
        check(Half())
