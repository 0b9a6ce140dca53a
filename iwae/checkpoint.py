"""Checkpoints: bytes in, bytes out, safe loads (``torch.load(weights_only=True)``), truncation detected.

Training does not decide where checkpoints live. It hands them, as bytes, to a :class:`Checkpoints`
sink the caller provides: :class:`DirectoryCheckpoints` for a local folder (a notebook), or the
pipeline's object-store sink on a cluster. A sink tells apart "absent" (``None``), "unreadable now"
(``OSError``: a passing network error, never a reason to discard anything) and "read but damaged"
(:class:`CheckpointError` from :func:`from_bytes`: the only case that moves a file aside).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from iwae.files import write_atomic

FORMAT = "iwae-pipeline/1"


class CheckpointError(Exception):
    """A checkpoint is truncated, foreign or unreadable. One line, says what to do."""


def to_bytes(obj: dict[str, Any]) -> bytes:
    """Serialise a checkpoint dict (``torch.save`` with this project's format tag)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **obj}, buf)
    return buf.getvalue()


def from_bytes(data: bytes, name: str = "checkpoint", map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint from bytes with ``weights_only=True``; ``CheckpointError`` if damaged or foreign."""
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, wrong magic: all unreadable
        why = type(e).__name__
        raise CheckpointError(f"checkpoint {name} is damaged ({why}); run the sweep again: it retrains from the run's previous checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not an iwae-pipeline checkpoint; point to a file written by `iwae-pipeline train`")
    return obj


class Checkpoints(Protocol):
    """Where one run's checkpoints go: named blobs (``latest.pt``, ``stage-00.pt``, ``final.pt``)."""

    def read(self, name: str) -> bytes | None:
        """The blob, or None if there is none. Raises ``OSError`` if it exists but cannot be read now."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Store the whole blob atomically."""
        ...

    def names(self) -> list[str]:
        """The names present."""
        ...

    def quarantine(self, name: str) -> None:
        """Move a damaged blob aside (never delete it)."""
        ...


class DirectoryCheckpoints:
    """Checkpoints in a local folder: atomic writes (temp name + rename), damaged files renamed aside."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self.path / name, data)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.glob("*.pt")) if self.path.is_dir() else []

    def quarantine(self, name: str) -> None:
        src = self.path / name
        src.rename(self.path / f"_damaged-{name}.{time.strftime('%Y%m%dT%H%M%S')}")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True`` (no arbitrary unpickling); check it is ours."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; train the run first") from None
    return from_bytes(data, str(path), map_location)
