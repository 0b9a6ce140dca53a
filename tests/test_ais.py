"""AIS and BDMC: exact against closed forms (linear-Gaussian) and quadrature (a 2-d IWAE), unbiased
only when the algorithm is right (power controls), and per-image deterministic. float64 throughout."""

import functools
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from iwae.ais import AISConfig, AISResult, ais, ais_log_px, bdmc, reverse_ais, sigmoid_schedule
from iwae.bounds import log_mean_exp
from tests.test_models import exact_log_px_by_quadrature
from tests.tiny import tiny_model

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
TOL = 0.02  # nats: mean |AIS - exact| over the images of the linear-Gaussian model
C, T, L = 1024, 500, 5  # chains, temperatures, leapfrog steps of the linear-Gaussian checks


class LinearGaussian:
    """h ~ N(0, I_3), x | h ~ N(W h + b, s^2 I_5), so log p(x) = log N(x; b, W W^T + s^2 I) exactly.

    The start q is a poor mean-field fit: the posterior's mean shifted by 2.5 marginal sds, its
    marginal sds widened 1.5x, no correlations (k=1024 importance sampling from it is 0.3-0.9
    nats off). Each x also lies ``off_nats`` off the model's range (a residual orthogonal to W's
    columns): a constant in h that AIS must carry to the last temperature, so a schedule that
    stops early is off by about ``(1 - beta_{T-1}) * off_nats``.
    """

    def __init__(self, n: int = 4, d_h: int = 3, d_x: int = 5, s: float = 0.5, off_nats: float = 600.0, shift: float = 2.5, widen: float = 1.5):
        g = torch.Generator().manual_seed(1)
        self.W = torch.randn(d_x, d_h, generator=g, dtype=F64)
        self.b = torch.randn(d_x, generator=g, dtype=F64)
        self.s, self.d_h, self.d_x, self.n = s, d_h, d_x, n
        h_true = torch.randn(n, d_h, generator=g, dtype=F64)
        x = h_true @ self.W.T + self.b + s * torch.randn(n, d_x, generator=g, dtype=F64)  # (n, X)
        basis, _ = torch.linalg.qr(torch.cat([self.W, torch.randn(d_x, d_x - d_h, generator=g, dtype=F64)], 1))
        self.x = x + math.sqrt(2 * off_nats) * s * basis[:, d_h]  # orthogonal to W's columns
        self.exact = MultivariateNormal(self.b, self.W @ self.W.T + s**2 * torch.eye(d_x, dtype=F64)).log_prob(self.x)  # (n,)
        cov = torch.linalg.inv(torch.eye(d_h, dtype=F64) + self.W.T @ self.W / s**2)
        self.post_mean = (self.x - self.b) @ self.W @ cov / s**2  # (n, d_h)
        self.post_chol = torch.linalg.cholesky(cov)
        sd = cov.diagonal().sqrt()
        self.q_mean, self.q_sd = self.post_mean + shift * sd, widen * sd  # (n, d_h), (d_h,)

    def log_init(self, h: list[torch.Tensor]) -> torch.Tensor:  # [(C, n, d_h)] -> (C, n)
        z = (h[0] - self.q_mean) / self.q_sd
        return -0.5 * (z * z).sum(-1) - self.q_sd.log().sum() - 0.5 * self.d_h * LOG_2PI

    def log_joint(self, h: list[torch.Tensor]) -> torch.Tensor:  # [(C, n, d_h)] -> (C, n)
        r = self.x - h[0] @ self.W.T - self.b
        return -0.5 * (h[0] ** 2).sum(-1) - 0.5 * (r * r).sum(-1) / self.s**2 - self.d_x * math.log(self.s) - 0.5 * (self.d_h + self.d_x) * LOG_2PI

    def sample_q(self, c: int, g: torch.Generator) -> list[torch.Tensor]:
        return [self.q_mean + self.q_sd * torch.randn(c, self.n, self.d_h, generator=g, dtype=F64)]

    def sample_posterior(self, c: int, g: torch.Generator) -> list[torch.Tensor]:
        return [self.post_mean + torch.randn(c, self.n, self.d_h, generator=g, dtype=F64) @ self.post_chol.T]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast as two and leaves the other core free."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def _lg() -> LinearGaussian:
    return LinearGaussian()


