"""A run's training state, its checkpoints and the paper's schedule: what the training loop
(:mod:`iwae.pack`) and its front (:mod:`iwae.train`) share, below both of them.

Schedule (Burda et al. 2016, sec. 5.1): Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20, 8 stages
of 3^i epochs at lr 1e-3 * 10^(-i/7). A checkpoint after every stage (and a rolling one after every
epoch) holds the model, the Adam state, the config, the random state and the history, so a killed
run resumes where it stopped.

Random state that moves between devices: a CPU generator's state (MT19937) and a CUDA generator's
(seed and offset) cannot be set on the other. A checkpoint records which device's generator it
saved; a run resumed on the same kind of device continues the saved stream exactly, and one resumed
on another kind (a GPU run finished on a CPU, a laptop run resumed on a GPU) reseeds its generator
from ``(seed, epoch)`` and says so once: its later draws differ from an uninterrupted run's, as two
devices' floating point does anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset
from iwae.models import IWAEModel

LATEST = "latest.pt"
FINAL = "final.pt"

Notice = Callable[[str], None]


def say(line: str) -> None:
    """The default notice: one line on stderr."""
    print(line, file=sys.stderr, flush=True)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in one epoch: the run diverged (retry from the last checkpoint)."""


class Stopped(RuntimeError):
    """Training was asked to stop (:meth:`Heartbeat.stop`) before its next checkpoint."""


class Heartbeat:
    """What a watcher on another thread sees of a training loop: ``beats`` counts its steps (and
    checkpoints), so a watcher can tell a loop that makes progress from one that hangs; ``stop``
    asks the loop to stop before it writes its next checkpoint (:class:`Stopped`). Reading and
    bumping an int is safe across threads in CPython."""

    def __init__(self, guard: Callable[[], str] | None = None) -> None:
        self.beats = 0
        self.why = ""
        self.guard = guard  # asked at every check: "" while the loop may go on, else why not (a lease another took)

    def beat(self) -> None:
        self.beats += 1

    def stop(self, why: str) -> None:
        self.why = why

    def check(self) -> None:
        """Raise :class:`Stopped` when asked to stop, or when the guard says so (before a checkpoint or a row)."""
        if not self.why and self.guard is not None:
            self.why = self.guard()
        if self.why:
            raise Stopped(self.why)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The GPU when torch sees one, else the CPU (never trust Ray's GPU ids for this)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: IWAEModel, cfg: RunConfig) -> torch.optim.Adam:
    """Adam with the paper's betas and eps. The training loop does the arithmetic on the pack's flat
    buffer (:class:`iwae.pack.FlatAdam`); this optimizer holds each run's state in torch's format,
    which is what its checkpoints save and Table 2's continuations load."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(cfg.schedule.beta1, 0.999), eps=1e-4)


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
    graphed: bool = False  # its last epoch's step replayed as a CUDA graph
    compiled: bool = False  # its last epoch's step ran torch.compile'd code


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


def epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed from a run's seed and an epoch (``SeedSequence`` mixing): where a run resumed on
    another kind of device continues its draws."""
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def saved_rng_device(ck: dict[str, Any]) -> str:
    """The kind of device whose generator a checkpoint's random state is: recorded since random states
    moved between devices; before, told by its size (a CUDA state is a seed and an offset, 16 bytes)."""
    return str(ck.get("rng_device") or ("cuda" if ck["rng"].numel() == 16 else "cpu"))


def restore_rng(gen: torch.Generator, ck: dict[str, Any], cfg: RunConfig, epoch: int) -> str:
    """Continue a checkpoint's random stream on ``gen``: exactly on the same kind of device, else reseeded
    from ``(seed, epoch)``. Returns the notice to give ("" when the stream continues exactly)."""
    saved, here = saved_rng_device(ck), gen.device.type
    if saved == here:
        gen.set_state(ck["rng"])
        return ""
    gen.manual_seed(epoch_seed(cfg.seed, epoch))
    return (
        f"run {cfg.run_id}: its checkpoint's random state is a {saved} generator's and this is a {here}: it goes on from epoch {epoch} "
        f"with draws reseeded from (seed {cfg.seed}, epoch {epoch}), so they differ from an uninterrupted run's"
    )


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
        """The checkpoint of this state (``epoch``: the epochs it counts as completed)."""
        done = self.epoch if epoch is None else epoch
        return {
            "config": self.cfg.to_dict(),
            "run_id": self.cfg.run_id,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": self.gen.get_state(),
            "rng_device": self.gen.device.type,
            "epoch": done,  # epochs completed
            "stage": stage_of_epoch(self.cfg, max(done - 1, 0))[0],
            "history": self.history,
            "seconds": self.seconds,
        }


def latest_checkpoint(checkpoints: checkpoint.Checkpoints) -> dict[str, Any] | None:
    """The furthest readable checkpoint of a run: ``final.pt``, else ``latest.pt`` (written after
    every epoch, so never behind a stage's), else the last stage's; only the names the sink lists
    are read, and only until one loads.

    A blob that was read but does not load is proven damaged: it is moved aside (never deleted) and
    the next one is tried. A blob that cannot be read right now (``OSError``, e.g. a network error
    on object storage) is not evidence of anything: the error propagates and nothing is touched.
    """
    names = set(checkpoints.names())
    for name in [FINAL, LATEST, *sorted((n for n in names if n.startswith("stage-")), reverse=True)]:
        if name not in names:
            continue
        data = checkpoints.read(name)
        if data is None:
            continue
        try:
            return checkpoint.from_bytes(data, name)
        except checkpoint.CheckpointError:
            checkpoints.quarantine(name)
    return None


def start_state(
    cfg: RunConfig,
    data: Dataset,
    dev: torch.device,
    checkpoints: checkpoint.Checkpoints | None,
    init: dict[str, Any] | None,
    notice: Notice | None = None,
) -> tuple[TrainState, int]:
    """A fresh, resumed (from the furthest checkpoint) or continued (``init``: Table 2) state, and the
    epoch it resumed from (0 when it did not). A checkpoint from another kind of device resumes with
    reseeded draws and one ``notice`` (:func:`restore_rng`)."""
    model = build_model(cfg, data, dev)
    state = TrainState(cfg, model, make_optimizer(model, cfg), torch.Generator(device=dev).manual_seed(cfg.seed))
    ck = latest_checkpoint(checkpoints) if checkpoints is not None else None
    if ck is not None:
        model.load_state_dict(ck["model"])
        state.opt.load_state_dict(ck["optimizer"])
        state.history, state.epoch, state.seconds = list(ck["history"]), int(ck["epoch"]), float(ck["seconds"])
        moved = restore_rng(state.gen, ck, cfg, state.epoch)
        if moved:
            (notice or say)(moved)
    elif init is not None:
        model.load_state_dict(init["model"])
        state.opt.load_state_dict(init["optimizer"])  # the authors carry Adam's state into Table 2's runs
    return state, state.epoch


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
