"""One executor for all work: training packs and evaluation ranges as Ray tasks, with one retry rule,
one stall rule, the autoscaler's demand, and Ctrl-C.

A unit of work (:class:`Unit`) is a module-level function and its arguments (a pack of runs to train,
a range of images to score), run in a Ray task on whichever node has room. A :class:`Source` hands
the executor its units (at once, or as they become free: a run another command trains is held back)
and takes each result (the driver writes a scored range; a trained pack has written its own rows).

- **Retry rule.** A unit whose worker or node is lost is retried by Ray (``max_retries``, system
  failures only); the work resumes from what it wrote (a pack from its members' last checkpoints, a
  range from scratch: its numbers are seeded by image id). An ``OSError`` (the store) is retried by
  the executor within the same count. Anything else raised by the work is deterministic (bad data, a
  run that diverged): it is not retried; the other units finish, then one line names it and the
  command exits 1. A ``UserError`` (bad input) stops the command at once, in one line, exit 2.
- **Stall rule.** When no live node can run the units left and the autoscaler cannot add one that
  fits, the command waits ``stall_timeout`` seconds (``IWAE_STALL_TIMEOUT``, 300) and then exits 1 in
  one line, everything written kept; when the autoscaler can launch a fitting node (spot nodes taken
  back), it waits the autoscaler's time (``IWAE_AUTOSCALE_TIMEOUT``) instead, saying so once.
- **Demand.** The autoscaler is asked for room for the units left (``request_resources``, withdrawn
  at the end); as many units are kept in flight as the live nodes run, twice over.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.errors import RunFailed, UserError
from pipeline.ray_backend import autoscaler
from pipeline.ray_backend.cluster import Cluster
from pipeline.ray_backend.resources import Resources, fitting_types, launchable_slots, per_node
from pipeline.store.results import Results

STALL_TIMEOUT_S = float(os.environ.get("IWAE_STALL_TIMEOUT", "300"))


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``fn(*args)`` in a Ray task; ``name`` says what it is in messages."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class Source(Protocol):
    """Where the executor's units come from and where their results go."""

    results: Results  # the location the work writes to (nodes that join are checked against it)

    def take(self) -> list[Unit]:
        """Units ready to run now (each handed out once)."""

    def waiting(self) -> int:
        """Units still to come that are not ready yet (held by another command, say)."""

    def done(self, unit: Unit, value: Any) -> None:
        """A unit's result (an ``OSError`` here is retried like one in the task)."""

    def failed(self, unit: Unit, why: str) -> None:
        """A unit that will not finish in this command (after its retries)."""

    def tick(self) -> None:
        """Called every couple of seconds while work runs (renew leases, show progress)."""

    def close(self) -> None:
        """The executor is done with the source, or stops (Ctrl-C, an error): give up what it holds."""


