"""What the evaluators need of a latent-variable model, and nothing more: the protocol any model
implements to be scored by k-sample importance sampling (:mod:`iwae.evaluate`), AIS and BDMC
(:mod:`iwae.ais`).

A model has a joint p(x, h) over data x ``(B, X)`` and latents h, and a proposal q(h|x) (the
encoder of a VAE). Latents are a list of tensors, one per layer (a single-latent model returns a
list of one), samples on dim 0 and images on dim 1: ``[(K, B, D_l)]``, as everywhere in this
project. Randomness comes from one generator per image, so an image's estimate does not depend on
the batch it is scored in, on sharding or on retries.

:class:`~iwae.models.IWAEModel` implements it; :class:`~iwae.adapter.DistributionModel` adapts an
encoder and a decoder that return ``torch.distributions`` (Bernoulli, Gaussian, categorical
likelihoods with no code of the user's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

LogDensity = Callable[[list[Tensor]], Tensor]  # latents [(C, B, D_l)] -> log density (C, B)


class Unscorable(ValueError):
    """A model the evaluators cannot score as it is written; the message names the site and why."""


class Proposal(NamedTuple):
    """K draws from q(h|x) per image, their log densities, and q's log density at any latents."""

    h: list[Tensor]  # [(K, B, D_l)]
    log_q: Tensor  # (K, B): log q(h|x) at h
    log_density: LogDensity  # log q(h'|x) at any h' [(C, B, D_l)]: AIS's initial distribution


@runtime_checkable
class LatentModel(Protocol):
    """A latent-variable model the evaluators can score (module docstring)."""

    def propose(self, x: Tensor, k: int, generators: Sequence[torch.Generator]) -> Proposal:
        """``k`` draws from q(h|x) for each image of ``x`` ``(B, X)``; image b's draws come from
        ``generators[b]`` alone (a CPU generator: draw on the CPU, then move)."""
        ...

    def log_joint(self, x: Tensor, h: list[Tensor]) -> Tensor:
        """log p(x, h) ``(K, B)`` for latents ``[(K, B, D_l)]``; differentiable in h (AIS's HMC)."""
        ...

    def simulate(self, n: int, generators: Sequence[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
        """``n`` draws (x, h) from p(x, h), draw i from ``generators[i]``: x ``(n, X)``, h ``[(n, D_l)]``
        (BDMC: h is then an exact draw from p(h|x))."""
        ...


@contextmanager
def scoring(model: object) -> Iterator[None]:
    """The model in eval mode for the block, as every evaluator scores it (k-sample importance
    sampling, AIS, BDMC): dropout off, BatchNorm on its running statistics, so that an image's
    estimate depends on no other image of its batch, nor on the draws of its HMC steps; then every
    submodule's own mode put back as it was (the user's object is left as it was found)."""
    get = getattr(model, "modules", None)  # an nn.Module, or a wrapper of one that lists its modules
    modules = [m for m in get() if isinstance(m, torch.nn.Module)] if callable(get) else []
    flags = [m.training for m in modules]
    try:
        to_eval = getattr(model, "eval", None)
        if callable(to_eval):
            to_eval()  # the model's own eval(), overrides of train() included
        for m in modules:
            m.training = False
        yield
    finally:
        for m, f in zip(modules, flags):
            m.training = f


def check(model: object) -> LatentModel:
    """``model`` as a :class:`LatentModel`, or ``TypeError`` naming what it lacks."""
    missing = [m for m in ("propose", "log_joint", "simulate") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a latent-variable model the evaluators can score: it has no {', '.join(missing)}"
            " (see iwae.latent.LatentModel, or wrap an encoder and a decoder in iwae.adapter.DistributionModel)"
        )
    return model  # type: ignore[return-value]


def normal_draws(generators: Sequence[torch.Generator], k: int, d: int, like: Tensor) -> Tensor:
    """Standard normal noise ``(k, B, d)`` in ``like``'s dtype, image b's from ``generators[b]`` (drawn
    where the generators are, then moved to ``like``'s device)."""
    return torch.stack([torch.randn(k, d, generator=g, dtype=like.dtype, device=g.device) for g in generators], 1).to(like.device)