@functools.cache
def _lg_pilot(seed: int, hook_items: tuple) -> torch.Tensor:
    """Step sizes ``(C, n)`` tuned on a 100-temperature pilot pass (with the same hooks as the run)."""
    m, g = _lg(), torch.Generator().manual_seed(1000 + seed)
    eps = torch.full((C, m.n), 0.05, dtype=F64)
    return ais(m.log_init, m.log_joint, m.sample_q(C, g), sigmoid_schedule(100), eps, L, g, adapt=AISConfig(), **dict(hook_items)).step_size


def _lg_run(steps: int = T, seed: int = 0, fixed_eps: float | None = None, reverse: bool = False, skip_last: bool = False, **hooks: float) -> AISResult:
    """AIS on the linear-Gaussian with C chains, eps from a pilot unless ``fixed_eps``. ``reverse`` starts
    at exact posterior draws and runs beta 1 -> 0; ``skip_last`` drops beta_T = 1; ``hooks`` are the
    transition's private test hooks (``_metropolis``, ``_leapfrog_sign``)."""
    return _lg_run_cached(steps, seed, fixed_eps, reverse, skip_last, tuple(sorted(hooks.items())))


@functools.cache
def _lg_run_cached(steps: int, seed: int, fixed_eps: float | None, reverse: bool, skip_last: bool, hook_items: tuple) -> AISResult:
    hooks = dict(hook_items)
    m, g = _lg(), torch.Generator().manual_seed(seed)
    eps = _lg_pilot(seed, hook_items) if fixed_eps is None else torch.full((C, m.n), fixed_eps, dtype=F64)
    betas = sigmoid_schedule(steps)[:-1] if skip_last else sigmoid_schedule(steps)
    if reverse:
        return reverse_ais(m.log_init, m.log_joint, m.sample_posterior(C, g), betas, eps, L, g, **hooks)
    return ais(m.log_init, m.log_joint, m.sample_q(C, g), betas, eps, L, g, **hooks)  # type: ignore[arg-type]


def _error(res: AISResult) -> float:
    """The check of the linear-Gaussian tests: mean over images of |log p-hat - log p(x)| (all C chains), nats."""
    return (res.log_px - _lg().exact).abs().mean().item()


