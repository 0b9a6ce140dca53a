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
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from iwae.bounds import iwae_bound, jackknife_bound
from iwae.diagnostics import kish_ess, mc_stderr, pareto_khat
from iwae.models import IWAEModel

_BIN, _NOISE = 0, 1  # stream tags of the per-image seeds


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation settings. ``k`` and ``seed`` define the estimate; ``max_rows`` only its memory."""

    k: int = 5000
    seed: int = 123  # the authors' srng seed
    block: int = 500  # samples per seeded noise block; part of the estimate's identity
    max_rows: int = 50_000  # images x samples per decoder pass: the memory knob
    prefixes: tuple[int, ...] = (1, 5, 50, 500, 5000)
    compile: bool | None = None  # torch.compile the scoring; None = when >= 1M samples are scored in one call

    def __post_init__(self) -> None:
        for name in ("k", "block", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "prefixes", tuple(sorted(p for p in self.prefixes if p <= self.k)))


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


@dataclass(frozen=True)
class CommonNoise:
    """Score a pruned model (:func:`iwae.units.prune`) on the draws of the model it was cut from
    (common random numbers): the noise is drawn for the original latent sizes ``dims`` and each layer
    keeps the columns of the units the pruned model kept (``keep``). The difference of the two
    models' estimates of one image then carries little Monte Carlo noise (paper sec. 5.2's check)."""

    dims: tuple[int, ...]  # the original model's latent sizes
    keep: tuple[tuple[int, ...], ...]  # per layer, the indices of the units kept

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.keep) or any(max(k, default=-1) >= d for k, d in zip(self.keep, self.dims)):
            raise ValueError(f"keep {self.keep} does not fit latent sizes {self.dims}")


def _noise(image_ids: Sequence[int], seed: int, block: int, n: int, size: int, dims: Sequence[int], common: CommonNoise | None = None) -> list[Tensor]:
    """Noise of block ``block`` (its first ``n`` of ``size`` samples) for each image: ``[(n, B, D_l)]``.

    The whole block is always drawn and then cut: torch's normal sampler takes a different path
    for short tensors, so drawing only ``n`` rows would change the first samples with k. With
    ``common`` the noise is that of the original model, cut to the kept units.
    """
    draw = list(common.dims) if common is not None else list(dims)
    total = sum(draw)
    cols = []
    for i in image_ids:
        g = torch.Generator().manual_seed(image_seed(seed, int(i), _NOISE, block))
        cols.append(torch.randn(size, total, generator=g)[:n])
    e = torch.stack(cols, dim=1)  # (n, B, sum D)
    layers = list(torch.split(e, draw, dim=-1))
    if common is None:
        return layers
    return [x[..., list(keep)] for x, keep in zip(layers, common.keep)]  # (n, B, D_l kept)


def _log_w(model: IWAEModel, x: Tensor, eps: list[Tensor], fold_x: bool = False) -> Tensor:
    """Log-weights ``(K, B)`` of given noise ``[(K, B, D_l)]``: a pure function, compilable."""
    return model.log_weights(x, eps[0].shape[0], eps=eps, fold_x=fold_x)


_compiled_log_w: Any = None


def _scorer(use_compile: bool) -> Callable[..., Tensor]:
    """The eager scorer, or the compiled one (bias, softplus and row sums fused: bench +50% on CPU)."""
    global _compiled_log_w
    if not use_compile:
        return _log_w
    if _compiled_log_w is None:
        _compiled_log_w = torch.compile(functools.partial(_log_w, fold_x=True), dynamic=False)
    return _compiled_log_w  # type: ignore[no-any-return]


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
    model: IWAEModel,
    x_bin: Tensor,
    image_ids: Sequence[int],
    cfg: EvalConfig = EvalConfig(),
    progress: Callable[[int], None] | None = None,
    common: CommonNoise | None = None,
) -> LogPxEstimate:
    """Importance-sampled log p(x) per image, the prefix bounds and how reliable each estimate is.

    Args:
        model: the trained model (its device is used).
        x_bin: binary images ``(N, X)`` (see :func:`binarize_by_id`).
        image_ids: the images' ids ``(N,)``; they seed the noise.
        cfg: k, seed, block, memory knob.
        progress: called with the number of images finished after each batch.
        common: score a pruned model on its original model's draws (:class:`CommonNoise`).

    Returns:
        A :class:`LogPxEstimate`: ``log_px`` ``(N,)`` = L_k in nats, ``prefix`` ``(N, P)`` = L_m for
        m in ``cfg.prefixes``, and per image the ESS, k-hat, Monte Carlo error and jackknife.
    """
    model.eval()
    dev = next(model.parameters()).device
    dims = list(model.cfg.latent)
    n_img = x_bin.shape[0]
    imgs_per_pass = max(1, cfg.max_rows // min(cfg.block, cfg.k))
    sub = min(cfg.block, cfg.max_rows)  # samples per decoder pass when one block exceeds max_rows
    use_compile = cfg.compile if cfg.compile is not None else n_img * cfg.k >= 1_000_000
    score = _scorer(use_compile)
    out = {name: torch.empty(n_img, dtype=torch.float64) for name in ("log_px", "ess", "khat", "mcse", "log_px_jk")}
    prefix = torch.empty(n_img, len(cfg.prefixes), dtype=torch.float64)
    for a in range(0, n_img, imgs_per_pass):
        ids = [int(i) for i in image_ids[a : a + imgs_per_pass]]
        x = x_bin[a : a + imgs_per_pass].to(dev)  # (B, X)
        chunks: list[Tensor] = []  # the (c, B) log-weights of these images, k rows in all
        done = 0
        for b in range(math.ceil(cfg.k / cfg.block)):
            n = min(cfg.block, cfg.k - done)
            eps_block = _noise(ids, cfg.seed, b, n, cfg.block, dims, common)
            for s in range(0, n, sub):
                eps = [e[s : s + sub].to(dev) for e in eps_block]  # (c, B, D_l)
                try:
                    log_w = score(model, x, eps).double()  # (c, B)
                except Exception as e:  # no compiler on this machine: score eagerly
                    if score is _log_w:
                        raise
                    warnings.warn(f"torch.compile failed ({type(e).__name__}); evaluating eagerly", stacklevel=2)
                    score = _log_w
                    log_w = score(model, x, eps).double()
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
