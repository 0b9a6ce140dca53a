"""A researcher's VAE as a :class:`~iwae.latent.LatentModel`, from ``torch.distributions`` alone.

The common case needs no code beyond the model itself: an encoder that returns a distribution over
the latent h given x (``Independent(Normal(mu, sigma), 1)``, say), a decoder that returns a
distribution over x given h (``Independent(Bernoulli(logits=...), 1)``, ``Independent(Normal(...), 1)``
for continuous data, ``Independent(Categorical(logits=...), 1)`` for pixels with several levels), and a
prior over h (default N(0, I)). Then k=5000 importance sampling, AIS and BDMC score it as they score
the paper's model, image by image, with the same seeds.

Shapes: x ``(B, X)``; the encoder's distribution has batch shape ``(B,)`` and event shape ``(D,)``;
the decoder is called on latents ``(K, B, D)`` and its distribution has batch shape ``(K, B)`` and
event shape ``(X,)``. With a continuous likelihood (a Gaussian decoder) log p(x) is a density, not
a probability: :attr:`DistributionModel.continuous` says so, and the report says so beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from iwae.latent import Proposal, normal_draws

DISCRETE = (torch.distributions.Bernoulli, torch.distributions.Categorical, torch.distributions.Binomial, torch.distributions.OneHotCategorical)


def _base(d: Distribution) -> Distribution:
    while isinstance(d, Independent):
        d = d.base_dist
    return d


class DistributionModel(nn.Module):
    """An encoder and a decoder that return distributions, and a prior: a model the evaluators score.

    Args:
        encoder: ``x (B, X) -> q(h | x)``, batch ``(B,)``, event ``(D,)``. A (diagonal) Normal is
            drawn by reparameterisation from each image's own noise; any other distribution is
            drawn with ``sample`` under each image's own seed (one call per image: slower).
        decoder: ``h (K, B, D) -> p(x | h)``, batch ``(K, B)``, event ``(X,)``.
        latent_dim: D.
        prior: p(h), event ``(D,)`` (default: ``Independent(Normal(0, 1), 1)``).
    """

    def __init__(
        self, encoder: Callable[[Tensor], Distribution], decoder: Callable[[Tensor], Distribution], latent_dim: int, prior: Distribution | None = None
    ):
        super().__init__()
        self.encoder, self.decoder, self.latent_dim = encoder, decoder, int(latent_dim)
        self._prior = prior
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # where the model lives when it has no parameters of its own
        self._continuous: bool | None = None

    def prior(self, like: Tensor) -> Distribution:
        """p(h) on ``like``'s device and dtype: a user's prior is a ``Distribution``, which
        ``model.to()`` does not move, so it is rebuilt there once per device and dtype."""
        if self._prior is not None:
            if all(v.device == like.device and v.dtype == like.dtype for v in _params(self._prior)):
                return self._prior  # where it was given: itself (a prior the user learns stays the one scored)
            return moved(self._prior, like)
        zero = torch.zeros(self.latent_dim, dtype=like.dtype, device=like.device)
        return Independent(Normal(zero, torch.ones_like(zero)), 1)

    @property
    def continuous(self) -> bool:
        """Whether p(x|h) is a density (a Gaussian decoder, say): log p(x) is then a log density. Known
        once the model has been called (False before)."""
        return bool(self._continuous)

    def propose(self, x: Tensor, k: int, generators: Sequence[torch.Generator]) -> Proposal:
        q = self.encoder(x)
        base = _base(q)
        if isinstance(base, Normal):  # reparameterised from each image's own standard normal noise
            eps = normal_draws(generators, k, self.latent_dim, x)  # (K, B, D)
            h = q.mean + q.stddev * eps
        else:  # any other distribution: drawn under each image's own seed, one image at a time
            h = torch.cat([_sample_seeded(self.encoder(x[b : b + 1]), k, g) for b, g in enumerate(generators)], 1)
        return Proposal([h], q.log_prob(h), lambda hs: q.log_prob(hs[0]))

    def log_joint(self, x: Tensor, h: list[Tensor]) -> Tensor:
        px = self.decoder(h[0])
        self._continuous = not isinstance(_base(px), DISCRETE)
        return self.prior(h[0]).log_prob(h[0]) + px.log_prob(x)

    @torch.no_grad()
    def simulate(self, n: int, generators: Sequence[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
        out_x, out_h = [], []
        for g in generators:
            anchor: Tensor = self._anchor  # type: ignore[assignment]
            h = _sample_seeded(self.prior(anchor), 1, g)  # (1, D)
            out_x.append(_sample_seeded(self.decoder(h[None]), 1, g).reshape(1, -1))  # p(x|h) of batch (1, 1): (1, X)
            out_h.append(h)
        return torch.cat(out_x), [torch.cat(out_h)]


def _params(d: Distribution) -> list[Tensor]:
    """A distribution's floating tensors, through ``Independent`` and ``TransformedDistribution``."""
    while isinstance(d, Independent | torch.distributions.TransformedDistribution):
        d = d.base_dist
    return [v for v in d.__dict__.values() if isinstance(v, Tensor) and v.is_floating_point()]


def moved(d: Distribution, like: Tensor) -> Distribution:
    """``d`` rebuilt with its parameters on ``like``'s device and (floating) dtype: ``Independent`` and
    ``TransformedDistribution`` through their base, any other from its ``arg_constraints`` parameters."""
    if isinstance(d, Independent):
        return Independent(moved(d.base_dist, like), d.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(d, torch.distributions.TransformedDistribution):
        return torch.distributions.TransformedDistribution(moved(d.base_dist, like), d.transforms, validate_args=False)

    def to(v: Any) -> Any:
        return v.to(device=like.device, dtype=like.dtype if v.is_floating_point() else v.dtype) if isinstance(v, Tensor) else v

    given = {k: to(d.__dict__[k]) for k in d.arg_constraints if k in d.__dict__}
    for drop in ((), ("probs",), ("logits",), ("scale_tril", "precision_matrix"), ("covariance_matrix", "precision_matrix")):
        try:  # a lazily computed twin (probs beside logits) is in __dict__ too once read: the constructor takes one
            return type(d)(**{k: v for k, v in given.items() if k not in drop}, validate_args=False)  # type: ignore[call-arg]
        except (ValueError, TypeError):
            continue
    raise TypeError(f"the prior {type(d).__name__} cannot be moved to {like.device} {like.dtype}; build it from tensors on the model's device")


def _sample_seeded(d: Distribution, n: int, g: torch.Generator) -> Tensor:
    """``n`` draws of ``d`` under a seed taken from ``g`` (torch.distributions draw from the global
    generator; the global state is put back afterwards)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        return d.sample((n,))


def gaussian_encoder(net: Callable[[Tensor], Any]) -> Callable[[Tensor], Distribution]:
    """An encoder from a network returning ``(mu, log_sigma)``: ``Independent(Normal(mu, exp(log_sigma)), 1)``."""

    def encode(x: Tensor) -> Distribution:
        mu, log_sigma = net(x)
        return Independent(Normal(mu, log_sigma.exp()), 1)

    return encode
