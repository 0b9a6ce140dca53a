"""Training one run (Burda et al. 2016, sec. 5.1): a thin front of the training loop.

A run alone trains as a pack of one (:func:`iwae.pack.train_pack`) on every device: the same loop,
step, checkpoints and skip rule as runs trained together. The state, its checkpoints and the
schedule live in :mod:`iwae.state`, below both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset
from iwae.pack import train_pack
from iwae.state import FINAL, LATEST, NonFiniteError, Notice, TrainResult, model_from_checkpoint, pick_device

__all__ = ["FINAL", "LATEST", "NonFiniteError", "TrainResult", "model_from_checkpoint", "pick_device", "train"]


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
    graph: bool = True,
    progress: bool = True,
    notice: Notice | None = None,
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
        compile_step: ``torch.compile`` the bound (standard estimator); ``"auto"``: on a CPU, runs of
            at least 500k training examples (bench: +20% to +50% examples/s); a failure falls back to eager.
        graph: on a GPU, the whole step replays as one CUDA graph.
        progress: show a progress bar (epochs, the bound).
        notice: where one-line notices go (default: stderr).

    Raises:
        NonFiniteError: the run diverged; its last checkpoint is kept to retry from.
    """
    sink = checkpoint.DirectoryCheckpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else checkpoints
    hook = (lambda g, row: on_epoch(row)) if on_epoch is not None else None
    (out,) = train_pack(
        [cfg],
        data,
        [sink],
        device=device,
        inits=[init],
        on_epoch=hook,
        max_skip_fraction=max_skip_fraction,
        graph=graph,
        compile_step=compile_step,
        progress=progress,
        notice=notice,
    )
    if isinstance(out, NonFiniteError):
        raise out
    return out
