"""Gradient estimators for the bounds of :mod:`iwae.bounds`.

Every objective's gradient is ``sum_i c_i * grad log w_i`` with per-sample weights ``c`` held
constant (paper eq. 14 for IWAE). Estimators differ in the encoder's part:

- ``standard``: the reparameterisation gradient of the bound itself (paper sec. 3, the
  authors' code): full derivative of log q, path and score terms.
- ``stl``: "sticking the landing" (Roeder et al. 2017): drop the score term of log q by holding
  q's parameters constant in log q; the sample path keeps its gradient.
- ``dreg``: doubly reparameterised (Tucker et al. 2019): STL's path gradient with the encoder's
  weights ``w~_i`` replaced by ``w~_i^2`` (unbiased for the IWAE encoder gradient).

The surrogate below is a scalar-per-example whose gradient is the chosen estimator; its *value* is
not the bound, so training reports ``objective.bound(log_w)`` separately.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iwae.bounds import PIWAE, Objective
from iwae.models import IWAEModel, Posterior


def uses_fast_path(objective: Objective, estimator: str) -> bool:
    """The standard estimator of every objective but PIWAE is autograd of the bound itself."""
    return estimator == "standard" and not isinstance(objective, PIWAE)


def bound_from_noise(model: IWAEModel, x: Tensor, eps: list[Tensor], objective: Objective) -> Tensor:
    """Per-example bound ``(B,)`` for given noise ``[(K, B, D_l)]``; a pure function (compilable)."""
    return objective.bound(model.log_weights(x, eps[0].shape[0], eps=eps))  # (K, B) -> (B,)


def bound_and_surrogate(
    model: IWAEModel,
    x: Tensor,
    objective: Objective,
    estimator: str = "standard",
    generator: torch.Generator | None = None,
    eps: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example bound ``(B,)`` (detached) and a surrogate ``(B,)`` whose gradient is the estimator.

    ``x`` is ``(B, X)`` binary. The noise is drawn from ``generator``, or given as ``eps``
    (``[(K, B, D_l)]``, the draws a training step makes first). The caller does
    ``loss = -surrogate.mean()`` (or ``.sum()``).
    """
    k = objective.num_samples
    if uses_fast_path(objective, estimator):
        # Fast path: autograd of the bound itself is the standard estimator.
        log_w = model.log_weights(x, k, generator, eps=eps)  # (K, B)
        bound = objective.bound(log_w)
        return bound.detach(), bound
    if estimator not in ("standard", "stl", "dreg"):
        raise ValueError(f"unknown estimator {estimator!r}; choose standard, stl or dreg")

    post = model.sample_q(x, k, generator, eps=eps)
    dreg = estimator == "dreg"
    if isinstance(objective, PIWAE):
        return _piwae(model, x, objective, post, estimator)

    # With q's parameters held constant in log q, every path from log w to the encoder goes
    # through the samples: scaling their gradient by enc/dec weights gives the encoder its own
    # weights (DReG's w~^2) while the decoder keeps w~, in a single backward pass. For these
    # objectives enc/dec is w~ (or 1), so an underflowed dec weight has a zero enc weight too.
    scale_box: list[Tensor] = [torch.ones(())]
    h = [hl.view_as(hl) for hl in post.h]  # (K, B, D_l) views that carry the hooks
    for hl in h:
        if hl.requires_grad:
            hl.register_hook(lambda g, box=scale_box: g * box[0].unsqueeze(-1))
    log_w = model.log_p(x, h) - model.log_q_at(h, post, stop_params=True)  # (K, B); no score term
    dec_w, enc_w = objective.grad_weights(log_w, doubly_reparameterised=dreg)
    tiny = torch.finfo(dec_w.dtype).tiny
    scale_box[0] = torch.where(dec_w > 0, enc_w / dec_w.clamp_min(tiny), torch.zeros_like(dec_w))
    surrogate = (dec_w * log_w).sum(0)  # (B,)
    return objective.bound(log_w).detach(), surrogate


def _piwae(model: IWAEModel, x: Tensor, objective: PIWAE, post: Posterior, estimator: str) -> tuple[Tensor, Tensor]:
    """PIWAE: decoder weights from IWAE(MK), encoder weights from MIWAE(M, K), computed exactly.

    The global IWAE weight of a sample can underflow while its in-group MIWAE weight does not, so
    the encoder term is weighted directly and the decoder gets the difference through a second
    decoder pass at detached samples (which carries no encoder gradient).
    """
    log_p = model.log_p(x, post.h)  # (K, B)
    log_w = log_p - model.log_q_at(post.h, post, stop_params=True)  # path gradient only
    dec_w, enc_w = objective.grad_weights(log_w, doubly_reparameterised=(estimator == "dreg"))
    h_fixed = [hl.detach() for hl in post.h]
    surrogate = (enc_w * log_w).sum(0) + ((dec_w - enc_w) * model.log_p(x, h_fixed)).sum(0)
    if estimator == "standard":
        # the score term -d/dphi log q(h; phi) at fixed h, with the encoder's weights
        surrogate = surrogate - (enc_w * model.log_q_at(h_fixed, post, stop_params=False)).sum(0)
    return objective.bound(log_w).detach(), surrogate
