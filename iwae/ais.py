"""log p(x) by annealed importance sampling (AIS) with HMC transitions, and BDMC bounds.

AIS (Neal 2001) anneals from the encoder q(h|x) to the posterior p(h|x) through
``f_t(h) = (1 - beta_t) log q(h|x) + beta_t log p(x, h)``, as in Wu, Burda, Salakhutdinov, Grosse
(ICLR 2017, "On the quantitative analysis of decoder-based generative models") and Cremer, Li,
Duvenaud (ICML 2018, "Inference suboptimality in variational autoencoders"). Each chain carries
``log w = sum_t (beta_t - beta_{t-1}) (log p(x, h_{t-1}) - log q(h_{t-1}|x))`` with ``E[w] = p(x)``,
so ``log_mean_exp`` over chains is a stochastic lower bound on log p(x) that is exact as T grows.

Bidirectional Monte Carlo (Grosse, Ghahramani, Adams 2015; Grosse, Maddison, Salakhutdinov 2016):
on data simulated from the model the latent that made x is an exact posterior sample, so AIS run
backwards (beta 1 -> 0) from it gives an unbiased estimate of 1/p(x) and hence a stochastic
*upper* bound on log p(x); the two bounds sandwich the truth.

Transitions are HMC (Neal 2011): momentum ~ N(0, I), ``leapfrog`` steps of size eps, a Metropolis
test; one eps per (chain, image), tuned towards an acceptance of 0.65 on a short pilot pass and
then frozen, so the final pass is an exact AIS estimator. Each transition scales eps by a fresh
U(0.5, 1.5) (Neal 2011 advises randomising eps): with a fixed trajectory length, directions
whose period matches it barely move, which doubled the log-weights' spread in our tests. Per-chain tensors are ``(C, B)``: chains
on dim 0, images on dim 1. Noise is drawn per image from a generator seeded by the image's id
(:func:`iwae.evaluate.image_seed`), so an image's estimate does not depend on its batch-mates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from iwae.bounds import log_mean_exp
from iwae.diagnostics import kish_ess
from iwae.evaluate import image_seed
from iwae.latent import LatentModel, scoring
from iwae.settings import AISConfig

_AIS, _REVERSE, _SIMULATE, _BDMC = 2, 3, 4, 5  # stream tags of the per-image seeds (evaluate.py uses 0 and 1)
JITTER = 0.5  # each transition uses eps * U(1 - JITTER, 1 + JITTER)
ADAPT = 1.05  # pilot: eps x1.05 or x0.95 per transition, so 100 transitions can span 0.05 -> 0.5 twice
LogDensity = Callable[[list[Tensor]], Tensor]  # [(C, B, D_l)] -> (C, B)
Generators = torch.Generator | Sequence[torch.Generator]  # one for the batch, or one per image


class AISResult(NamedTuple):
    """One AIS run. For :func:`reverse_ais`, ``log_w`` estimates 1/p(x) and ``log_px`` is the upper bound."""

    log_w: Tensor  # (C, B) log-weights of the chains, nats
    log_px: Tensor  # (B,) log-mean-exp of log_w over chains (negated for a reverse run)
    accept: Tensor  # (B,) mean HMC acceptance over all transitions and chains
    ess: Tensor  # (B,) Kish effective sample size of the chains' weights
    step_size: Tensor  # (C, B) eps used (as adapted when adapt is given)


class BDMCResult(NamedTuple):
    """Bidirectional Monte Carlo on simulated data: ``lower <= log p(x) <= upper`` in expectation."""

    lower: Tensor  # (n,) forward AIS log p-hat, nats
    upper: Tensor  # (n,) reverse AIS: -log-mean-exp of the reverse log-weights, nats
    gap: Tensor  # (n,) upper - lower
    x: Tensor  # (n, X) the simulated images
    forward: AISResult
    reverse: AISResult


def sigmoid_schedule(T: int, delta: float = 4.0) -> Tensor:
    """T+1 betas from exactly 0 to exactly 1 (Grosse et al. 2015; Wu et al. 2017), float64.

    ``beta_t = (s(delta (2t/T - 1)) - s(-delta)) / (s(delta) - s(-delta))`` with s the logistic
    sigmoid: small steps at both ends, where the intermediate distributions change fastest.
    """
    if T < 1:
        raise ValueError(f"the schedule needs T >= 1 temperatures, got {T}")
    s = torch.sigmoid(delta * (2 * torch.arange(T + 1, dtype=torch.float64) / T - 1))  # (T+1,)
    return (s - s[0]) / (s[-1] - s[0])  # x/x and 0/x are exact in IEEE arithmetic


class _State(NamedTuple):
    """A point z ``(C, B, D)`` with log q, log p ``(C, B)`` and their gradients ``(C, B, D)``."""

    z: Tensor
    li: Tensor
    lj: Tensor
    gi: Tensor
    gj: Tensor


def _evaluate(log_init: LogDensity, log_joint: LogDensity, z: Tensor, dims: list[int]) -> _State:
    """Both log-densities and their gradients at z in one backward pass.

    z is stacked twice so that one ``autograd.grad`` returns the two gradients separately (the
    proposal needs ``grad f_beta`` at many betas); chains and images are independent, so the
    gradient of the sum is every (chain, image)'s own gradient.
    """
    with torch.enable_grad():
        zz = torch.stack([z, z]).requires_grad_(True)  # (2, C, B, D)
        li = log_init(list(torch.split(zz[0], dims, dim=-1)))  # (C, B)
        lj = log_joint(list(torch.split(zz[1], dims, dim=-1)))  # (C, B)
        (g,) = torch.autograd.grad(li.sum() + lj.sum(), zz)  # (2, C, B, D)
    return _State(z, li.detach(), lj.detach(), g[0], g[1])


def _draw(gens: Generators, c: int, b: int, d: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Momentum ``(C, B, D)`` and log-uniform ``(C, B)`` for one transition, column by column
    when there is one generator per image (a fixed amount of noise per image and transition)."""
    if isinstance(gens, torch.Generator):
        p = torch.randn(c, b, d, generator=gens, device=gens.device, dtype=like.dtype)
        u = torch.rand(2, c, b, generator=gens, device=gens.device, dtype=like.dtype)
    else:
        p = torch.stack([torch.randn(c, d, generator=g, device=g.device, dtype=like.dtype) for g in gens], 1)
        u = torch.stack([torch.rand(2, c, generator=g, device=g.device, dtype=like.dtype) for g in gens], 2)
    u = u.to(like.device)
    return p.to(like.device), torch.log(u[0]), 1 + JITTER * (2 * u[1] - 1)


