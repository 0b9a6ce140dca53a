"""A lease per run in the results location, held by the task that trains it, so that two commands
never train one run at once, and a hung task lets go of its runs.

Two ``sweep`` (or ``submit``) commands of one job on one location, say a re-submit after a laptop
lost its connection, would otherwise both train every run, interleave ``latest.pt`` and double the
work. A training task takes its members' leases when it starts; a run whose lease another task
holds live is not trained by it but handed back as *held*, and the command looks at it again later:
done by the other (trained once), or its lease expired (its holder died or hung): taken over, and
resumed from the holder's checkpoints.

A lease is a generation: ``leases/<run_id>/000001.json``, ``000002.json``, ... The highest generation
is the lease; its body names the holder (the unit's token, the command, host and pid) and whether
it was released. It is **alive while its object is younger than the lease** (``IWAE_LEASE_SECONDS``,
180), judged by the store's clock: the object's modification time against
:meth:`~pipeline.store.objects.Store.now`, so the nodes' own clocks do not matter. The holding task
renews it from its own thread every third of that, **only while its training makes progress** (its
steps advance between two renewals; :class:`iwae.state.Heartbeat`), so a hung loop lets it expire;
and releases it when its work ends. A holder on this machine whose process is gone (a command
killed here) counts as expired at once.

Taking a free or expired lease creates the next generation with the store's compare-and-set
(:meth:`pipeline.store.objects.Store.create`: a local hard link, S3's conditional PUT, GCS's
create-only upload; elsewhere a write read back), so of two tasks that both saw it expired exactly
one wins. A renewal first asks whether the next generation exists (one HEAD): if it does, another
task took the run over and this one stops before its next checkpoint (:class:`LeaseLost`).

Cost: a renewal is two requests per run every minute, by the tasks that train; the driver renews
nothing and looks only at the leases of the runs in flight and of the runs it waits for.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.store.results import Results

LEASE_SECONDS = float(os.environ.get("IWAE_LEASE_SECONDS", "180"))  # renewed every third of this
PER_RUN_LISTINGS = 50  # up to this many runs' leases are listed run by run; more, with one listing of leases/


class LeaseLost(RuntimeError):
    """Another task took over this run's lease (this one's renewals stopped for longer than the lease)."""


@dataclass(frozen=True)
class Lease:
    """A lease a task holds: the run, its generation and the holder's token."""

    run_id: str
    generation: int
    owner: str


@dataclass(frozen=True)
class Held:
    """A live lease another holder has."""

    run_id: str
    by: str  # "host pid N"
    expires_in: float  # seconds


