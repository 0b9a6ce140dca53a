"""Training with the paper's schedule (Burda et al. 2016, sec. 5.1).

Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20, 8 stages of 3^i epochs at lr 1e-3 * 10^(-i/7).
A checkpoint after every stage (and a rolling one after every epoch) holds the model, the Adam
state, the config, the RNG state and the history, so a killed run resumes where it stopped.
Non-finite steps are skipped on the device (fused Adam's ``found_inf``) and counted.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset, binarize
from iwae.estimators import bound_and_surrogate, bound_from_noise, uses_fast_path
from iwae.models import IWAEModel

LATEST = "latest.pt"
FINAL = "final.pt"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in one epoch: the run diverged (retry from the last checkpoint)."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The GPU when torch sees one, else the CPU (never trust Ray's GPU ids for this)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: IWAEModel, cfg: RunConfig) -> torch.optim.Adam:
    """Adam with the paper's beta2 and eps; fused kernels (one launch for all parameters)."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(cfg.schedule.beta1, 0.999), eps=1e-4, fused=True)


def stage_of_epoch(cfg: RunConfig, epoch: int) -> tuple[int, float]:
    """(stage index, lr) of the 0-based global ``epoch``."""
    seen = 0
    plan = cfg.schedule.plan()
    for i, (n, lr) in enumerate(plan):
        if epoch < seen + n:
            return i, lr
        seen += n
    return len(plan) - 1, plan[-1][1]


@dataclass
class TrainResult:
    model: IWAEModel
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def _checkpoint_payload(
    cfg: RunConfig,
    model: IWAEModel,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    epoch: int,
    history: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    return {
        "config": cfg.to_dict(),
        "run_id": cfg.run_id,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
        "epoch": epoch,  # epochs completed
        "stage": stage_of_epoch(cfg, max(epoch - 1, 0))[0],
        "history": history,
        "seconds": seconds,
    }


class _StepBound:
    """(bound, surrogate) of one minibatch; the fast path optionally through ``torch.compile``.

    The noise is drawn outside the compiled function (generators break graphs), so compiled and
    eager steps consume the same random numbers.
    """

    def __init__(self, model: IWAEModel, objective: Any, estimator: str, compile_step: bool):
        self.model, self.objective, self.estimator = model, objective, estimator
        self.fast = uses_fast_path(objective, estimator)
        self.fn: Any = bound_from_noise
        if compile_step and self.fast:
            on_gpu = next(model.parameters()).is_cuda
            # on a GPU, "reduce-overhead" captures the small step in a CUDA graph (launch-bound at batch 20)
            self.fn = torch.compile(bound_from_noise, dynamic=False, mode="reduce-overhead" if on_gpu else None)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fast:
            return bound_and_surrogate(self.model, x, self.objective, self.estimator, gen)
        k = self.objective.num_samples
        eps = [torch.randn((k, x.shape[0], d), generator=gen, device=x.device, dtype=x.dtype) for d in self.model.cfg.latent]
        try:
            bound = self.fn(self.model, x, eps, self.objective)
        except Exception as e:  # a compiler missing on this machine must not stop training
            if self.fn is bound_from_noise:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}); training eagerly", stacklevel=2)
            self.fn = bound_from_noise
            bound = self.fn(self.model, x, eps, self.objective)
        return bound.detach(), bound


def latest_checkpoint(checkpoints: checkpoint.Checkpoints) -> dict[str, Any] | None:
    """The furthest readable checkpoint of a run.

    A blob that was read but does not load is proven damaged: it is moved aside (never deleted) and
    the next one is tried. A blob that cannot be read right now (``OSError``, e.g. a network error
    on object storage) is not evidence of anything: the error propagates and nothing is touched.
    """
    best: dict[str, Any] | None = None
    names = checkpoints.names()
    for name in [FINAL, LATEST, *sorted(n for n in names if n.startswith("stage-"))]:
        data = checkpoints.read(name)
        if data is None:
            continue
        try:
            ck = checkpoint.from_bytes(data, name)
        except checkpoint.CheckpointError:
            checkpoints.quarantine(name)
            continue
        if best is None or ck["epoch"] > best["epoch"]:
            best = ck
    return best


def build_model(cfg: RunConfig, data: Dataset, device: torch.device) -> IWAEModel:
    """The paper's model for ``cfg``, seeded, with the output bias at logit(mean training pixel)."""
    torch.manual_seed(cfg.seed)
    model = IWAEModel(cfg.model)
    model.init_output_bias(torch.as_tensor(data.train.mean(axis=0)))
    return model.to(device)