def _hmc(
    s0: _State,
    beta: float,
    eps: Tensor,
    leapfrog: int,
    noise: tuple[Tensor, Tensor, Tensor],
    evaluate: Callable[[Tensor], _State],
    metropolis: bool,
    sign: float,
) -> tuple[_State, Tensor, Tensor]:
    """One HMC transition leaving f_beta invariant; returns the new state, accepted and alpha ``(C, B)``."""

    def grad(s: _State) -> Tensor:  # grad log f_beta, (C, B, D)
        return (1 - beta) * s.gi + beta * s.gj

    def log_f(s: _State) -> Tensor:
        return (1 - beta) * s.li + beta * s.lj

    p0, log_u, jitter = noise
    e = (eps * jitter)[..., None]  # (C, B, 1)
    p = p0 + sign * 0.5 * e * grad(s0)  # dp/dt = -dH/dz = +grad log f
    s = s0
    for step in range(leapfrog):
        s = evaluate(s.z + e * p)
        p = p + sign * (1.0 if step < leapfrog - 1 else 0.5) * e * grad(s)
    log_alpha = log_f(s) - 0.5 * (p * p).sum(-1) - log_f(s0) + 0.5 * (p0 * p0).sum(-1)  # -(H1 - H0), (C, B)
    log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf).clamp(max=0.0)  # a diverged trajectory is rejected
    accepted = log_u < log_alpha if metropolis else torch.ones_like(log_alpha, dtype=torch.bool)
    new = _State(*(torch.where(accepted.reshape(accepted.shape + (1,) * (a.dim() - 2)), a, b) for a, b in zip(s, s0)))
    return new, accepted, log_alpha.exp()


