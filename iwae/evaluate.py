"""log p(x) by importance sampling with k = 5000 (Burda et al. 2016, sec. 5.1).

The estimate is L_k = log (1/k) sum_i p(x, h_i)/q(h_i|x), a stochastic lower bound that tightens
with k (Theorem 1). Memory is bounded by ``max_rows`` (images x samples per decoder pass): samples
are processed in chunks, and the k log-weights of the images in flight are kept (``(k, B)``, a few
MB) so that the prefix bounds L_1, L_5, ..., L_5000 and the per-image reliability figures of
:mod:`iwae.diagnostics` (ESS, Pareto k-hat, Monte Carlo error) and the jackknife come from the
same pass.

Every random number is seeded from the image's identity, never from its batch or worker: the
test binarisation from ``(seed, image_id)`` and the noise in fixed blocks of ``block`` samples
from ``(seed, image_id, block index)``. An image's estimate therefore does not depend on batch
size, ``max_rows``, sharding or retries.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from iwae.bounds import iwae_bound, jackknife_bound
from iwae.diagnostics import kish_ess, mc_stderr, pareto_khat
from iwae.latent import LatentModel, scoring
from iwae.models import IWAEModel
from iwae.settings import EvalConfig

_BIN, _NOISE = 0, 1  # stream tags of the per-image seeds


def image_seed(seed: int, image_id: int, stream: int, block: int = 0) -> int:
    """A 63-bit seed from identity (``SeedSequence`` mixing), independent of order and sharding."""
    return int(np.random.SeedSequence([seed, image_id, stream, block]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def binarize_by_id(x: Tensor, image_ids: Sequence[int], seed: int) -> Tensor:
    """Binarise each image once from its own seed: ``1[u < x]``. ``(N, X) -> (N, X)``."""
    out = torch.empty_like(x)
    for row, i in enumerate(image_ids):
        g = torch.Generator().manual_seed(image_seed(seed, int(i), _BIN))
        u = torch.rand(x.shape[1], generator=g)
        out[row] = (u.to(x.device) < x[row]).to(x.dtype)
    return out


def _compiled_joint(model: IWAEModel, x: Tensor, h: list[Tensor]) -> Tensor:
    """The paper model's log p(x, h) with the x-term folded into the last hidden layer: a pure
    function of its inputs, what torch.compile fuses (bias, softplus and row sums: bench +50% on CPU)."""
    return model.log_joint(x, h, fold_x=True)


_compiled: Any = None


def _scorer(model: LatentModel, use_compile: bool) -> Callable[[Tensor, list[Tensor]], Tensor]:
    """log p(x, h) of ``model``: eager, or compiled for the paper's model."""
    global _compiled
    if not (use_compile and isinstance(model, IWAEModel)):
        return model.log_joint
    if _compiled is None:
        _compiled = torch.compile(_compiled_joint, dynamic=False)
    return functools.partial(_compiled, model)


class LogPxEstimate(NamedTuple):
    """Per-image results of one k-sample evaluation, all ``(N,)`` float64 but ``prefix``."""

    log_px: Tensor  # L_k, nats (the paper's number)
    prefix: Tensor  # (N, P): L_m for m in cfg.prefixes
    ess: Tensor  # Kish effective sample size of the k weights
    khat: Tensor  # PSIS Pareto k-hat; > 0.7: unreliable
    mcse: Tensor  # Monte Carlo standard error of L_k, nats
    log_px_jk: Tensor  # first-order jackknife of L_k (Nowozin 2018), nats


