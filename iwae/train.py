"""Training with the paper's schedule (Burda et al. 2016, sec. 5.1).

Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20, 8 stages of 3^i epochs at lr 1e-3 * 10^(-i/7).
A checkpoint after every stage (and a rolling one after every epoch) holds the model, the Adam
state, the config, the RNG state and the history, so a killed run resumes where it stopped.
Non-finite steps are skipped on the device (fused Adam's ``found_inf``) and counted.
"""

from __future__ import annotations

import math
import os
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


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The furthest readable checkpoint of ``run_dir`` (a truncated one is skipped and removed)."""
    best: dict[str, Any] | None = None
    for p in [run_dir / FINAL, run_dir / LATEST, *sorted(run_dir.glob("stage-*.pt"))]:
        if not p.exists():
            continue
        try:
            ck = checkpoint.load(p)
        except checkpoint.CheckpointError:
            p.unlink()  # a partial file is never data: redo that work
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


def train(
    cfg: RunConfig,
    data: Dataset,
    run_dir: Path | None = None,
    *,
    device: str | torch.device | None = None,
    init: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    max_skip_fraction: float = 0.01,
    compile_step: bool | str = "auto",
) -> TrainResult:
    """Train one run; resume from ``run_dir``'s checkpoints when there are any.

    Args:
        cfg: the run.
        data: grey-level data; training batches are binarised afresh (dynamic binarisation).
        run_dir: where checkpoints go (``stage-XX.pt`` after each stage, ``latest.pt`` every epoch,
            ``final.pt`` at the end). ``None`` trains in memory only.
        init: a checkpoint dict to start from (Table 2's objective swap): model and Adam state.
        on_epoch: called with each epoch's metrics dict.
        max_skip_fraction: more non-finite steps than this in an epoch raises ``NonFiniteError``.
        compile_step: ``torch.compile`` the bound (forward and backward) of the standard estimator.
            ``"auto"`` compiles runs of at least 500k training examples, where the ~30 s of
            compilation is repaid (bench: +20% to +50% examples/s on CPU); a failure falls back to eager.
    """
    dev = pick_device(device)
    model = build_model(cfg, data, dev)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start_epoch, seconds = 0, 0.0
    ck = latest_checkpoint(run_dir) if run_dir is not None else None
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"])
        history, start_epoch, seconds = list(ck["history"]), int(ck["epoch"]), float(ck["seconds"])
    elif init is not None:
        model.load_state_dict(init["model"])
        opt.load_state_dict(init["optimizer"])  # the authors carry Adam's state into Table 2's runs
    result = TrainResult(model, history, seconds, start_epoch)
    total = cfg.schedule.total_epochs
    if start_epoch >= total:
        if run_dir is not None and not (run_dir / FINAL).exists():
            checkpoint.save_atomic(_checkpoint_payload(cfg, model, opt, gen, total, history, seconds), run_dir / FINAL)
        return result

    objective, estimator = cfg.objective_obj(), cfg.estimator
    x_train = torch.as_tensor(data.train[: cfg.train_subset] if cfg.train_subset else data.train, device=dev)
    n, bs = x_train.shape[0], cfg.schedule.batch_size
    steps = n // bs  # the authors drop the last partial batch
    if steps == 0:
        raise ValueError(f"batch size {bs} is larger than the {n} training examples")
    sum_grads = cfg.schedule.authors_code  # authors' code: minibatch sum; paper text silent
    fault_epoch = _fault_epoch()  # test hook: poison one epoch with NaN losses
    if compile_step == "auto":
        compile_step = (total - start_epoch) * n >= 500_000
    step_bound = _StepBound(model, objective, estimator, bool(compile_step))
    model.train()
    for epoch in range(start_epoch, total):
        stage, lr = stage_of_epoch(cfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        order = torch.arange(n, device=dev) if cfg.schedule.authors_code else torch.randperm(n, generator=gen, device=dev)
        bound_sum = torch.zeros((), device=dev)
        skipped = torch.zeros((), device=dev)
        gnorm_sum = torch.zeros((), device=dev)
        t0 = time.perf_counter()
        for step in range(steps):
            xb = binarize(x_train[order[step * bs : (step + 1) * bs]], gen)  # (B, X)
            bound, surrogate = step_bound(xb, gen)
            loss = -(surrogate.sum() if sum_grads else surrogate.mean())
            if epoch == fault_epoch:
                loss = loss * float("nan")
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
        seconds += dt
        n_skipped = int(skipped.item())  # one host sync per epoch
        good = steps - n_skipped
        row = {
            "epoch": epoch + 1,
            "stage": stage,
            "lr": lr,
            "train_bound": float(bound_sum.item()) / max(good * bs, 1) if good else math.nan,
            "grad_norm": float(gnorm_sum.item()) / max(good, 1) if good else math.nan,
            "skipped_steps": n_skipped,
            "steps": steps,
            "seconds": dt,
            "examples_per_s": steps * bs / dt,
        }
        if n_skipped > max(1, max_skip_fraction * steps):
            raise NonFiniteError(f"run {cfg.run_id}: {n_skipped} of {steps} steps were non-finite in epoch {epoch + 1}; it diverged")
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if run_dir is not None:
            payload = _checkpoint_payload(cfg, model, opt, gen, epoch + 1, history, seconds)
            checkpoint.save_atomic(payload, run_dir / LATEST)
            if stage_of_epoch(cfg, epoch + 1)[0] != stage or epoch + 1 == total:
                checkpoint.save_atomic(payload, run_dir / f"stage-{stage:02d}.pt")
    result.history, result.seconds = history, seconds
    if run_dir is not None:
        checkpoint.save_atomic(_checkpoint_payload(cfg, model, opt, gen, total, history, seconds), run_dir / FINAL)
    return result


def _fault_epoch() -> int:
    """Fault injection for tests: ``IWAE_FAULT_NONFINITE_EPOCH=e`` makes epoch e's losses NaN; with
    ``IWAE_FAULT_ONCE_FILE=path`` only the first attempt does (the file records that it fired)."""
    epoch = int(os.environ.get("IWAE_FAULT_NONFINITE_EPOCH", "-1"))
    once = os.environ.get("IWAE_FAULT_ONCE_FILE")
    if epoch < 0 or not once:
        return epoch
    try:
        with open(once, "x"):
            return epoch
    except FileExistsError:
        return -1


def load_model(path: Path, device: str | torch.device | None = None) -> tuple[IWAEModel, RunConfig, dict[str, Any]]:
    """Model, config and raw checkpoint from a checkpoint file (safe load)."""
    ck = checkpoint.load(path)
    try:
        cfg = RunConfig.from_dict(ck["config"])
        model = IWAEModel(cfg.model)
        model.load_state_dict(ck["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"{path} does not match its config ({type(e).__name__}); retrain the run") from None
    return model.to(pick_device(device)).eval(), cfg, ck