def training_images(cfg: RunConfig, data: Dataset, device: torch.device) -> torch.Tensor:
    """The grey-level images ``cfg`` trains on ``(N, X)`` (its ``train_subset``), on ``device``;
    ``ValueError`` when they do not fill one batch."""
    x_train = torch.as_tensor(data.train[: cfg.train_subset] if cfg.train_subset else data.train, device=device)
    if x_train.shape[0] // cfg.schedule.batch_size == 0:
        raise ValueError(f"batch size {cfg.schedule.batch_size} is larger than the {x_train.shape[0]} training examples")
    return x_train


@dataclass
class TrainState:
    """Everything a run carries from one epoch to the next (and into its checkpoints)."""

    cfg: RunConfig
    model: IWAEModel
    opt: torch.optim.Adam
    gen: torch.Generator
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def payload(self, epoch: int | None = None) -> dict[str, Any]:
        return _checkpoint_payload(self.cfg, self.model, self.opt, self.gen, self.epoch if epoch is None else epoch, self.history, self.seconds)


def start_state(
    cfg: RunConfig, data: Dataset, dev: torch.device, checkpoints: checkpoint.Checkpoints | None, init: dict[str, Any] | None
) -> tuple[TrainState, int]:
    """A fresh, resumed (from the furthest checkpoint) or continued (``init``: Table 2) state, and the
    epoch it resumed from (0 when it did not)."""
    model = build_model(cfg, data, dev)
    state = TrainState(cfg, model, make_optimizer(model, cfg), torch.Generator(device=dev).manual_seed(cfg.seed))
    ck = latest_checkpoint(checkpoints) if checkpoints is not None else None
    if ck is not None:
        model.load_state_dict(ck["model"])
        state.opt.load_state_dict(ck["optimizer"])
        state.gen.set_state(ck["rng"])
        state.history, state.epoch, state.seconds = list(ck["history"]), int(ck["epoch"]), float(ck["seconds"])
    elif init is not None:
        model.load_state_dict(init["model"])
        state.opt.load_state_dict(init["optimizer"])  # the authors carry Adam's state into Table 2's runs
    return state, state.epoch


def train_epoch(state: TrainState, x_train: torch.Tensor, step_bound: _StepBound, max_skip_fraction: float = 0.01) -> dict[str, Any]:
    """One epoch of minibatch Adam on freshly binarised batches; returns the epoch's metrics row.

    Non-finite steps are skipped on the device (fused Adam's ``found_inf``) and counted; more than
    ``max_skip_fraction`` of them raises :class:`NonFiniteError` (the run diverged).
    """
    cfg, model, opt, gen = state.cfg, state.model, state.opt, state.gen
    dev = x_train.device
    n, bs = x_train.shape[0], cfg.schedule.batch_size
    steps = n // bs  # the authors drop the last partial batch
    stage, lr = stage_of_epoch(cfg, state.epoch)
    for g in opt.param_groups:
        g["lr"] = lr
    order = torch.arange(n, device=dev) if cfg.schedule.authors_code else torch.randperm(n, generator=gen, device=dev)
    bound_sum, skipped, gnorm_sum = (torch.zeros((), device=dev) for _ in range(3))
    t0 = time.perf_counter()
    for step in range(steps):
        xb = binarize(x_train[order[step * bs : (step + 1) * bs]], gen)  # (B, X)
        bound, surrogate = step_bound(xb, gen)
        loss = -(surrogate.sum() if cfg.schedule.authors_code else surrogate.mean())  # authors' code: minibatch sum
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        found_inf = (~torch.isfinite(gnorm) | ~torch.isfinite(loss)).float()
        opt.found_inf = found_inf  # type: ignore[attr-defined]  # fused Adam skips the step on device
        opt.step()
        skipped += found_inf
        gnorm_sum += torch.nan_to_num(gnorm, nan=0.0, posinf=0.0) * (1 - found_inf)
        bound_sum += torch.nan_to_num(bound.sum(), nan=0.0, neginf=0.0) * (1 - found_inf)
    opt.found_inf = None  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    n_skipped = int(skipped.item())  # one host sync per epoch
    good = steps - n_skipped
    if n_skipped > max(1, max_skip_fraction * steps):
        raise NonFiniteError(f"run {cfg.run_id}: {n_skipped} of {steps} steps were non-finite in epoch {state.epoch + 1}; it diverged")
    state.epoch += 1
    state.seconds += dt
    row = {
        "epoch": state.epoch,
        "stage": stage,
        "lr": lr,
        "train_bound": float(bound_sum.item()) / max(good * bs, 1) if good else math.nan,
        "grad_norm": float(gnorm_sum.item()) / max(good, 1) if good else math.nan,
        "skipped_steps": n_skipped,
        "steps": steps,
        "seconds": dt,
        "examples_per_s": steps * bs / dt,
    }
    state.history.append(row)
    return row


