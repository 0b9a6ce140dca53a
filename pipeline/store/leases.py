"""A lease per run in the results location, so that two commands never train one run at once.

Two ``sweep`` (or ``submit``) commands of one job on one location, say a re-submit after a laptop
lost its connection, would otherwise both train every run, interleave ``latest.pt`` and double the
work. Before a command trains a run it takes the run's lease; a command that finds a live lease held
by another skips the run for now, says so, and takes it over only if that lease expires (its holder
died): it then resumes from the holder's checkpoints.

A lease is a generation: ``leases/<run_id>/000001.json``, ``000002.json``, ... holding the owner
(command id, host, pid), an expiry time and the epoch reached. The highest generation is the lease.
A lease whose holder ran on this machine and is gone (a command killed here) counts as expired.
Taking a free or expired lease creates the next generation with the store's compare-and-set
(:meth:`pipeline.store.objects.Store.create`: a local hard link, S3's conditional PUT, GCS's create-only
upload), so of two commands that both saw it expired exactly one wins. The holder renews it (the
driver, and the training task itself, which stops if it finds a newer generation than its own), and
releases it when the run's work ends; a released lease is an expired one.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.store.results import Results

LEASE_SECONDS = float(os.environ.get("IWAE_LEASE_SECONDS", "180"))  # renewed every third of this


class LeaseLost(RuntimeError):
    """Another command took over this run's lease (this one's renewals stopped for longer than the lease)."""


@dataclass(frozen=True)
class Lease:
    """A lease this command holds: the run, its generation and the owner's token."""

    run_id: str
    generation: int
    owner: str


@dataclass(frozen=True)
class Held:
    """A live lease another command holds."""

    run_id: str
    by: str  # "host pid N"
    expires_in: float  # seconds


def _dead_here(body: dict[str, Any]) -> bool:
    """The lease's holder ran on this machine and its process is gone (a command killed here): its
    lease need not be waited out."""
    if body.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(body.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False
    return False


def new_owner() -> str:
    """A command's token: unique, and readable in a notice."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """The leases of one results location, as one command (``owner``) sees them."""

    def __init__(self, results: Results, owner: str, seconds: float = LEASE_SECONDS):
        self.results, self.owner, self.seconds = results, owner, seconds

    def _key(self, run_id: str, generation: int) -> str:
        return f"leases/{run_id}/{generation:06d}.json"

    def _latest(self, run_id: str) -> tuple[int, dict[str, Any] | None]:
        """The highest generation and its content (0 and None when the run never had a lease)."""
        gens = sorted(int(k.rsplit("/", 1)[1].split(".")[0]) for k in self.results.store.list(f"leases/{run_id}", ".json"))
        if not gens:
            return 0, None
        try:
            return gens[-1], json.loads(self.results.store.read_bytes(self._key(run_id, gens[-1])))
        except (FileNotFoundError, ValueError):
            return gens[-1], None  # half-seen or damaged: treated as expired

    def _body(self, epoch: int | None = None, released: bool = False) -> bytes:
        host, pid, _ = self.owner.split(":")
        return json.dumps(
            {"owner": self.owner, "host": host, "pid": int(pid), "expires": 0.0 if released else time.time() + self.seconds, "epoch": epoch}, sort_keys=True
        ).encode()

    def acquire(self, run_id: str) -> Lease | Held:
        """Take the run's lease: free, expired or already ours. ``Held`` when another command holds it live."""
        gen, body = self._latest(run_id)
        if body is not None and body.get("owner") == self.owner:
            return Lease(run_id, gen, self.owner)
        if body is not None and float(body.get("expires", 0)) > time.time() and not _dead_here(body):
            return Held(run_id, f"{body.get('host')} pid {body.get('pid')}", float(body["expires"]) - time.time())
        if self.results.store.create(self._key(run_id, gen + 1), self._body()):
            return Lease(run_id, gen + 1, self.owner)
        _, body = self._latest(run_id)  # another command took that generation first
        expires = float(body.get("expires", 0)) if body else 0.0
        return Held(run_id, f"{body.get('host')} pid {body.get('pid')}" if body else "another command", max(0.0, expires - time.time()))

    def renew(self, lease: Lease, epoch: int | None = None) -> None:
        """Extend our lease (and record the epoch reached); ``LeaseLost`` when a newer generation exists."""
        gen, body = self._latest(lease.run_id)
        if gen != lease.generation or (body is not None and body.get("owner") != self.owner):
            raise LeaseLost(f"run {lease.run_id}: another command took over its lease ({(body or {}).get('host')} pid {(body or {}).get('pid')})")
        epoch = epoch if epoch is not None else (body or {}).get("epoch")  # the driver's renewals keep the task's epoch
        self.results.store.write_bytes(self._key(lease.run_id, lease.generation), self._body(epoch))

    def release(self, lease: Lease) -> None:
        """Give the lease up (it reads as expired), if it is still ours."""
        gen, body = self._latest(lease.run_id)
        if gen == lease.generation and body is not None and body.get("owner") == self.owner:
            self.results.store.write_bytes(self._key(lease.run_id, gen), self._body(released=True))

    def epoch(self, run_id: str) -> int | None:
        """The epoch the holder of a run's lease last reported (for progress)."""
        _, body = self._latest(run_id)
        return None if body is None or body.get("epoch") is None else int(body["epoch"])