@dataclass(frozen=True)
class Seen:
    """A run's lease as a listing shows it: its highest generation and how old that is, by the store's clock."""

    generation: int  # 0: the run never had a lease
    age: float  # seconds since it was written or renewed
    body: dict[str, Any] | None = None  # read only when asked
    mtime: float = 0.0  # when it was written or renewed, by the store's clock


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
    """A unique token (a unit of work's, or a command's)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder(body: dict[str, Any] | None) -> str:
    return f"{body.get('host')} pid {body.get('pid')}" if body else "another command"


class Leases:
    """The leases of one results location, as one holder (``owner``: a unit's token) sees them."""

    def __init__(self, results: Results, owner: str, seconds: float = LEASE_SECONDS, command: str = ""):
        self.results, self.owner, self.seconds, self.command = results, owner, seconds, command

    def _key(self, run_id: str, generation: int) -> str:
        return f"leases/{run_id}/{generation:06d}.json"

    def seen(self, run_id: str, body: bool = False) -> Seen:
        """The run's lease by one listing (and one GET of the body when ``body``)."""
        entries = self.results.store.entries(f"leases/{run_id}", ".json")
        gens = [(int(e.key.rsplit("/", 1)[1].split(".")[0]), e.mtime) for e in entries if e.key.rsplit("/", 1)[1].split(".")[0].isdigit()]
        if not gens:
            return Seen(0, float("inf"))
        gen, mtime = max(gens)
        age = self.results.store.now() - mtime if mtime else float("inf")
        return Seen(gen, age, self.body(run_id, gen) if body else None, mtime)

    def seen_many(self, run_ids: list[str]) -> dict[str, Seen]:
        """Many runs' leases at once, without bodies: one listing of ``leases/`` when there are more
        than :data:`PER_RUN_LISTINGS` (a request per 1,000 generations), else one listing per run."""
        if len(run_ids) <= PER_RUN_LISTINGS:
            return {rid: self.seen(rid) for rid in run_ids}
        want = set(run_ids)
        latest: dict[str, tuple[int, float]] = {}
        for e in self.results.store.entries("leases", ".json"):
            parts = e.key.split("/")
            if len(parts) != 3 or parts[1] not in want or not parts[2].split(".")[0].isdigit():
                continue
            gen = int(parts[2].split(".")[0])
            if gen > latest.get(parts[1], (0, 0.0))[0]:
                latest[parts[1]] = (gen, e.mtime)
        now = self.results.store.now() if latest else 0.0
        return {rid: Seen(latest[rid][0], now - latest[rid][1], None, latest[rid][1]) if rid in latest else Seen(0, float("inf")) for rid in run_ids}

    def body(self, run_id: str, generation: int) -> dict[str, Any] | None:
        """A generation's body (None when it is gone or does not parse: it then reads as expired)."""
        try:
            out = json.loads(self.results.store.read_bytes(self._key(run_id, generation)))
            return out if isinstance(out, dict) else None
        except (FileNotFoundError, ValueError):
            return None  # half-seen or damaged: treated as expired

    def _payload(self, epoch: int | None = None, released: bool = False) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "command": self.command,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "released": released,
                "epoch": epoch,
                "nonce": uuid.uuid4().hex,  # every body unique: a write the store cannot make exclusive is read back by it
            },
            sort_keys=True,
        ).encode()

    def live(self, s: Seen) -> bool:
        """Whether a lease as seen is held: renewed within the lease, not released, its holder not dead here."""
        if s.generation == 0 or s.age >= self.seconds:
            return False
        body = s.body
        return body is not None and not body.get("released") and not _dead_here(body)

    def acquire(self, run_id: str) -> Lease | Held:
        """Take the run's lease: free, expired, released, or already this process's. ``Held`` when
        another holds it live. This owner's lease held by another process (a Ray retry of the same
        unit, whose first attempt may live on behind a partition) is taken over like anyone's: by
        the next generation, which the first attempt sees at its next renewal or checkpoint."""
        s = self.seen(run_id)
        if s.generation:
            s = Seen(s.generation, s.age, self.body(run_id, s.generation), s.mtime)
            b = s.body or {}
            if b.get("owner") == self.owner and b.get("host") == socket.gethostname() and b.get("pid") == os.getpid() and not b.get("released"):
                self.results.store.write_bytes(self._key(run_id, s.generation), self._payload())  # this very process: renewed
                return Lease(run_id, s.generation, self.owner)
            if b.get("owner") != self.owner and self.live(s):
                return Held(run_id, holder(s.body), self.seconds - s.age)
        key = self._key(run_id, s.generation + 1)
        mine = self._payload()
        created = self.results.store.create(key, mine)
        body = self.body(run_id, s.generation + 1)  # read back: a lost answer to our own create, or a store that does not make it exclusive
        if body is not None and body.get("nonce") == json.loads(mine)["nonce"]:
            return Lease(run_id, s.generation + 1, self.owner)
        del created  # what the store answered does not decide; what it holds does
        return Held(run_id, holder(body), self.seconds)

    def lost(self, lease: Lease) -> str:
        """Why this lease is no longer ours ("" while it is): a newer generation exists (one HEAD)."""
        if self.results.store.exists(self._key(lease.run_id, lease.generation + 1)):
            return f"run {lease.run_id}: another command took over its lease ({holder(self.body(lease.run_id, lease.generation + 1))})"
        return ""

    def check_held(self, leases: list[Lease]) -> str:
        """ "" while every lease is still ours, else why not: what a task asks before each checkpoint and row."""
        for lease in leases:
            why = self.lost(lease)
            if why:
                return why
        return ""

    def renew(self, lease: Lease, epoch: int | None = None, deadline_s: float | None = None) -> None:
        """Extend the lease (and record the epoch reached); ``LeaseLost`` when a newer generation
        exists. ``deadline_s``: how long its requests are retried (a renewal must end within the lease)."""
        store = self.results.store.retrying_for(deadline_s) if deadline_s is not None else self.results.store
        if store.exists(self._key(lease.run_id, lease.generation + 1)):
            raise LeaseLost(f"run {lease.run_id}: another command took over its lease ({holder(self.body(lease.run_id, lease.generation + 1))})")
        store.write_bytes(self._key(lease.run_id, lease.generation), self._payload(epoch))

    def release(self, lease: Lease, epoch: int | None = None) -> None:
        """Give the lease up (it reads as free at once), if it is still this holder's."""
        if not self.results.store.exists(self._key(lease.run_id, lease.generation + 1)):
            self.results.store.write_bytes(self._key(lease.run_id, lease.generation), self._payload(epoch, released=True))