def _error16(res: AISResult) -> float:
    """Mean |error| of a 16-chain estimate (the default config) over the C/16 independent groups and the images."""
    l16 = log_mean_exp(res.log_w.reshape(C // 16, 16, -1), dim=1)  # (C/16, n)
    return (l16 - _lg().exact).abs().mean().item()


def test_config_is_validated_and_schedule_runs_from_exactly_0_to_1():
    """Bad settings raise a one-line ValueError; the sigmoid schedule is monotone from exactly 0 to 1."""
    for bad in (dict(steps=0), dict(chains=-1), dict(leapfrog=2.5), dict(step_size=0.0), dict(step_size=1.0), dict(target_accept=1.0), dict(seed=-1)):
        with pytest.raises(ValueError, match="must|need"):
            AISConfig(**bad)  # type: ignore[arg-type]
    for n in (1, 7, 500):
        b = sigmoid_schedule(n)
        assert b.shape == (n + 1,) and b[0].item() == 0.0 and b[-1].item() == 1.0 and (b.diff() > 0).all()
    b = sigmoid_schedule(500)
    assert b[1] < b[251] - b[250]  # small steps at the ends, where the distributions change fastest


def test_ais_matches_linear_gaussian_log_px():
    """T=500, 1024 chains: within 0.02 nats of the closed-form log p(x), where k=1024 IS is several times further."""
    m, res = _lg(), _lg_run()
    g = torch.Generator().manual_seed(5)
    h = m.sample_q(C, g)
    is_error = (log_mean_exp(m.log_joint(h) - m.log_init(h)) - m.exact).abs().mean().item()
    assert _error(res) < TOL < is_error / 3, (_error(res), is_error)
    assert res.log_w.shape == (C, m.n) and res.log_px.shape == res.accept.shape == res.ess.shape == (m.n,)
    assert (0.5 < res.accept).all() and (res.accept < 0.95).all()  # eps tuned towards 0.65 at the last temperatures
    assert (res.ess > C / 2).all() and (res.ess <= C).all()


def test_ais_error_shrinks_with_more_temperatures():
    """Mean |error| of 16-chain estimates (64 independent groups x 4 images) falls from T=10 to 100 to 500."""
    e10, e100, e500 = (_error16(_lg_run(t)) for t in (10, 100, T))
    assert e10 > 2 * e100 and e100 > 1.5 * e500, (e10, e100, e500)


def test_forward_and_reverse_ais_bracket_linear_gaussian_log_px():
    """Forward AIS from q is a stochastic lower bound and reverse AIS from exact posterior draws an upper one.

    A single chain's log w (mean over chains and images) brackets log p(x) with a wide gap at T=10
    and a narrow one at T=500; the C-chain estimates close to within 0.02 nats at T=500."""
    exact = _lg().exact.mean().item()
    for steps, margin in ((10, 0.3), (T, 0.01)):
        lo, hi = _lg_run(steps).log_w.mean().item(), -_lg_run(steps, reverse=True).log_w.mean().item()
        assert lo < exact - margin and hi > exact + margin, (steps, lo - exact, hi - exact)
    lo, hi = _lg_run().log_px.mean().item(), _lg_run(reverse=True).log_px.mean().item()
    assert lo < exact + TOL and hi > exact - TOL and hi - lo < TOL, (lo - exact, hi - exact)


def test_control_hmc_without_metropolis_fails_the_check():
    """Power control: at a fixed eps = 0.3 the check passes with the Metropolis test and fails without it."""
    ok, bad = _error(_lg_run(fixed_eps=0.3)), _error(_lg_run(fixed_eps=0.3, _metropolis=False))
    assert ok < TOL and bad > 5 * TOL, (ok, bad)


def test_control_schedule_missing_the_last_temperature_fails_the_check():
    """Power control: betas ending at beta_{T-1} < 1 miss (1 - beta_{T-1}) log p(x, h)/q(h) and fail the check."""
    err = _error(_lg_run(skip_last=True))
    assert err > 5 * TOL, err


def test_control_reversed_leapfrog_momentum_sign_fails_the_check():
    """Power control: leapfrog kicks of the wrong sign (in the pilot and the run) fail the check.

    The Metropolis test still keeps each kernel valid, but trajectories run away from the mode:
    the pilot shrinks eps ~30x to get proposals accepted, the chains hardly move and AIS decays
    towards importance sampling from q."""
    res = _lg_run(_leapfrog_sign=-1.0)
    assert _error(res) > 5 * TOL and res.step_size.median() < 0.1 * _lg_run().step_size.median(), (_error(res), res.step_size.median())


@functools.cache
def _model_2d():
    """A Bernoulli IWAE with a 2-d latent and a crude q(h|x) = N(mu(x), I) (random mean net, unit sds)."""
    m = tiny_model(x_dim=20, latent=(2,), hidden=16, seed=3, scale=2.5)
    with torch.no_grad():
        m.encoders[0].log_sigma.weight.zero_()
        m.encoders[0].log_sigma.bias.zero_()
        m.encoders[0].mu.weight.mul_(0.5)
    return m


def test_ais_log_px_matches_quadrature_on_a_2d_iwae():
    """On an IWAEModel with a 2-d latent, ais_log_px is within 0.05 nats of log p(x) by quadrature."""
    m = _model_2d()
    x = torch.bernoulli(torch.full((4, 20), 0.5, dtype=F64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = exact_log_px_by_quadrature(m, x, n=401, lim=8.0)
    res = ais_log_px(m, x, AISConfig(chains=256))
    assert (res.log_px - exact).abs().max() < 0.05, (res.log_px, exact)
    assert all(p.grad is None and p.requires_grad for p in m.parameters())  # frozen during AIS, restored after


def test_estimate_of_an_image_does_not_depend_on_its_batch():
    """Images [a, b, c] together give the same estimates as [a] and [b, c] alone (2-layer model)."""
    m = tiny_model(x_dim=6, latent=(3, 2), hidden=8, seed=1, scale=1.5)
    x = torch.bernoulli(torch.full((3, 6), 0.5, dtype=F64), generator=torch.Generator().manual_seed(2))
    cfg = AISConfig(steps=20, chains=4, pilot_steps=10)
    ids = [7, 11, 42]
    both = ais_log_px(m, x, cfg, ids)
    parts = [ais_log_px(m, x[:1], cfg, ids[:1]), ais_log_px(m, x[1:], cfg, ids[1:])]
    for name in ("log_w", "log_px", "accept", "step_size"):
        alone = torch.cat([getattr(p, name) for p in parts], dim=-1)
        assert torch.allclose(getattr(both, name), alone, rtol=0, atol=1e-10), name
    assert not torch.allclose(both.log_px, ais_log_px(m, x, AISConfig(steps=20, chains=4, pilot_steps=10, seed=1), ids).log_px)


def test_bdmc_brackets_quadrature_on_simulated_data():
    """BDMC on 16 images simulated from the 2-d model (T=200, 32 chains): on average over the images
    lower <= log p(x) <= upper to Monte Carlo error (and so the gap >= 0 to it); a single chain's forward
    and reverse log-weights bracket log p(x) with a clear margin."""
    m = _model_2d()
    res = bdmc(m, 16, AISConfig(steps=200, chains=32, pilot_steps=50, seed=3))
    with torch.no_grad():
        exact = exact_log_px_by_quadrature(m, res.x, n=401, lim=8.0).mean().item()
    lo, hi = res.lower.mean().item(), res.upper.mean().item()
    assert lo < exact + 0.05 and hi > exact - 0.05 and res.gap.mean() > -0.08, (lo - exact, hi - exact)  # both near-exact here: noise
    lo1, hi1 = res.forward.log_w.mean().item(), -res.reverse.log_w.mean().item()
    assert lo1 < exact - 0.02 and hi1 > exact + 0.02, (lo1 - exact, hi1 - exact)
    assert torch.allclose(res.gap, res.upper - res.lower) and res.x.shape == (16, 20) and set(res.x.unique().tolist()) <= {0.0, 1.0}


def test_bdmc_shards_give_the_same_images_and_bounds():
    """Simulated image i and its chains are seeded by i alone: ids [0..4] at once or as [0, 1] + [2, 3, 4]
    give the same images and the same bounds (what lets the pipeline shard BDMC)."""
    m = _model_2d()
    cfg = AISConfig(steps=10, chains=4, pilot_steps=5, seed=1)
    whole = bdmc(m, 5, cfg)
    parts = [bdmc(m, 2, cfg, image_ids=[0, 1]), bdmc(m, 3, cfg, image_ids=[2, 3, 4])]
    assert torch.equal(whole.x, torch.cat([p.x for p in parts]))
    assert torch.allclose(whole.lower, torch.cat([p.lower for p in parts]), atol=1e-10)
    assert torch.allclose(whole.upper, torch.cat([p.upper for p in parts]), atol=1e-10)
