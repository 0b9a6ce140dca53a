"""Pure bound math on importance log-weights (no I/O, no models).

Conventions (Burda, Grosse, Salakhutdinov 2016, "Importance Weighted Autoencoders"):
``log_w`` has shape ``(K, B)``: samples on dim 0, batch on dim 1, where
``log_w[i, b] = log p(x_b, h_i) - log q(h_i | x_b)``. Every ``*_bound`` returns the
per-example bound of shape ``(B,)`` in nats (higher is better); the caller reduces.

Objectives are frozen dataclasses (``VAE``, ``IWAE``, ``MIWAE``, ``CIWAE``, ``PIWAE``).
Besides its value, each objective gives *per-sample gradient weights*: the gradient of the
bound is ``sum_i c_i * grad log_w_i`` with ``c`` held constant, which is how the standard,
STL and DReG estimators are all expressed in :mod:`iwae.estimators`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "log_mean_exp",
    "vae_bound",
    "iwae_bound",
    "miwae_bound",
    "ciwae_bound",
    "jackknife_bound",
    "VAE",
    "IWAE",
    "MIWAE",
    "CIWAE",
    "PIWAE",
    "Objective",
    "objective_from_dict",
    "objective_to_dict",
]


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """Stable ``log (1/K) sum_i exp(log_w_i)`` along ``dim``.

    ``-inf`` entries are zero weights. Max-subtraction (inside ``torch.logsumexp``) keeps it
    finite for inputs like ``[1000, 1000]`` or ``[-1000, -1000]``; an all ``-inf`` slice gives
    ``-inf`` (no weight at all), never NaN.
    """
    k = log_w.shape[dim]
    return torch.logsumexp(log_w, dim=dim) - math.log(k)


def vae_bound(log_w: Tensor) -> Tensor:
    """k-sample VAE bound (paper eq. 3 with MC KL): ``(1/K) sum_i log w_i``. ``(K, B) -> (B,)``."""
    return log_w.mean(dim=0)


def iwae_bound(log_w: Tensor) -> Tensor:
    """IWAE bound L_k = log (1/k) sum_i w_i (paper eq. 8). ``(K, B) -> (B,)``."""
    return log_mean_exp(log_w, dim=0)


def miwae_bound(log_w: Tensor, m: int) -> Tensor:
    """MIWAE(M, K) of Rainforth et al. 2018: mean over M groups of L_K.

    ``log_w`` is ``(M*K, B)``; the M groups are the leading chunks (``reshape(M, K, B)``), and the
    log-mean-exp is taken over K *within* each group (dim 1), then averaged over M (dim 0).
    Normalising over the wrong axis is a known bug in public reimplementations.
    """
    mk, b = log_w.shape
    if mk % m:
        raise ValueError(f"MIWAE: {mk} samples do not split into {m} groups")
    grouped = log_w.reshape(m, mk // m, b)  # (M, K, B)
    return log_mean_exp(grouped, dim=1).mean(dim=0)  # (B,)


def ciwae_bound(log_w: Tensor, beta: float) -> Tensor:
    """CIWAE(beta) of Rainforth et al. 2018: ``beta * ELBO_K + (1 - beta) * L_K``. ``(K, B) -> (B,)``."""
    return beta * vae_bound(log_w) + (1.0 - beta) * iwae_bound(log_w)


def jackknife_bound(log_w: Tensor) -> Tensor:
    """First-order jackknife of L_k (JVI, Nowozin 2018, eq. 9). ``(K, B) -> (B,)``, nats.

    ``L_J = k L_k - (k-1)/k sum_i L_{k-1}^{(-i)}`` with ``L_{k-1}^{(-i)} = log (S - w_i)/(k-1)``.
    L_k is biased low by ``O(1/k)``; the jackknife cancels that leading term, leaving ``O(1/k^2)``
    (it is then no longer a bound: it may exceed log p(x)). The leave-one-out sums are taken as
    ``log S + log1p(-w_i/S)``, except for each column's largest weight, whose ``1 - w_i/S`` can
    round to 0: its leave-one-out sum is a logsumexp of the others instead.
    """
    k = log_w.shape[0]
    if k < 2:
        raise ValueError("the jackknife needs k >= 2 samples")
    lse = torch.logsumexp(log_w, dim=0)  # (B,)
    loo = lse + torch.log1p(-torch.exp(log_w - lse).clamp(max=1.0))  # (K, B): log sum_{j != i} w_j
    top = log_w.argmax(dim=0, keepdim=True)  # (1, B)
    others = log_w.scatter(0, top, float("-inf"))
    loo = loo.scatter(0, top, torch.logsumexp(others, dim=0, keepdim=True))
    l_k = lse - math.log(k)
    l_loo = (loo - math.log(k - 1)).mean(dim=0)  # (B,): mean of the k leave-one-out L_{k-1}
    return k * l_k - (k - 1) * l_loo


def _iw_weights(log_w: Tensor, dim: int = 0) -> Tensor:
    """Self-normalised importance weights ``w~_i = w_i / sum_j w_j`` along ``dim`` (detached)."""
    return torch.softmax(log_w.detach(), dim=dim)


@dataclass(frozen=True, kw_only=True)
class _KSamples:
    """Objectives over one set of k samples per example."""

    k: int = 1

    def __post_init__(self) -> None:
        _check_positive("k", self.k)

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def num_samples(self) -> int:
        return self.k


@dataclass(frozen=True, kw_only=True)
class VAE(_KSamples):
    """The k-sample VAE bound (paper eq. 3, KL by Monte Carlo as in footnote 1)."""

    def bound(self, log_w: Tensor) -> Tensor:
        return vae_bound(log_w)

    def grad_weights(self, log_w: Tensor, doubly_reparameterised: bool = False) -> tuple[Tensor, Tensor]:
        """(decoder, encoder) weights c: grad bound = sum_i c_i grad log_w_i. DReG of an ELBO is STL."""
        c = torch.full_like(log_w, 1.0 / log_w.shape[0]).detach()
        return c, c


@dataclass(frozen=True, kw_only=True)
class IWAE(_KSamples):
    """The importance weighted bound L_k (paper eq. 8)."""

    def bound(self, log_w: Tensor) -> Tensor:
        return iwae_bound(log_w)

    def grad_weights(self, log_w: Tensor, doubly_reparameterised: bool = False) -> tuple[Tensor, Tensor]:
        """Paper eq. 14: weights w~_i; DReG (Tucker et al. 2019) gives the encoder w~_i^2."""
        w = _iw_weights(log_w)  # (K, B)
        return w, (w * w if doubly_reparameterised else w)


@dataclass(frozen=True, kw_only=True)
class MIWAE:
    """MIWAE(M, K): M independent L_K bounds averaged (Rainforth et al. 2018). Uses M*K samples."""

    m: int = 1
    k: int = 1

    def __post_init__(self) -> None:
        _check_positive("m", self.m)
        _check_positive("k", self.k)

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def num_samples(self) -> int:
        return self.m * self.k

    def bound(self, log_w: Tensor) -> Tensor:
        return miwae_bound(log_w, self.m)

    def grad_weights(self, log_w: Tensor, doubly_reparameterised: bool = False) -> tuple[Tensor, Tensor]:
        mk, b = log_w.shape
        w = _iw_weights(log_w.reshape(self.m, self.k, b), dim=1) / self.m  # (M, K, B), softmax within group
        dec = w.reshape(mk, b)
        enc = (w * w * self.m).reshape(mk, b) if doubly_reparameterised else dec
        return dec, enc


@dataclass(frozen=True, kw_only=True)
class CIWAE(_KSamples):
    """CIWAE(beta): convex combination beta * ELBO + (1 - beta) * IWAE over the same k samples."""

    beta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"CIWAE beta must be in [0, 1], got {self.beta}")

    def bound(self, log_w: Tensor) -> Tensor:
        return ciwae_bound(log_w, self.beta)

    def grad_weights(self, log_w: Tensor, doubly_reparameterised: bool = False) -> tuple[Tensor, Tensor]:
        k = log_w.shape[0]
        w = _iw_weights(log_w)
        dec = self.beta / k + (1.0 - self.beta) * w
        enc = self.beta / k + (1.0 - self.beta) * w * w if doubly_reparameterised else dec
        return dec, enc


@dataclass(frozen=True, kw_only=True)
class PIWAE:
    """PIWAE(M, K): the decoder follows IWAE(M*K), the encoder follows MIWAE(M, K) (Rainforth et al. 2018).

    Its reported value is the IWAE(M*K) bound (the decoder's target).
    """

    m: int = 1
    k: int = 1

    def __post_init__(self) -> None:
        _check_positive("m", self.m)
        _check_positive("k", self.k)

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def num_samples(self) -> int:
        return self.m * self.k

    def bound(self, log_w: Tensor) -> Tensor:
        return iwae_bound(log_w)

    def grad_weights(self, log_w: Tensor, doubly_reparameterised: bool = False) -> tuple[Tensor, Tensor]:
        dec, _ = IWAE(k=self.m * self.k).grad_weights(log_w)
        _, enc = MIWAE(m=self.m, k=self.k).grad_weights(log_w, doubly_reparameterised)
        return dec, enc


Objective = VAE | IWAE | MIWAE | CIWAE | PIWAE
_OBJECTIVES: dict[str, type] = {c.__name__.lower(): c for c in (VAE, IWAE, MIWAE, CIWAE, PIWAE)}


def objective_from_dict(d: dict) -> Objective:
    """Build an objective from ``{"name": "iwae", "k": 5, ...}``; unknown names raise ``TypeError``."""
    d = dict(d)
    name = str(d.pop("name", "")).lower()
    if name not in _OBJECTIVES:
        raise TypeError(f"unknown objective {name!r}; choose one of {sorted(_OBJECTIVES)}")
    obj: Objective = _OBJECTIVES[name](**d)
    return obj


def objective_to_dict(obj: Objective) -> dict:
    """``{"name": "iwae", "k": 5, ...}``, keys sorted: the inverse of :func:`objective_from_dict`."""
    return dict(sorted({"name": obj.name, **dataclasses.asdict(obj)}.items()))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