@torch.no_grad()
def ais(
    log_init: LogDensity,
    log_joint: LogDensity,
    h0: list[Tensor],
    betas: Tensor,
    step_sizes: Tensor,
    leapfrog: int,
    generator: Generators,
    *,
    adapt: AISConfig | None = None,
    _metropolis: bool = True,
    _leapfrog_sign: float = 1.0,
) -> AISResult:
    """AIS from ``log_init`` (normalised, h0 ~ it) to ``log_joint`` (unnormalised) along ``betas``.

    Args:
        log_init: ``[(C, B, D_l)] -> (C, B)``, the normalised start density, e.g. log q(h|x).
        log_joint: ``[(C, B, D_l)] -> (C, B)``, the unnormalised target, e.g. log p(x, h).
        h0: ``[(C, B, D_l)]`` exact draws from the start density; all layers are annealed jointly.
        betas: ``(T+1,)`` from 0 to 1 (or reversed: then the result estimates 1/Z, see :func:`reverse_ais`).
        step_sizes: ``(C, B)`` leapfrog eps per chain and image.
        leapfrog: leapfrog steps per transition.
        generator: one generator for the batch or one per image (noise drawn column by column).
        adapt: tune eps after each transition with this config's ``target_accept``, ``step_min`` and
            ``step_max`` (x1.05 if the chain's acceptance probability beats the target, else x0.95):
            for pilot passes only, as an eps that depends on the chain's own past biases the weights.

    Returns:
        :class:`AISResult`. ``log w = sum_{t=1..T} (beta_t - beta_{t-1}) (log_joint - log_init)(h_{t-1})``
        where h_t follows an HMC transition that leaves ``f_t`` invariant; ``E[exp(log w)] = Z_T / Z_0``.
    """
    dims = [h.shape[-1] for h in h0]
    z = torch.cat(h0, dim=-1)  # (C, B, D)
    c, b, d = z.shape
    eps = step_sizes.to(z).expand(c, b).clone()  # (C, B)

    def evaluate(z: Tensor) -> _State:
        return _evaluate(log_init, log_joint, z, dims)

    s = evaluate(z)
    log_w = torch.zeros(c, b, dtype=z.dtype, device=z.device)
    accepts = torch.zeros(c, b, dtype=z.dtype, device=z.device)
    beta = betas.tolist()
    for t in range(1, len(beta)):
        log_w += (beta[t] - beta[t - 1]) * (s.lj - s.li)  # weight at the state before transition t
        if t == len(beta) - 1:
            break  # the last transition cannot change the weight
        s, acc, alpha = _hmc(s, beta[t], eps, leapfrog, _draw(generator, c, b, d, z), evaluate, _metropolis, _leapfrog_sign)
        accepts += acc
        if adapt is not None:
            eps = torch.where(alpha > adapt.target_accept, eps * ADAPT, eps * (2 - ADAPT)).clamp(adapt.step_min, adapt.step_max)
    n_moves = max(len(beta) - 2, 1)
    return AISResult(log_w, log_mean_exp(log_w, dim=0), accepts.mean(0) / n_moves, kish_ess(log_w).to(z.dtype), eps)


def reverse_ais(
    log_init: LogDensity, log_joint: LogDensity, h_exact: list[Tensor], betas: Tensor, step_sizes: Tensor, leapfrog: int, generator: Generators, **kw: Any
) -> AISResult:
    """Reverse AIS (Grosse et al. 2015, BDMC): start at exact posterior draws ``h_exact`` ``[(C, B, D_l)]``
    and run the schedule backwards, beta 1 -> 0.

    The same algorithm with the start and target swapped: the log-weights
    ``sum_t (beta_{t-1} - beta_t) (log_joint - log_init)`` estimate ``Z_0 / Z_T = 1 / p(x)`` without
    bias, so their log-mean-exp is a stochastic lower bound on -log p(x) and its negation, returned
    as ``log_px`` ``(B,)``, a stochastic upper bound on log p(x).
    """
    res = ais(log_init, log_joint, h_exact, betas.flip(0), step_sizes, leapfrog, generator, **kw)
    return res._replace(log_px=-res.log_px)


@contextmanager
def _frozen(model: LatentModel) -> Iterator[None]:
    """Parameters out of autograd (gradients reach h only), their flags restored afterwards."""
    params = list(model.parameters()) if callable(getattr(model, "parameters", None)) else []  # type: ignore[attr-defined]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _generators(seed: int, image_ids: Sequence[int], stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, int(i), stream)) for i in image_ids]


