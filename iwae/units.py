"""Active units (Burda et al. 2016, sec. 5.2) and the model with inactive units pruned.

A_u = Cov_x(E_{u ~ q(u|x)}[u]); a unit is active if A_u >= 1e-2. As in the authors' code the
variance is taken over the first 500 training examples, binarised once, with the population
variance; a higher layer's mean is that of q(h_l | h_{l-1}) at one sampled h_{l-1}.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from iwae.config import ModelConfig
from iwae.data import binarize
from iwae.latent import Proposal, normal_draws
from iwae.models import IWAEModel

THRESHOLD = 1e-2


@torch.inference_mode()
def unit_variances(model: IWAEModel, x_grey: Tensor, seed: int = 123) -> list[Tensor]:
    """Variance over examples of each layer's posterior mean: ``[(D_l,)]``. ``x_grey`` is ``(N, X)``."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    x = binarize(x_grey.to(dev), g)
    means = model.posterior_means(x, g)  # [(N, D_l)]
    return [m.double().var(dim=0, unbiased=False).cpu() for m in means]


def active_masks(variances: list[Tensor], threshold: float = THRESHOLD) -> list[Tensor]:
    """Boolean mask of active units per layer (variance >= threshold, as the authors' searchsorted)."""
    return [v >= threshold for v in variances]


def _slice_linear(lin: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    w, b = lin.weight.detach(), lin.bias.detach()
    if rows is not None:
        w, b = w[rows], b[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0]).to(w)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def _slice_input(layer: Any, cols: Tensor) -> None:
    """Drop input columns of a Gaussian/Bernoulli layer (its first linear map)."""
    body = layer.body
    if len(body) > 0:
        body[0] = _slice_linear(body[0], cols=cols)
    else:
        for name in ("mu", "log_sigma", "logits"):
            if hasattr(layer, name):
                setattr(layer, name, _slice_linear(getattr(layer, name), cols=cols))


def _slice_output(layer: Any, rows: Tensor) -> None:
    layer.mu = _slice_linear(layer.mu, rows=rows)
    layer.log_sigma = _slice_linear(layer.log_sigma, rows=rows)


def prune(model: IWAEModel, masks: list[Tensor]) -> IWAEModel:
    """A copy of ``model`` with inactive units removed from q, p and the prior (paper sec. 5.2).

    Every layer needs at least one active unit (a layer with none cannot be removed from the
    paper's architecture), else ``ValueError``.
    """
    keep = [torch.nonzero(m.cpu(), as_tuple=True)[0] for m in masks]
    if any(len(k) == 0 for k in keep):
        raise ValueError("every layer needs at least one active unit to prune")
    cfg = model.cfg
    new_cfg = ModelConfig(x_dim=cfg.x_dim, latent=tuple(len(k) for k in keep), hidden_q=cfg.hidden_q, hidden_p=cfg.hidden_p)
    out = copy.deepcopy(model)
    out.cfg = new_cfg
    for j, enc in enumerate(out.encoders):
        _slice_output(enc, keep[j])
        if j > 0:
            _slice_input(enc, keep[j - 1])
    _slice_input(out.decoder_x, keep[0])
    for i, dec in enumerate(out.decoders):  # p(h_{i+1} | h_{i+2}) in 1-based names
        _slice_input(dec, keep[i + 1])
        _slice_output(dec, keep[i])
    return out


class PrunedOnCommonDraws:
    """The model with its inactive units removed (:func:`prune`), scored on the draws of the model it
    was cut from (common random numbers): the noise is drawn for the original latent sizes and each
    layer keeps the columns of the units kept. The difference of the two models' estimates of one
    image then carries little Monte Carlo noise (the paper's sec. 5.2 check: < 0.06 nats). A
    :class:`~iwae.latent.LatentModel` for :func:`iwae.evaluate.estimate_log_px`."""

    def __init__(self, model: IWAEModel, masks: list[Tensor]):
        self.dims = list(model.cfg.latent)
        self.keep = [torch.nonzero(m.cpu(), as_tuple=True)[0].tolist() for m in masks]
        self.model = prune(model, masks)

    def parameters(self) -> Any:
        return self.model.parameters()

    def modules(self) -> Any:
        """The model's modules (what :func:`iwae.latent.scoring` puts in eval mode)."""
        return self.model.modules()

    def propose(self, x: Tensor, k: int, generators: Sequence[torch.Generator]) -> Proposal:
        layers = torch.split(normal_draws(generators, k, sum(self.dims), x), self.dims, dim=-1)  # the original model's noise
        return self.model.propose_from_noise(x, [e[..., keep] for e, keep in zip(layers, self.keep)])  # [(K, B, D_l kept)]

    def log_joint(self, x: Tensor, h: list[Tensor]) -> Tensor:
        return self.model.log_joint(x, h)

    def simulate(self, n: int, generators: Sequence[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
        return self.model.simulate(n, generators)
