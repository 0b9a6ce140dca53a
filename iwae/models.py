"""The paper's VAE/IWAE architecture (Burda et al. 2016, sec. 5.1 and App. C).

Tanh MLPs; diagonal Gaussian latents whose network predicts ``mu`` and ``log sigma`` with two
separate linear heads (sigma = exp(linear), a standard deviation as in the authors' code); a
Bernoulli visible layer on logits; prior N(0, I) on the top layer. Glorot-uniform weights, zero
biases, and the last decoder bias at logit(mean training pixel).

Hot path: x is encoded once and the K samples are drawn as a ``(K, B, D)`` tensor; the
decoder runs on all of them in one batched matmul. Never repeat x K times before the encoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwae.config import ModelConfig
from iwae.latent import Proposal, normal_draws

LOG_2PI = math.log(2.0 * math.pi)


def glorot_linear(n_in: int, n_out: int) -> nn.Linear:
    """Linear layer with W ~ U(-s, s), s = sqrt(6 / (n_in + n_out)) and zero bias (authors' nnet.py)."""
    lin = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def mlp(n_in: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [glorot_linear(n_in, h), nn.Tanh()]
        n_in = h
    return nn.Sequential(*layers)


class GaussianLayer(nn.Module):
    """Conditional diagonal Gaussian: input -> tanh MLP -> (mu, log sigma)."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int):
        super().__init__()
        self.body = mlp(n_in, hidden)
        width = hidden[-1] if hidden else n_in
        self.mu = glorot_linear(width, n_out)
        self.log_sigma = glorot_linear(width, n_out)

    def forward(self, inp: Tensor) -> tuple[Tensor, Tensor]:
        z = self.body(inp)
        return self.mu(z), self.log_sigma(z)


class BernoulliLayer(nn.Module):
    """Conditional factorised Bernoulli: input -> tanh MLP -> logits."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int):
        super().__init__()
        self.body = mlp(n_in, hidden)
        self.logits = glorot_linear(hidden[-1] if hidden else n_in, n_out)

    def forward(self, inp: Tensor) -> Tensor:
        return self.logits(self.body(inp))


def gaussian_log_prob(h: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """log N(h; mu, diag(exp(log_sigma))^2) summed over the last dim (nats)."""
    z = (h - mu) * torch.exp(-log_sigma)
    return -0.5 * (z * z + LOG_2PI).sum(-1) - log_sigma.sum(-1)


def std_normal_log_prob(h: Tensor) -> Tensor:
    """log N(h; 0, I) summed over the last dim."""
    return -0.5 * (h * h + LOG_2PI).sum(-1)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over the last dim.

    From logits, never sigmoid-then-log: x*l - softplus(l) = x log s(l) + (1-x) log s(-l),
    exact and finite for any logit (no clipping).
    """
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


@dataclass
class Posterior:
    """Samples from q and what is needed to score them. Lists run bottom-up (h1 first)."""

    h: list[Tensor]  # each (K, B, D_l)
    eps: list[Tensor]  # each (K, B, D_l)
    mu: list[Tensor]  # (B, D_1) for layer 1, (K, B, D_l) above
    log_sigma: list[Tensor]


class IWAEModel(nn.Module):
    """Generative model p(x, h) and recognition model q(h | x) of paper sec. 2 / App. C."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dims = (cfg.x_dim, *cfg.latent)
        # q(h_{l+1} | h_l), l = 0..L-1 with h_0 = x
        self.encoders = nn.ModuleList(GaussianLayer(dims[i], cfg.hidden_q[i], dims[i + 1]) for i in range(len(cfg.latent)))
        # p(h_l | h_{l+1}) for l = 1..L-1 (Gaussian), p(x | h_1) (Bernoulli)
        self.decoder_x = BernoulliLayer(dims[1], cfg.hidden_p[0], dims[0])
        self.decoders = nn.ModuleList(GaussianLayer(dims[i + 1], cfg.hidden_p[i], dims[i]) for i in range(1, len(cfg.latent)))

    @property
    def num_layers(self) -> int:
        return len(self.cfg.latent)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoders.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder_x.parameters()) + list(self.decoders.parameters())

    @torch.no_grad()
    def init_output_bias(self, mean_pixel: Tensor) -> None:
        """Last decoder bias = logit(clip(mean training pixel, 1e-3, 1 - 1e-3)) (authors' iwae.py)."""
        p = mean_pixel.clamp(1e-3, 1 - 1e-3).to(self.decoder_x.logits.bias)
        self.decoder_x.logits.bias.copy_(torch.log(p) - torch.log1p(-p))

    def sample_q(self, x: Tensor, k: int, generator: torch.Generator | None = None, eps: Sequence[Tensor] | None = None) -> Posterior:
        """Draw K samples of every latent layer given x ``(B, X)``: encode x once.

        ``eps`` (optional, one ``(K, B, D_l)`` tensor per layer) fixes the noise; otherwise it is
        drawn from ``generator``.
        """
        post = Posterior([], [], [], [])
        inp = x  # (B, X) for the first layer, then (K, B, D)
        for i, enc in enumerate(self.encoders):
            mu, log_sigma = enc(inp)  # (B, D) or (K, B, D)
            shape = (k, *x.shape[:-1], self.cfg.latent[i])
            e = eps[i] if eps is not None else torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            h = mu + torch.exp(log_sigma) * e  # (K, B, D) by broadcasting
            post.h.append(h)
            post.eps.append(e)
            post.mu.append(mu)
            post.log_sigma.append(log_sigma)
            inp = h
        return post

    def log_q_standard(self, post: Posterior) -> Tensor:
        """log q(h | x) at its own samples: -0.5 eps^2 - log sigma - c; exact total derivative. ``(K, B)``."""
        out = torch.zeros((), device=post.h[0].device, dtype=post.h[0].dtype)
        for e, ls in zip(post.eps, post.log_sigma):
            out = out - 0.5 * (e * e + LOG_2PI).sum(-1) - ls.sum(-1)
        return out

    def log_q_at(self, h: Sequence[Tensor], post: Posterior, stop_params: bool) -> Tensor:
        """log q(h | x) at samples ``h`` (``[(K, B, D_l)]``) drawn as ``post``. ``(K, B)``.

        ``stop_params=True`` holds q's *parameters* constant while gradients flow through h: the
        path derivative of STL (Roeder et al. 2017) and DReG (Tucker et al. 2019). Otherwise the
        gradient reaches q's parameters (with detached h, the score term). Layer 1's (mu, sigma)
        depend on x only and are reused from ``post``; a higher layer's depend on the sample
        below, so they are recomputed at ``h``.
        """
        mu0, ls0 = post.mu[0], post.log_sigma[0]
        if stop_params:
            mu0, ls0 = mu0.detach(), ls0.detach()
        out = gaussian_log_prob(h[0], mu0, ls0)
        for i in range(1, len(h)):
            enc = self.encoders[i]
            if stop_params:
                params = {n: p.detach() for n, p in enc.named_parameters()}
                mu, ls = torch.func.functional_call(enc, params, (h[i - 1],))
            else:
                mu, ls = enc(h[i - 1])
            out = out + gaussian_log_prob(h[i], mu, ls)
        return out

    def log_p(self, x: Tensor, h: Sequence[Tensor], fold_x: bool = False) -> Tensor:
        """log p(x, h) = log p(x | h1) + sum_l log p(h_l | h_{l+1}) + log p(h_L). ``(K, B)``.

        ``fold_x`` computes the x-term of the Bernoulli likelihood as ``z . (x W) + x . b`` on the
        last hidden layer z (``(K, B, H)``) instead of ``x . logits`` on ``(K, B, X)``: the same
        value with a 4x smaller elementwise pass, which pays off when compiled (evaluation).
        """
        if fold_x:
            dx = self.decoder_x
            z = dx.body(h[0])  # (K, B, H)
            w, b = dx.logits.weight, dx.logits.bias  # (X, H), (X,)
            logits = F.linear(z, w, b)  # (K, B, X)
            lp_x = (z * (x @ w)).sum(-1) + x @ b - F.softplus(logits).sum(-1)
        else:
            lp_x = bernoulli_log_prob(x, self.decoder_x(h[0]))
        out = lp_x + std_normal_log_prob(h[-1])
        for i, dec in enumerate(self.decoders):
            mu, ls = dec(h[i + 1])
            out = out + gaussian_log_prob(h[i], mu, ls)
        return out

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None, eps: Sequence[Tensor] | None = None, fold_x: bool = False) -> Tensor:
        """log w_i = log p(x, h_i) - log q(h_i | x) for K samples. ``(B, X) -> (K, B)``.

        The noise is drawn from ``generator`` unless ``eps`` (``[(K, B, D_l)]``) gives it, which
        makes this a pure function of its inputs (what ``torch.compile`` needs).
        """
        post = self.sample_q(x, k, generator, eps=eps)
        return self.log_p(x, post.h, fold_x=fold_x) - self.log_q_standard(post)

    def forward(self, x: Tensor, eps: Sequence[Tensor]) -> Tensor:
        """``log_weights`` for given noise: ``(B, X), [(K, B, D_l)] -> (K, B)`` (what
        ``torch.func.functional_call`` calls when :mod:`iwae.pack` maps one model over a pack)."""
        return self.log_weights(x, eps[0].shape[0], eps=eps)

    # ---- the evaluators' protocol (iwae.latent.LatentModel)

    def propose(self, x: Tensor, k: int, generators: Sequence[torch.Generator]) -> Proposal:
        """``k`` draws from q(h|x) per image, image b's noise from ``generators[b]``: the noise of all
        layers is one standard normal ``(k, sum D_l)`` per image, split by layer. log q at the draws
        is the exact form (paper eq. 4's q, from the noise); at any other h, q's density with layer
        1's (mu, sigma) from x and higher layers' recomputed at the h below, parameters held constant."""
        dims = list(self.cfg.latent)
        return self.propose_from_noise(x, list(torch.split(normal_draws(generators, k, sum(dims), x), dims, dim=-1)))

    def propose_from_noise(self, x: Tensor, eps: list[Tensor]) -> Proposal:
        """:meth:`propose` for given standard normal noise ``[(K, B, D_l)]``."""
        post = self.sample_q(x, eps[0].shape[0], eps=eps)
        return Proposal(post.h, self.log_q_standard(post), lambda h: self.log_q_at(h, post, stop_params=True))

    def log_joint(self, x: Tensor, h: list[Tensor], fold_x: bool = False) -> Tensor:
        """log p(x, h) ``(K, B)`` (:meth:`log_p`)."""
        return self.log_p(x, h, fold_x=fold_x)

    @torch.no_grad()
    def simulate(self, n: int, generators: Sequence[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
        """Ancestral draws: h_L ~ N(0, I), h_l ~ p(h_l|h_{l+1}), x ~ Bernoulli(sigmoid(logits)); draw i
        from ``generators[i]`` alone. x ``(n, X)``, h ``[(n, D_l)]`` bottom-up."""
        ref = next(self.parameters())
        outs = [self._simulate_one(g, ref) for g in generators]
        return torch.cat([x for x, _ in outs]), [torch.cat(hs) for hs in zip(*(h for _, h in outs))]

    def _simulate_one(self, g: torch.Generator, ref: Tensor) -> tuple[Tensor, list[Tensor]]:
        dims = self.cfg.latent

        def randn(d: int) -> Tensor:
            return torch.randn(1, d, generator=g, device=g.device, dtype=ref.dtype).to(ref.device)

        h = [randn(dims[-1])]
        for i in reversed(range(len(self.decoders))):
            mu, log_sigma = self.decoders[i](h[0])  # p(h_{i+1} | h_{i+2}), (1, D)
            h.insert(0, mu + log_sigma.exp() * randn(dims[i]))
        probs = torch.sigmoid(self.decoder_x(h[0]))  # (1, X)
        x = torch.bernoulli(probs.to(g.device), generator=g).to(ref.device)
        return x, h

    @torch.no_grad()
    def posterior_means(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Mean of q for each layer; for layer l > 1, of q(h_l | h_{l-1}) at one sampled h_{l-1}
        (authors' get_units_variances). Returns ``[(B, D_l)]``."""
        post = self.sample_q(x, 1, generator)
        return [post.mu[0]] + [m[0] for m in post.mu[1:]]


def build_model(cfg: ModelConfig) -> IWAEModel:
    return IWAEModel(cfg)