def _run_model(
    model: LatentModel, x: Tensor, cfg: AISConfig, gens: list[torch.Generator], h_exact: list[Tensor] | None, step_sizes: Tensor | None
) -> AISResult:
    """Pilot (unless ``step_sizes`` are given) and final pass on the model; reverse when ``h_exact``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("AIS needs gradients in h: call it outside torch.inference_mode (torch.no_grad is fine)")
    c = cfg.chains

    def draw() -> tuple[list[Tensor], LogDensity]:
        prop = model.propose(x, c, gens)  # (C, B, D_l) from each image's own generator
        return [h.detach() for h in prop.h], prop.log_density

    def log_joint(h: list[Tensor]) -> Tensor:
        return model.log_joint(x, h)

    with _frozen(model):
        if step_sizes is None:
            step_sizes = torch.full((c, x.shape[0]), cfg.step_size, dtype=x.dtype, device=x.device)
            if cfg.pilot_steps > 0:
                h0, log_init = draw()
                step_sizes = ais(log_init, log_joint, h0, sigmoid_schedule(cfg.pilot_steps), step_sizes, cfg.leapfrog, gens, adapt=cfg).step_size
        h0, log_init = draw()  # also defines q(h|x) for the reverse run
        if h_exact is None:
            return ais(log_init, log_joint, h0, sigmoid_schedule(cfg.steps), step_sizes, cfg.leapfrog, gens)
        h_start = [h.expand(c, *h.shape[-2:]) for h in h_exact]  # every chain starts at the exact latent
        return reverse_ais(log_init, log_joint, h_start, sigmoid_schedule(cfg.steps), step_sizes, cfg.leapfrog, gens)


def ais_log_px(model: LatentModel, x: Tensor, cfg: AISConfig = AISConfig(), image_ids: Sequence[int] | None = None) -> AISResult:
    """AIS estimate of log p(x) per image, from q(h|x) to p(h|x) (Wu et al. 2017; Cremer et al. 2018).

    Args:
        model: any :class:`~iwae.latent.LatentModel` on x's device and dtype; its parameters get no gradients.
        x: binarised images ``(B, X)``.
        cfg: schedule length, chains, HMC settings and seed.
        image_ids: ``(B,)`` ids that seed each image's noise (default ``0..B-1``); an image's
            estimate is the same in any batch.

    Returns:
        :class:`AISResult` with ``log_px`` ``(B,)`` in nats, a stochastic lower bound on log p(x).
    """
    ids = range(x.shape[0]) if image_ids is None else image_ids
    with scoring(model):  # eval mode: no dropout mask per HMC gradient, no BatchNorm across images and chains
        return _run_model(model, x, cfg, _generators(cfg.seed, ids, _AIS), None, None)


def simulate_by_id(model: LatentModel, image_ids: Sequence[int], seed: int) -> tuple[Tensor, list[Tensor]]:
    """Draws (x, h) from the model, one image per id, each from its own seed: image i is the same in any batch."""
    with torch.no_grad():
        return model.simulate(len(image_ids), [torch.Generator().manual_seed(image_seed(seed, int(i), _SIMULATE)) for i in image_ids])


def bdmc(model: LatentModel, n: int, cfg: AISConfig = AISConfig(), image_ids: Sequence[int] | None = None) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015, 2016; Wu et al. 2017) on n simulated images.

    Forward AIS from q gives ``lower``; reverse AIS from the latent that generated each x gives
    ``upper``; both with the same T, chains and (pilot-tuned, then frozen) step sizes. The gap
    ``upper - lower`` bounds the error of either estimate on data like the simulated ones.
    Simulated image i (``image_ids``, default ``0..n-1``) and its chains are seeded by i alone.
    """
    ids = list(range(n)) if image_ids is None else list(image_ids)
    with scoring(model):  # simulated and scored in eval mode, as AIS is
        x, h = simulate_by_id(model, ids, cfg.seed)
        forward = _run_model(model, x, cfg, _generators(cfg.seed, ids, _BDMC), None, None)  # not the test images' AIS noise
        reverse = _run_model(model, x, cfg, _generators(cfg.seed, ids, _REVERSE), h, forward.step_size)
    return BDMCResult(forward.log_px, reverse.log_px, reverse.log_px - forward.log_px, x, forward, reverse)