def save_checkpoints(state: TrainState, checkpoints: checkpoint.Checkpoints) -> None:
    """``latest.pt`` after every epoch, ``stage-XX.pt`` at the end of each stage, ``final.pt`` at the end."""
    blob = checkpoint.to_bytes(state.payload())
    checkpoints.write(LATEST, blob)
    stage = stage_of_epoch(state.cfg, state.epoch - 1)[0]
    total = state.cfg.schedule.total_epochs
    if state.epoch == total or stage_of_epoch(state.cfg, state.epoch)[0] != stage:
        checkpoints.write(f"stage-{stage:02d}.pt", blob)
    if state.epoch == total:
        checkpoints.write(FINAL, blob)


def train(
    cfg: RunConfig,
    data: Dataset,
    checkpoints: checkpoint.Checkpoints | str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    init: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    max_skip_fraction: float = 0.01,
    compile_step: bool | str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train one run; resume from its checkpoints when there are any.

    Args:
        cfg: the run.
        data: grey-level data; training batches are binarised afresh (dynamic binarisation).
        checkpoints: where checkpoints go: a :class:`~iwae.checkpoint.Checkpoints` sink, or a local
            folder (``stage-XX.pt`` after each stage, ``latest.pt`` every epoch, ``final.pt`` at
            the end). ``None`` trains in memory only.
        init: a checkpoint dict to start from (Table 2's objective swap): model and Adam state.
        on_epoch: called with each epoch's metrics dict.
        max_skip_fraction: more non-finite steps than this in an epoch raises ``NonFiniteError``.
        compile_step: ``torch.compile`` the bound (forward and backward) of the standard estimator.
            ``"auto"`` compiles runs of at least 500k training examples, where the ~30 s of
            compilation is repaid (bench: +20% to +50% examples/s on CPU); a failure falls back to eager.
        progress: show a progress bar (epochs, the bound, examples/s); ``False`` turns it off.

    Training flushes subnormal floats to zero for the process (``torch.set_flush_denormal``). On a
    GPU a run of the standard estimator trains as a pack of one (:mod:`iwae.pack`): forward,
    backward and Adam replay as one CUDA graph (``compile_step=False`` keeps the eager loop).
    """
    sink = checkpoint.DirectoryCheckpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else checkpoints
    dev = pick_device(device)
    if dev.type == "cuda" and compile_step is not False:
        from iwae.pack import pack_key, train_pack

        if pack_key(cfg) is not None:  # on a GPU a solo run is a pack of one: its whole step replays as one CUDA graph
            hook = (lambda g, row: on_epoch(row)) if on_epoch is not None else None
            (out,) = train_pack([cfg], data, [sink], device=dev, inits=[init], on_epoch=hook, max_skip_fraction=max_skip_fraction, progress=progress)
            if isinstance(out, NonFiniteError):
                raise out
            return out
    # Subnormal floats (below ~1.2e-38) cost x86 a microcode assist per operation. IWAE's normalised
    # weights softmax(log_w) underflow into that range for the worst of K=50 samples, and the
    # backward pass multiplies them through the decoder: flushing them to zero made k=50 steps
    # ~1.9x faster on a 2-core x86 machine (bench), with no visible change in the bound.
    torch.set_flush_denormal(True)
    state, resumed = start_state(cfg, data, dev, sink, init)
    total = cfg.schedule.total_epochs
    x_train = training_images(cfg, data, dev)
    if compile_step == "auto":
        compile_step = (total - state.epoch) * x_train.shape[0] >= 500_000
    step_bound = _StepBound(state.model, cfg.objective, cfg.estimator, bool(compile_step))
    bar = _progress_bar(total, state.epoch, cfg) if progress else None
    state.model.train()
    while state.epoch < total:
        row = train_epoch(state, x_train, step_bound, max_skip_fraction)
        if sink is not None:
            save_checkpoints(state, sink)
        if on_epoch is not None:
            on_epoch(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bound=f"{row['train_bound']:.2f}", ex_s=f"{row['examples_per_s']:.0f}")
    if bar is not None:
        bar.close()
    if sink is not None and sink.read(FINAL) is None:  # resumed past the end: the final checkpoint is the last state
        sink.write(FINAL, checkpoint.to_bytes(state.payload(total)))
    return TrainResult(state.model, state.history, state.seconds, resumed)


def _progress_bar(total: int, start: int, cfg: RunConfig) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=cfg.label(), unit="epoch", dynamic_ncols=True)


def model_from_checkpoint(ck: dict[str, Any], name: str = "checkpoint", device: str | torch.device | None = None) -> tuple[IWAEModel, RunConfig]:
    """The model (in eval mode, on ``device``) and config a loaded checkpoint holds
    (:func:`iwae.checkpoint.load` or ``from_bytes``); ``CheckpointError`` naming ``name`` if they do not fit."""
    try:
        cfg = RunConfig.from_dict(ck["config"])
        model = IWAEModel(cfg.model)
        model.load_state_dict(ck["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"{name} does not match its config ({type(e).__name__}); retrain the run") from None
    return model.to(pick_device(device)).eval(), cfg