@torch.inference_mode()
def estimate_log_px(
    model: LatentModel,
    x_bin: Tensor,
    image_ids: Sequence[int],
    cfg: EvalConfig = EvalConfig(),
    progress: Callable[[int], None] | None = None,
) -> LogPxEstimate:
    """Importance-sampled log p(x) per image, the prefix bounds and how reliable each estimate is.

    Args:
        model: any :class:`~iwae.latent.LatentModel` (the paper's :class:`IWAEModel`, a user's model
            through :class:`~iwae.adapter.DistributionModel`, a pruned model on common draws), on
            the device it computes on.
        x_bin: images ``(N, X)`` (binary for a Bernoulli likelihood, see :func:`binarize_by_id`).
        image_ids: the images' ids ``(N,)``; they seed the noise.
        cfg: k, seed, block, memory knob.
        progress: called with the number of images finished after each batch.

    Returns:
        A :class:`LogPxEstimate`: ``log_px`` ``(N,)`` = L_k in nats, ``prefix`` ``(N, P)`` = L_m for
        m in ``cfg.prefixes``, and per image the ESS, k-hat, Monte Carlo error and jackknife.
    """
    with scoring(model):  # eval mode for the pass, the caller's modes put back after
        return _estimate(model, x_bin, image_ids, cfg, progress)


def _estimate(model: LatentModel, x_bin: Tensor, image_ids: Sequence[int], cfg: EvalConfig, progress: Callable[[int], None] | None) -> LogPxEstimate:
    dev = device_of(model, x_bin)
    n_img = x_bin.shape[0]
    imgs_per_pass = max(1, cfg.max_rows // min(cfg.block, cfg.k))
    sub = min(cfg.block, cfg.max_rows)  # samples per decoder pass when one block exceeds max_rows
    use_compile = cfg.compile if cfg.compile is not None else n_img * cfg.k >= 1_000_000
    score = _scorer(model, use_compile)
    out = {name: torch.empty(n_img, dtype=torch.float64) for name in ("log_px", "ess", "khat", "mcse", "log_px_jk")}
    prefix = torch.empty(n_img, len(cfg.prefixes), dtype=torch.float64)
    for a in range(0, n_img, imgs_per_pass):
        ids = [int(i) for i in image_ids[a : a + imgs_per_pass]]
        x = x_bin[a : a + imgs_per_pass].to(dev)  # (B, X)
        chunks: list[Tensor] = []  # the (c, B) log-weights of these images, k rows in all
        done = 0
        for b in range(math.ceil(cfg.k / cfg.block)):
            n = min(cfg.block, cfg.k - done)
            # the whole block is always drawn and then cut: torch's normal sampler takes a different
            # path for short tensors, so drawing only n rows would change the first samples with k
            prop = model.propose(x, cfg.block, [torch.Generator().manual_seed(image_seed(cfg.seed, i, _NOISE, b)) for i in ids])
            for s in range(0, n, sub):
                e = min(s + sub, n)
                h = [hl[s:e] for hl in prop.h]  # (c, B, D_l)
                try:
                    log_w = (score(x, h) - prop.log_q[s:e]).double()  # (c, B)
                except Exception as err:  # no compiler on this machine: score eagerly
                    if score == model.log_joint:
                        raise
                    warnings.warn(f"torch.compile failed ({type(err).__name__}); evaluating eagerly", stacklevel=2)
                    score = model.log_joint
                    log_w = (score(x, h) - prop.log_q[s:e]).double()
                chunks.append(log_w)
                done += log_w.shape[0]
        all_w = torch.cat(chunks)  # (k, B)
        sl = slice(a, a + len(ids))
        for j, m in enumerate(cfg.prefixes):
            prefix[sl, j] = iwae_bound(all_w[:m]).cpu()
        out["log_px"][sl] = iwae_bound(all_w).cpu()
        out["ess"][sl] = kish_ess(all_w).cpu()
        out["khat"][sl] = pareto_khat(all_w).cpu()
        out["mcse"][sl] = mc_stderr(all_w).cpu()
        out["log_px_jk"][sl] = jackknife_bound(all_w).cpu() if cfg.k > 1 else out["log_px"][sl]
        if progress is not None:
            progress(len(ids))
    return LogPxEstimate(prefix=prefix, **out)


def device_of(model: object, x: Tensor) -> torch.device:
    """Where a model computes: its first parameter's (or buffer's) device; x's for a model with neither."""
    for attr in ("parameters", "buffers"):
        get = getattr(model, attr, None)
        first = next(iter(get()), None) if callable(get) else None
        if first is not None:
            return first.device
    return x.device
