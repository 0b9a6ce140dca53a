"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``), truncation detected."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "iwae-pipeline/1"


class CheckpointError(Exception):
    """A checkpoint is truncated, foreign or unreadable. One line, says what to do."""


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a ``_``-prefixed temporary file in the same folder, then ``os.replace``.

    A process killed mid-write leaves only the temporary file, which nothing reads.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="_", suffix=".pt.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling); check it is ours."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; train the run first") from None
    except Exception as e:  # truncated zip, foreign pickle, wrong magic: all unreadable
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to retrain from the previous one") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iwae-pipeline checkpoint; point to a file written by `iwae-pipeline train`")
    return obj
