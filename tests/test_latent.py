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


def _dropout_batchnorm_model():
    """A user VAE whose encoder and decoder have Dropout and BatchNorm, left in train mode (as a
    factory that never calls ``.eval()`` returns it), its BatchNorm statistics away from their start."""
    from torch import nn

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4))
    dec = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 8))

    def decode(h):
        from torch.distributions import Bernoulli

        return Independent(Bernoulli(logits=dec(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], 8)), 1)

    model = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), decode, latent_dim=2)
    model.enc, model.dec = enc, dec
    for _ in range(5):  # running statistics that differ from a fresh BatchNorm's
        enc(torch.randn(64, 8) * 2 + 1)
        dec(torch.randn(64, 2) * 3)
    return model


def test_every_method_scores_in_eval_mode_independent_of_the_batch_and_leaves_the_model_as_found():
    """Dropout and BatchNorm: k-sample IS, AIS and BDMC of a model left in train mode equal those of
    the same model put in eval mode by hand (dropout would draw a new mask at every HMC gradient, and
    BatchNorm would couple the images and chains of a batch); an image scored alone gets what it gets
    in its batch; and afterwards every submodule is in the mode it was in, its statistics untouched."""
    model = _dropout_batchnorm_model()
    by_hand = _dropout_batchnorm_model().eval()  # built again (its closures hold its own networks), in eval mode by hand
    modes = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    ids = list(range(6))
    ec, ac = EvalConfig(k=64, block=32), AISConfig(steps=20, chains=4, leapfrog=3, pilot_steps=5)
    torch.testing.assert_close(estimate_log_px(model, x, ids, ec).log_px, estimate_log_px(by_hand, x, ids, ec).log_px)
    lone = estimate_log_px(model, x[2:3], [2], ec).log_px
    torch.testing.assert_close(lone, estimate_log_px(model, x, ids, ec).log_px[2:3])
    ais_all = ais_log_px(model, x, ac, ids).log_px
    torch.testing.assert_close(ais_all, ais_log_px(by_hand, x, ac, ids).log_px)
    torch.testing.assert_close(ais_log_px(model, x[4:5], ac, [4]).log_px, ais_all[4:5])
    b1, b2 = bdmc(model, 3, ac), bdmc(by_hand, 3, ac)
    torch.testing.assert_close(b1.forward.log_px, b2.forward.log_px)
    torch.testing.assert_close(b1.upper, b2.upper)
    assert [m.training for m in model.modules()] == modes and any(modes)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, stats[k])


def test_a_user_prior_follows_the_model_to_another_dtype():
    """A prior given as a float32 distribution, the model moved to float64 with ``.to()``: every
    figure is computed in float64, equal to the same model built with a float64 prior."""
    lg = LinearGaussian()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def make(prior):
        return DistributionModel(lg.encoder, lg.decoder, latent_dim=2, prior=prior)

    p32 = Independent(Normal(torch.zeros(2), torch.full((2,), 1.5)), 1)
    p64 = Independent(Normal(torch.zeros(2, dtype=torch.float64), torch.full((2,), 1.5, dtype=torch.float64)), 1)
    a = make(p32).to(torch.float64)
    got = estimate_log_px(a, x, range(4), EvalConfig(k=100, block=50))
    want = estimate_log_px(make(p64).to(torch.float64), x, range(4), EvalConfig(k=100, block=50))
    assert a.prior(x).base_dist.scale.dtype == torch.float64 and a.simulate(1, [torch.Generator().manual_seed(0)])[1][0].dtype == torch.float64
    torch.testing.assert_close(got.log_px, want.log_px, rtol=0, atol=1e-12)