class Ready:
    """A source whose units are all ready at once (an evaluation's ranges)."""

    def __init__(self, results: Results, units: Sequence[Unit], done: Callable[[Unit, Any], None], progress: Callable[[int], None] | None = None):
        self.results, self.units, self._done, self.progress = results, list(units), done, progress

    def take(self) -> list[Unit]:
        out, self.units = self.units, []
        return out

    def waiting(self) -> int:
        return 0

    def done(self, unit: Unit, value: Any) -> None:
        self._done(unit, value)
        if self.progress:
            self.progress(1)

    def failed(self, unit: Unit, why: str) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def _call(fn: Callable[..., Any], args: tuple[Any, ...], threads: int) -> Any:
    """A Ray task: one unit of work, with torch on the CPUs the task was given."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return fn(*args)


def _system_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for lost work (a worker, actor, node or owner gone)."""
    import ray.exceptions as rex

    names = ("WorkerCrashedError", "NodeDiedError", "OwnerDiedError", "ObjectLostError", "ActorDiedError", "ActorUnavailableError", "TaskUnschedulableError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


TRANSIENT = "OSError"


def outcome(ref: Any, source: Source, unit: Unit, retries: int) -> str | None:
    """A finished task handed to the source (None), or why not in one line. Every Ray error and an
    ``OSError`` is a reason, never a traceback; reasons starting with ``OSError`` are transient
    (the caller retries them). A ``UserError`` raised by the work is raised again here."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        value = ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, OSError):
            return f"{TRANSIENT}: {_first_line(cause)}"
        return _first_line(cause or e)
    except _system_errors() as e:
        return f"{type(e).__name__} after {retries} retries"
    except RayError as e:
        return f"{type(e).__name__}: {_first_line(e)}"
    try:
        source.done(unit, value)
    except OSError as e:
        return f"{TRANSIENT} writing it: {_first_line(e)}"
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  # a result that does not check out (rows, schema): named, never a traceback
        return f"{type(e).__name__} writing it: {_first_line(e)}"
    return None


def stalled(what: str, res: Resources, seconds: float, stall_timeout: float, relaunch: bool, kept: str) -> None:
    """The stall rule (module docstring): ``RunFailed`` once no node could run the work long enough."""
    limit = max(stall_timeout, autoscaler.AUTOSCALE_TIMEOUT_S) if relaunch else stall_timeout
    if seconds <= limit:
        return
    if relaunch:
        raise RunFailed(
            f"{what} stalled: no node left can run its work ({res}) and the autoscaler started none in {limit:g} s; {kept}; "
            "see `ray status` on the head (cloud quota, instance type), then run the same command again"
        )
    raise RunFailed(f"{what} stalled: no node left can run its work ({res}) for {limit:g} s; {kept}; add nodes and run the same command again")


def run(
    cluster: Cluster,
    source: Source,
    res: Resources,
    *,
    what: str,
    workers: int | None = None,
    retries: int = 3,
    stall_timeout: float = STALL_TIMEOUT_S,
    notice: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Run every unit ``source`` hands out on Ray tasks of ``res`` (module docstring); returns the units
    done. ``workers``: units in flight at most (default: twice what the live nodes run at once).
    ``what`` names the work in messages ("training", "evaluation")."""
    import ray

    say = notice or (lambda line: None)
    cluster.check_resources(res, notice)
    task = ray.remote(max_calls=0)(_call).options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=retries, retry_exceptions=False)
    threads = max(1, int(res.cpus))
    types = cluster.types() or []
    queue: collections.deque[Unit] = collections.deque()
    pending: dict[Any, Unit] = {}
    failed: dict[str, str] = {}
    transient: collections.Counter[str] = collections.Counter()
    done = 0
    demand = -1
    alive = {n["NodeID"] for n in cluster.work_nodes()}
    unrunnable_since: float | None = None
    relaunch: bool | None = None
    t0 = time.perf_counter()
    with cluster.interrupt_guard():  # Ctrl-C: cancel what is in flight; what is written stays
        try:
            while True:
                if cluster.interrupted.is_set():  # a Ctrl-C some frame swallowed
                    raise KeyboardInterrupt
                queue.extend(source.take())
                if not queue and not pending and not source.waiting():
                    break
                live = sum(per_node(res, n["Resources"]) for n in cluster.work_nodes())
                want = min(len(queue) + len(pending), max(1, live + launchable_slots(res, types, len(queue) + len(pending))))
                if types and want != demand:  # room for the work left, asked of the autoscaler (nothing to ask of a fixed cluster)
                    cluster.ask(res, want)
                    demand = want
                cap = workers or max(1, 2 * live, want if types else 1)
                while queue and len(pending) < cap:
                    unit = queue.popleft()
                    pending[task.remote(unit.fn, unit.args, threads)] = unit
                ready: list[Any] = []
                if pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                else:
                    time.sleep(2.0)  # only units that are not ready yet
                now_alive = {n["NodeID"] for n in cluster.work_nodes()}
                if alive - now_alive:
                    say(f"lost {len(alive - now_alive)} node(s) of {len(alive)}; their work is rescheduled on the {len(now_alive)} left")
                if now_alive - alive:
                    say(f"{len(now_alive - alive)} node(s) joined")
                    cluster.check_storage(source.results)  # a joined node that cannot use the results location: one line, before more work lands
                alive = now_alive
                for ref in ready:
                    unit = pending.pop(ref)
                    why = outcome(ref, source, unit, retries)
                    if why is None:
                        done += 1
                        continue
                    transient[unit.name] += 1
                    if why.startswith(TRANSIENT) and transient[unit.name] <= retries:
                        queue.append(unit)  # a store blip: the unit runs again
                    else:
                        failed[unit.name] = why
                        source.failed(unit, why)
                source.tick()
                if pending and not ready and not cluster.can_run(res):
                    if unrunnable_since is None:
                        unrunnable_since = time.monotonic()
                    if relaunch is None:  # asked once, when it first matters: can the autoscaler replace the nodes lost?
                        relaunch = bool(fitting_types(res, cluster.types()))
                        if relaunch:
                            wait = f"{max(stall_timeout, autoscaler.AUTOSCALE_TIMEOUT_S):g} s"
                            say(f"no node left can run the {what}'s work ({res}); waiting up to {wait} for the autoscaler to launch one")
                    stalled(what, res, time.monotonic() - unrunnable_since, stall_timeout, relaunch, f"{done} unit(s) of {what} are done and kept")
                else:
                    unrunnable_since = None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if demand > 0 or cluster.requested:
                cluster.ask(res, 0)
            source.close()
    if timings is not None:
        timings["work_seconds"] = time.perf_counter() - t0
    if failed:
        names = list(failed)
        named = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        why = failed[names[0]]
        raise RunFailed(f"{what} of {named} failed ({why}); the {done} done are kept; run the same command again to finish")
    return done
